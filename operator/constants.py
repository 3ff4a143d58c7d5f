"""Every label, annotation key, name and event reason the operator writes, each a named constant.

Pure: no kopf, no client.
"""

from __future__ import annotations

#: The operator's name: field manager, event source, kopf peering name, `app.kubernetes.io/managed-by`.
OPERATOR_NAME = "weightsync-operator"

# --- labels on every child -------------------------------------------------------------------------------
#: Group label: the WeightSync's name. The headless Service selects member pods by it; the operator lists
#: children by it.
NAME_LABEL = "weightsync.dev/name"
#: `trainer` or `inference` (member pods only).
ROLE_LABEL = "weightsync.dev/role"
#: Replica index of an inference pod; a trainer pod's index in the trainer's job.
REPLICA_LABEL = "weightsync.dev/replica"
#: Standard labels, for tools that group by app.
APP_NAME_LABEL = "app.kubernetes.io/name"
APP_INSTANCE_LABEL = "app.kubernetes.io/instance"
APP_COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
APP_NAME = "weightsync"

# --- annotations on member pods ---------------------------------------------------------------------------
# The epoch, world size, endpoints and last-sync annotations are the contract's (weightsync/contract.py:
# EPOCH_ANNOTATION, WORLD_SIZE_ANNOTATION, ENDPOINTS_ANNOTATION, LAST_SYNC_ANNOTATION). The operator's own:
#: The hash of the pod template a member was made from: a member whose hash is not the current template's
#: is out of date (see spec.updateStrategy).
TEMPLATE_HASH = "weightsync.dev/template-hash"
#: The uid of the token Secret a member was made with: a member of an older Secret holds a token the group
#: no longer uses and is replaced.
TOKEN_SECRET_UID = "weightsync.dev/token-secret-uid"

# --- pod wiring -------------------------------------------------------------------------------------------
#: The downward-API volume holding the pod's annotations, mounted at PODINFO_MOUNT_PATH in every container.
PODINFO_VOLUME = "weightsync-podinfo"
#: Key of the group token in the `<ws>-token` Secret; reaches pods as WEIGHTSYNC_TOKEN via secretKeyRef.
TOKEN_KEY = "token"
TOKEN_ENV = "WEIGHTSYNC_TOKEN"
#: Name of the Service port (the rendezvous store on the trainer).
RENDEZVOUS_PORT_NAME = "rendezvous"
#: Name of the Service port of the engines' HTTP API (protocol vllm).
ENGINE_PORT_NAME = "engine"

# --- event reasons ----------------------------------------------------------------------------------------
REASON_CREATED = "Created"  # a child was created (or re-created after drift)
REASON_UPDATED = "Updated"  # a child's managed fields were repaired
REASON_DELETED = "Deleted"  # a member pod was deleted (failed, or scaled away)
REASON_EPOCH_BUMPED = "EpochBumped"  # membership changed; the group re-forms at a new epoch
REASON_MEMBER_FAILED = "MemberFailed"  # a member pod failed or exited
REASON_MEMBER_LOST = "MemberLost"  # a member pod vanished or is being deleted
REASON_SCALED = "Scaled"  # spec.inference.replicas changed
REASON_EPOCH_PROPAGATED = "EpochPropagated"  # survivors' annotations patched to the new epoch
REASON_RESERVED_ENV = "ReservedEnv"  # a template sets a WEIGHTSYNC_* (or network-owned NCCL_*) variable
REASON_ENGINE_CONFIG = "EngineMisconfigured"  # protocol vllm: the engine template lacks what vLLM needs
REASON_MAX_RESTARTS = "MaxRestartsExceeded"  # failurePolicy.maxRestarts exceeded: Failed
REASON_BACKOFF = "BackingOff"  # waiting before re-creating lost members
REASON_READY = "GroupReady"  # every member Ready at the current epoch
REASON_FORMING = "Forming"  # members starting or re-joining
REASON_PENDING = "Pending"  # members being created
REASON_STALE_CHILD = "StaleChild"  # a child of the same name belongs to someone else (e.g. a deleted owner)
REASON_TOKEN_RECREATED = "TokenRecreated"  # the token Secret was missing and got a new token
REASON_INVALID_REPORT = "InvalidSyncReport"  # the trainer's last-sync annotation could not be parsed
REASON_INVALID_CHILD = "InvalidChild"  # the API server refuses a child as invalid (the spec must change): Failed
REASON_CHILD_REJECTED = "ChildRejected"  # the API server refuses a child for now (forbidden, quota): retried
REASON_FOREIGN_CHILD = "ForeignChild"  # a Service, Secret, Role or RoleBinding of our name that we did not make
REASON_REPLACED = "MemberReplaced"  # an out-of-date member (template, token) deleted to be re-created
REASON_OUT_OF_DATE = "MembersOutOfDate"  # members made from an older template (updateStrategy OnDelete)
REASON_WAITING = "MembersWaiting"  # members that cannot start: unschedulable, image or config errors
REASON_API_ERROR = "ApiError"  # a write the API server refused after planning (retried with a backoff)
REASON_RECOVERED = "Recovered"  # Degraded cleared: the group is whole again
REASON_AS_EXPECTED = "AsExpected"  # a condition that does not apply
