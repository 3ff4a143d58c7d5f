"""Desired state: a WeightSync's spec -> its children (Service, Secret, member pods, Role, RoleBinding).

Pure builders, no I/O: each function returns the exact object the operator creates, as a dict in the API
server's own field names. Everything a member learns about its group comes from `MemberEnv.to_env()` of
the shared contract (no ad-hoc strings here), except the token, which reaches the pod only through a
`secretKeyRef` to the `<ws>-token` Secret (the literal never appears in a pod spec).

Why `restartPolicy: Never` on members: a sync group cannot take a restarted rank back in place (NCCL fixes
its members at creation), so a member whose process ends must be seen by the operator, which bumps the
epoch, lets the survivors re-join in place and re-creates the member as a new pod. With `Always` or
`OnFailure` the kubelet would restart the container silently behind the operator's back.

The trainer's sync report: the trainer's runtime patches the annotation `weightsync.dev/last-sync` on its
own pod; the Role `<ws>-trainer-report` allows `get` and `patch` on that one pod and nothing else, and the
RoleBinding of the same name grants it to the trainer pod's service account. The operator copies the
annotation into `status.lastSync` (see `plan.py`).
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from weightsync.api.models import API_VERSION, KIND, WeightSyncSpec
from weightsync.contract import (
    ENDPOINTS_ANNOTATION,
    EPOCH_ANNOTATION,
    PODINFO_MOUNT_PATH,
    WORLD_SIZE_ANNOTATION,
    MemberEnv,
    reserved_env_names,
)

from . import constants as c
from . import engines, names, security

Obj = dict[str, Any]

#: Stands in for the token while building MemberEnv (which requires one); the env entry it produces is
#: replaced by a secretKeyRef, so this never reaches a pod.
_TOKEN_PLACEHOLDER = "<from-secret-key-ref>"


@dataclass(frozen=True)
class Group:
    """The identity of one WeightSync and the epoch its new members are created at."""

    name: str
    namespace: str
    uid: str
    spec: WeightSyncSpec
    epoch: int = 0
    #: The uid of the token Secret new members get their token from (recorded on each member).
    secret_uid: str = ""


@dataclass(frozen=True)
class Slot:
    """One member's place in the group."""

    pod: str
    role: str
    replica: int
    rank_offset: int
    local_world_size: int


def slots(name: str, spec: WeightSyncSpec) -> list[Slot]:
    """The members, trainer first then replicas in order; replica r has rank offset 1 + r x workers."""
    workers = spec.inference.workers_per_replica
    out = [Slot(names.trainer_pod_name(name, i), "trainer", i, 0, 1) for i in range(spec.trainer.pods)]
    out += [
        Slot(names.inference_pod_name(name, r), "inference", r, 1 + r * workers, workers)
        for r in range(spec.inference.replicas)
    ]
    return out


def endpoints(group: Group) -> list[str]:
    """The inference pods' DNS names, in replica order."""
    members = slots(group.name, group.spec)
    return [names.pod_dns(group.name, group.namespace, s.pod) for s in members if s.role == "inference"]


def labels(name: str, role: str | None = None, replica: int | None = None) -> dict[str, str]:
    out = {
        c.APP_NAME_LABEL: c.APP_NAME,
        c.APP_INSTANCE_LABEL: name,
        c.MANAGED_BY_LABEL: c.OPERATOR_NAME,
        c.NAME_LABEL: name,
    }
    if role is not None:
        out[c.APP_COMPONENT_LABEL] = role
        out[c.ROLE_LABEL] = role
    if replica is not None:
        out[c.REPLICA_LABEL] = str(replica)
    return out


def owner_reference(group: Group) -> Obj:
    # No blockOwnerDeletion: it would need `update` on weightsyncs/finalizers for no benefit here.
    return {"apiVersion": API_VERSION, "kind": KIND, "name": group.name, "uid": group.uid, "controller": True}


def _meta(group: Group, name: str, role: str | None = None, replica: int | None = None) -> Obj:
    return {
        "name": name,
        "namespace": group.namespace,
        "labels": labels(group.name, role, replica),
        "ownerReferences": [owner_reference(group)],
    }


