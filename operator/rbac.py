"""The RBAC rules the operator needs, as data: the Helm chart's ClusterRole is checked against this list.

Each rule names the code that uses it. Nothing else is needed: kopf's event posting and its dynamic
scanning of namespaces and CRDs are turned off (handlers.py), the operator's handlers are event handlers
(no finalizers, no last-handled-configuration annotation: kopf never patches a WeightSync), and owner
references carry no blockOwnerDeletion (which would need `update` on weightsyncs/finalizers).

Creating the Role `<ws>-trainer-report` (get, patch on one pod) is allowed because the operator itself
holds get and patch on pods (RBAC's escalation check); no `bind` or `escalate` verb is needed.
"""

from __future__ import annotations

from typing import TypedDict


class Rule(TypedDict):
    apiGroups: list[str]
    resources: list[str]
    verbs: list[str]


REQUIRED_RULES: list[Rule] = [
    # kopf watches WeightSyncs (list, watch); reconcile reads one (get).
    {"apiGroups": ["weightsync.dev"], "resources": ["weightsyncs"], "verbs": ["get", "list", "watch"]},
    # reconcile writes the status (merge patch with a resourceVersion precondition).
    {"apiGroups": ["weightsync.dev"], "resources": ["weightsyncs/status"], "verbs": ["patch"]},
    # member pods: an informer watches them (list, watch); create, delete (failed or scaled away), patch
    # (epoch annotations); get when a create is answered 409.
    {
        "apiGroups": [""],
        "resources": ["pods"],
        "verbs": ["get", "list", "watch", "create", "patch", "delete"],
    },
    # the headless Service: an informer watches it (drift); get when the watch lacks it; create, patch.
    {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch", "create", "patch"]},
    # the token Secret: an informer watches the labelled Secrets as metadata only (PartialObjectMetadata: the
    # operator never receives a Secret's data); get (metadata kept only) when the watch lacks it; create.
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch", "create"]},
    # Events about every decision.
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    # the trainer's report Role and RoleBinding: informers watch them; get when the watch lacks one; created,
    # repaired.
    {
        "apiGroups": ["rbac.authorization.k8s.io"],
        "resources": ["roles", "rolebindings"],
        "verbs": ["get", "list", "watch", "create", "patch"],
    },
    # the group's NetworkPolicy: an informer watches it; get when the watch lacks it; created, repaired.
    {
        "apiGroups": ["networking.k8s.io"],
        "resources": ["networkpolicies"],
        "verbs": ["get", "list", "watch", "create", "patch"],
    },
]

#: kopf peering (unless --standalone): kopf lists and watches the peering object and patches its own entry
#: in it (never a plain get; the chart's audit-log test confirms). Cluster-wide operators use the
#: ClusterKopfPeering, namespaced ones a KopfPeering in each watched namespace; the object must exist (kopf
#: does not create it).
PEERING_RULES: list[Rule] = [
    {
        "apiGroups": ["kopf.dev"],
        "resources": ["clusterkopfpeerings", "kopfpeerings"],
        "verbs": ["list", "watch", "patch"],
    },
]
