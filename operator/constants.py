"""Every label, annotation key, name and event reason the operator writes, each a named constant.

Pure: no kopf, no client.
"""

from __future__ import annotations

from weightsync.contract import (
    ENDPOINTS_ANNOTATION,
    EPOCH_ANNOTATION,
    LAST_SYNC_ANNOTATION,
    PODINFO_MOUNT_PATH,
    WORLD_SIZE_ANNOTATION,
)

#: The operator's name: field manager, event source, kopf peering name, `app.kubernetes.io/managed-by`.
OPERATOR_NAME = "weightsync-operator"

# --- labels on every child -------------------------------------------------------------------------------
#: Group label: the WeightSync's name. The headless Service selects member pods by it; the operator lists
#: children by it.
NAME_LABEL = "weightsync.dev/name"
#: `trainer` or `inference` (member pods only).
ROLE_LABEL = "weightsync.dev/role"
#: Replica index of an inference pod (`0` for the trainer).
REPLICA_LABEL = "weightsync.dev/replica"
#: Standard labels, for tools that group by app.
APP_NAME_LABEL = "app.kubernetes.io/name"
APP_INSTANCE_LABEL = "app.kubernetes.io/instance"
APP_COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
APP_NAME = "weightsync"

# --- annotations on member pods ---------------------------------------------------------------------------
#: Group epoch (contract); bumped in place on surviving members, projected through the podinfo volume.
EPOCH = EPOCH_ANNOTATION
#: The trainer's latest sync report (contract); written by the trainer's runtime on its own pod.
LAST_SYNC = LAST_SYNC_ANNOTATION
#: World size at the current epoch, updated with the epoch (a scale changes it for surviving members, whose
#: WEIGHTSYNC_WORLD_SIZE env still holds the value at their creation).
WORLD_SIZE = WORLD_SIZE_ANNOTATION
#: Trainer only: the inference pods' DNS names at the current epoch, comma-separated in replica order
#: (WEIGHTSYNC_ENDPOINTS holds them as at the trainer's creation).
ENDPOINTS = ENDPOINTS_ANNOTATION

# --- pod wiring -------------------------------------------------------------------------------------------
#: The downward-API volume holding the pod's annotations, mounted at PODINFO_MOUNT_PATH in every container.
PODINFO_VOLUME = "weightsync-podinfo"
PODINFO_PATH = PODINFO_MOUNT_PATH
#: Key of the group token in the `<ws>-token` Secret; reaches pods as WEIGHTSYNC_TOKEN via secretKeyRef.
TOKEN_KEY = "token"
TOKEN_ENV = "WEIGHTSYNC_TOKEN"
#: Name of the Service port (the rendezvous store on the trainer).
RENDEZVOUS_PORT_NAME = "rendezvous"

# --- child names ------------------------------------------------------------------------------------------


def service_name(ws: str) -> str:
    """The headless Service: `<ws>`."""
    return ws


def secret_name(ws: str) -> str:
    """The Secret holding the group token: `<ws>-token`."""
    return f"{ws}-token"


def trainer_pod_name(ws: str) -> str:
    return f"{ws}-trainer-0"


def inference_pod_name(ws: str, replica: int) -> str:
    return f"{ws}-inference-{replica}"


def report_role_name(ws: str) -> str:
    """Role (and RoleBinding) letting the trainer patch its own pod with its sync report."""
    return f"{ws}-trainer-report"


def pod_dns(ws: str, namespace: str, pod: str) -> str:
    """A member's DNS name under the headless Service (hostname = pod name, subdomain = Service)."""
    return f"{pod}.{service_name(ws)}.{namespace}.svc.cluster.local"


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
REASON_MAX_RESTARTS = "MaxRestartsExceeded"  # failurePolicy.maxRestarts exceeded: Failed
REASON_BACKOFF = "BackingOff"  # waiting before re-creating lost members
REASON_READY = "GroupReady"  # every member Ready at the current epoch
REASON_FORMING = "Forming"  # members starting or re-joining
REASON_PENDING = "Pending"  # members being created
REASON_STALE_CHILD = "StaleChild"  # a child of the same name belongs to someone else (e.g. a deleted owner)
REASON_TOKEN_RECREATED = "TokenRecreated"  # the token Secret was missing and got a new token
REASON_INVALID_REPORT = "InvalidSyncReport"  # the trainer's last-sync annotation could not be parsed
REASON_RECOVERED = "Recovered"  # Degraded cleared: the group is whole again
REASON_AS_EXPECTED = "AsExpected"  # a condition that does not apply