def service(group: Group) -> Obj:
    """Headless, publishing not-ready addresses: the trainer's name resolves before it is Ready."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(group, names.service_name(group.name)),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {c.NAME_LABEL: group.name},
            "ports": service_ports(group.spec),
        },
    }


def service_ports(spec: WeightSyncSpec) -> list[Obj]:
    """The rendezvous port, and with protocol vllm the engines' HTTP port."""
    port = spec.rendezvous.port
    out: list[Obj] = [{"name": c.RENDEZVOUS_PORT_NAME, "port": port, "targetPort": port, "protocol": "TCP"}]
    if spec.transport.protocol == "vllm" and spec.engine.port != port:
        engine = spec.engine.port
        out.append({"name": c.ENGINE_PORT_NAME, "port": engine, "targetPort": engine, "protocol": "TCP"})
    return out


def secret(group: Group, token: str) -> Obj:
    """The group token; created once, never rotated by reconcile."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(group, names.secret_name(group.name)),
        "type": "Opaque",
        "stringData": {c.TOKEN_KEY: token},
    }


#: The operator's own pods, as the chart labels them (any namespace).
OPERATOR_POD_LABELS = {"app.kubernetes.io/part-of": "weightsync", "app.kubernetes.io/component": "operator"}


def network_policy(group: Group) -> Obj:
    """Ingress to the group's pods only from the group's pods (every port: the rendezvous, gloo's and NCCL's
    data connections on ephemeral ports, the engines' HTTP API) and from the operator's pods (the Service's
    ports). Egress is left alone (DNS, the API server, the user's own services)."""
    group_pods = {"matchLabels": {c.NAME_LABEL: group.name}}
    ports = [{"port": p["port"], "protocol": "TCP"} for p in service_ports(group.spec)]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(group, names.network_policy_name(group.name)),
        "spec": {
            "podSelector": group_pods,
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": group_pods}]},
                {"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": OPERATOR_POD_LABELS}}],
                 "ports": ports},
            ],
        },
    }


def trainer_service_account(spec: WeightSyncSpec) -> str:
    pod_spec = spec.trainer.template.get("spec", {})
    return str(pod_spec.get("serviceAccountName") or pod_spec.get("serviceAccount") or "default")


def report_role(group: Group) -> Obj:
    """Lets the trainer get and patch its own pod (its sync report annotation), nothing else."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _meta(group, names.report_role_name(group.name)),
        "rules": [
            {
                "apiGroups": [""],
                "resources": ["pods"],
                "resourceNames": [names.trainer_pod_name(group.name)],
                "verbs": ["get", "patch"],
            }
        ],
    }


def report_role_binding(group: Group) -> Obj:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(group, names.report_role_name(group.name)),
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": names.report_role_name(group.name),
        },
        "subjects": [
            {
                "kind": "ServiceAccount",
                "name": trainer_service_account(group.spec),
                "namespace": group.namespace,
            }
        ],
    }


def member_env(group: Group, slot: Slot) -> MemberEnv:
    """The contract of one member, as the shared module defines it."""
    spec = group.spec
    return MemberEnv(
        name=group.name,
        namespace=group.namespace,
        role="trainer" if slot.role == "trainer" else "inference",
        master_addr=names.pod_dns(group.name, group.namespace, names.trainer_pod_name(group.name)),
        master_port=spec.rendezvous.port,
        world_size=spec.world_size,
        rank_offset=slot.rank_offset,
        local_world_size=slot.local_world_size,
        backend=spec.transport.backend,
        protocol=spec.transport.protocol,
        packed=spec.transport.packed,
        buffer_bytes=spec.transport.buffer_size_bytes,
        num_buffers=spec.transport.num_buffers,
        timeout_seconds=spec.rendezvous.timeout_seconds,
        token=_TOKEN_PLACEHOLDER,
        epoch=group.epoch,
        checksums=spec.transport.checksums,
        endpoints=tuple(endpoints(group)) if slot.role == "trainer" else (),
        trainer_pods=spec.trainer.pods if slot.role == "trainer" else 1,
        trainer_pod_index=slot.replica if slot.role == "trainer" else 0,
        trainer_ranks_per_pod=spec.trainer.ranks_per_pod if slot.role == "trainer" else 1,
        engine_port=spec.engine.port,
        vllm_pause_mode=spec.engine.pause_mode,
        vllm_rendezvous=spec.engine.rendezvous,
    )


def env_vars(group: Group, slot: Slot) -> list[Obj]:
    """The operator's env entries for one member: the contract, the token reference, the NCCL settings."""
    out: list[Obj] = [{"name": k, "value": v} for k, v in member_env(group, slot).to_env().items() if k != c.TOKEN_ENV]
    out.append(
        {
            "name": c.TOKEN_ENV,
            "valueFrom": {"secretKeyRef": {"name": names.secret_name(group.name), "key": c.TOKEN_KEY}},
        }
    )
    out += [{"name": k, "value": v} for k, v in sorted(group.spec.network.nccl_env.items())]
    return out


def member_annotations(group: Group, slot: Slot, epoch: int) -> dict[str, str]:
    """The annotations the operator keeps current on a member (the epoch, and what changes with it)."""
    out = {EPOCH_ANNOTATION: str(epoch), WORLD_SIZE_ANNOTATION: str(group.spec.world_size)}
    if slot.role == "trainer":
        out[ENDPOINTS_ANNOTATION] = ",".join(endpoints(group))
    return out


def template_of(spec: WeightSyncSpec, role: str) -> Obj:
    return spec.trainer.template if role == "trainer" else spec.inference.template


def template_hash(spec: WeightSyncSpec, role: str) -> str:
    """A digest of the user's pod template for `role`: a member made from another one is out of date."""
    text = json.dumps(template_of(spec, role), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pod(group: Group, slot: Slot) -> Obj:
    """A member pod: the user's template plus the group wiring; the template's own fields are kept."""
    template = copy.deepcopy(template_of(group.spec, slot.role))
    user_meta = template.get("metadata") or {}
    spec: Obj = template["spec"]
    meta = _meta(group, slot.pod, slot.role, slot.replica)
    meta["labels"] = {**(user_meta.get("labels") or {}), **meta["labels"]}
    meta["annotations"] = {
        **(user_meta.get("annotations") or {}),
        **member_annotations(group, slot, group.epoch),
        c.TEMPLATE_HASH: template_hash(group.spec, slot.role),
    }
    if group.secret_uid:
        meta["annotations"][c.TOKEN_SECRET_UID] = group.secret_uid

    spec["hostname"] = slot.pod
    spec["subdomain"] = names.service_name(group.name)
    spec["restartPolicy"] = "Never"
    if group.spec.network.host_network:
        spec["hostNetwork"] = True
        spec.setdefault("dnsPolicy", "ClusterFirstWithHostNet")
    spec["volumes"] = [
        *(spec.get("volumes") or []),
        {
            "name": c.PODINFO_VOLUME,
            "downwardAPI": {"items": [{"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}]},
        },
    ]
    ours = env_vars(group, slot)
    for container in spec["containers"]:
        container["env"] = [*ours, *(container.get("env") or [])]
        container["volumeMounts"] = [
            *(container.get("volumeMounts") or []),
            {"name": c.PODINFO_VOLUME, "mountPath": PODINFO_MOUNT_PATH, "readOnly": True},
        ]
    if slot.role == "inference" and group.spec.transport.protocol == "vllm":
        engines.add_engine_wiring(spec["containers"][0], group.spec)
    _add_rdma(spec["containers"], group.spec.network.rdma_resource, group.spec.network.rdma_count)
    security.harden(spec, group.spec.network.rdma_resource)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def _sets_resource(container: Obj, resource: str) -> bool:
    resources = container.get("resources") or {}
    return any(resource in (resources.get(kind) or {}) for kind in ("limits", "requests"))


def _add_rdma(containers: list[Obj], resource: str | None, count: int) -> None:
    """The RDMA device, rdmaCount in limits and requests of the first container, unless a container already
    sets that resource (the template then decides how many, and where). Nothing else is touched."""
    if not resource or any(_sets_resource(container, resource) for container in containers):
        return
    first = containers[0]
    resources = first["resources"] = dict(first.get("resources") or {})
    for kind in ("limits", "requests"):
        resources[kind] = {**(resources.get(kind) or {}), resource: str(count)}


def pods(group: Group) -> dict[str, Obj]:
    """Every member pod, by name."""
    return {s.pod: pod(group, s) for s in slots(group.name, group.spec)}


def env_conflicts(spec: WeightSyncSpec) -> list[str]:
    """Template env the operator refuses: reserved WEIGHTSYNC_* names, and NCCL_* set by spec.network."""
    reserved = reserved_env_names()
    network = set(spec.network.nccl_env)
    problems = []
    for where, template in (("trainer", spec.trainer.template), ("inference", spec.inference.template)):
        for container in (template.get("spec") or {}).get("containers") or []:
            field = f"spec.{where}.template.spec.containers[{container.get('name', '?')}].env"
            for var in container.get("env") or []:
                name = var.get("name", "")
                if name in reserved:
                    problems.append(f"{field} sets {name}, which the operator owns")
                elif name in network:
                    problems.append(f"{field} sets {name}, which spec.network.ncclEnv sets for every member")
    return problems
