"""The WeightSync resource (group `weightsync.dev`, version `v1alpha1`) as pydantic models.

These models are the single source of truth for the CRD: `weightsync.api.crd` turns them into the
structural schema, so a field's description is what `kubectl explain` prints, and its default, bounds,
enum and CEL rules (`x-kubernetes-validations`) sit next to it here. The operator parses a WeightSync's
spec with the same models, so the cluster and the code can never disagree about a default.

Pod templates are kept as plain dicts (a core/v1 PodTemplateSpec): the CRD declares them as objects that
preserve unknown fields, with only the parts the operator relies on (containers, restartPolicy, hostname,
subdomain) declared and checked.

Pure pydantic: importable without kopf, a Kubernetes client or torch.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, field_validator
from pydantic.alias_generators import to_camel

from weightsync.contract import (
    DEFAULT_BUFFER_BYTES,
    DEFAULT_ENGINE_PORT,
    DEFAULT_NUM_BUFFERS,
    DEFAULT_PORT,
    DEFAULT_TIMEOUT_SECONDS,
    MAX_TRAINER_PODS,
    MAX_TRAINER_RANKS_PER_POD,
    Backend,
    Protocol,
    VllmPauseMode,
    VllmRendezvous,
)

GROUP = "weightsync.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "WeightSync"
PLURAL = "weightsyncs"
SINGULAR = "weightsync"
SHORT_NAMES = ("ws",)

#: Upper bound of `spec.inference.replicas` (keeps replica indices at 3 digits, and CEL costs bounded).
MAX_REPLICAS = 512
#: Upper bound of `spec.inference.workersPerReplica` (GPUs in one engine pod: TP x PP).
MAX_WORKERS_PER_REPLICA = 64
#: Longest WeightSync name: `<name>-inference-<replica>` is a pod hostname, a DNS label of 63 characters.
MAX_NAME_LENGTH = 63 - len("-inference-") - len(str(MAX_REPLICAS - 1))
#: A WeightSync's name also names its headless Service, so it must be a DNS-1035 label.
NAME_PATTERN = "^[a-z]([-a-z0-9]*[a-z0-9])?$"

#: Largest integer of a status field. The API server stores int64 (a larger value fails the whole status
#: write), and a CRD schema's bound is a float64, in which 2^63 - 1 is 2^63, out of int64 range: every
#: value would then fail the bound's check. 2^63 - 1024 is the largest int64 that a float64 holds exactly.
MAX_STATUS_INT = 2**63 - 1024

#: Kubernetes' rule for an extended resource name (`IsExtendedResourceName` in k8s.io/kubernetes
#: pkg/apis/core/helper): domain-qualified, not in the kubernetes.io domain, and `requests.<name>` (its quota
#: name) a qualified name: a DNS-1123 subdomain of at most 253 characters, '/', and a name of at most 63.
#: No backslashes: the pattern goes into a CEL string literal as it is.
EXTENDED_RESOURCE_PATTERN = (
    "^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9]$"
)
#: Longest domain of an extended resource name: `requests.<domain>` is at most 253 characters.
MAX_RESOURCE_DOMAIN_LENGTH = 253 - len("requests.")
MAX_RESOURCE_NAME_LENGTH = MAX_RESOURCE_DOMAIN_LENGTH + 1 + 63

Phase = Literal["Pending", "Forming", "Ready", "Degraded", "Failed"]
ConditionType = Literal["Ready", "Progressing", "Degraded", "Failed"]
ConditionStatus = Literal["True", "False", "Unknown"]
MemberRole = Literal["trainer", "inference"]


def cel(rule: str, message: str) -> dict[str, Any]:
    """One CEL validation rule (`x-kubernetes-validations` entry); `message` must name the field."""
    return {"rule": rule, "message": message}


def immutable(field: str) -> dict[str, Any]:
    """JSON-schema extra that makes a field immutable once the object exists (a CEL transition rule)."""
    return {
        "x-kubernetes-validations": [
            cel(
                "self == oldSelf",
                f"{field} is immutable: it is baked into every member's environment; "
                "delete and re-create the WeightSync to change it",
            )
        ]
    }


#: CEL rules at the root of the schema (only there can a rule see metadata.name).
ROOT_RULES = (
    cel(
        f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
        f"metadata.name must be at most {MAX_NAME_LENGTH} characters: the inference pods are named "
        "<name>-inference-<replica> and a pod's hostname is at most 63 characters",
    ),
    cel(
        f"self.metadata.name.matches('{NAME_PATTERN}')",
        "metadata.name must start with a lowercase letter and hold only lowercase letters, digits and '-' "
        "(it names the group's headless Service, a DNS-1035 label)",
    ),
)


#: spec.network.rdmaResource: (CEL rule, message, the same check in Python). The API server and the
#: operator's model apply the same rules, so a name admitted is a name the operator accepts.
_RDMA_RULES: tuple[tuple[str, str, Callable[[str], bool]], ...] = (
    (
        f"self.matches('{EXTENDED_RESOURCE_PATTERN}')",
        "spec.network.rdmaResource must be an extended resource name <domain>/<name> (for example rdma/ib or "
        "nvidia.com/gpu): a lowercase DNS subdomain, '/', and at most 63 letters, digits, '-', '_' or '.' "
        "that start and end with a letter or digit; Kubernetes' own resources (cpu, memory, "
        "ephemeral-storage, hugepages-*) are not extended resources",
        lambda name: re.fullmatch(EXTENDED_RESOURCE_PATTERN, name) is not None,
    ),
    (
        "!self.contains('kubernetes.io/')",
        "spec.network.rdmaResource must not be in the kubernetes.io domain (kubernetes.io/ and "
        "*.kubernetes.io/ names are Kubernetes' own resources, which no device plugin provides)",
        lambda name: "kubernetes.io/" not in name,
    ),
    (
        "!self.startsWith('requests.')",
        "spec.network.rdmaResource must not start with 'requests.' (Kubernetes keeps that prefix for quotas)",
        lambda name: not name.startswith("requests."),
    ),
    (
        f"self.indexOf('/') <= {MAX_RESOURCE_DOMAIN_LENGTH}",
        f"spec.network.rdmaResource: the domain before '/' must be at most {MAX_RESOURCE_DOMAIN_LENGTH} "
        "characters",
        lambda name: name.find("/") <= MAX_RESOURCE_DOMAIN_LENGTH,
    ),
)


def extended_resource_problem(name: str) -> str | None:
    """Why `name` is not an extended resource name that pods can request (None when it is one)."""
    return next((message for _, message, ok in _RDMA_RULES if not ok(name)), None)


def _pod_template_schema(who: str) -> dict[str, Any]:
    """The CRD schema of a PodTemplateSpec: open objects, with the fields the operator relies on declared."""
    return {
        "type": "object",
        "description": (
            f"Pod template of {who} (a core/v1 PodTemplateSpec). Everything in it is kept: env, volumes, "
            "resources, nodeSelector, tolerations, affinity, serviceAccountName. The operator adds its own "
            "labels, the epoch annotation, the WEIGHTSYNC_* environment, the podinfo volume, hostname, "
            "subdomain and restartPolicy Never."
        ),
        "x-kubernetes-preserve-unknown-fields": True,
        "required": ["spec"],
        "properties": {
            "metadata": {
                "type": "object",
                "description": "Labels and annotations added to the pod (the operator's own keys win); "
                "name and namespace are ignored.",
                "x-kubernetes-preserve-unknown-fields": True,
            },
            "spec": {
                "type": "object",
                "description": "The pod's spec (core/v1 PodSpec).",
                "x-kubernetes-preserve-unknown-fields": True,
                "required": ["containers"],
                "properties": {
                    "containers": {
                        "type": "array",
                        "description": "The pod's containers; each gets the WEIGHTSYNC_* environment and the "
                        "podinfo volume mount. The first one also gets the RDMA resource, if any, unless a "
                        "container already sets it.",
                        "minItems": 1,
                        "maxItems": 32,
                        "items": {
                            "type": "object",
                            "description": "A core/v1 Container.",
                            "x-kubernetes-preserve-unknown-fields": True,
                            "required": ["name"],
                            "properties": {
                                "name": {"type": "string", "description": "Name of the container."}
                            },
                        },
                    },
                    "restartPolicy": {
                        "type": "string",
                        "description": "Must be Never (the default here): a member that exits is replaced "
                        "by the operator at a new epoch, because a sync group cannot take back a "
                        "restarted rank in place.",
                        "enum": ["Never"],
                    },
                    "hostname": {
                        "type": "string",
                        "description": "Not allowed: the operator sets it to the pod's name.",
                    },
                    "subdomain": {
                        "type": "string",
                        "description": "Not allowed: the operator sets it to the group's headless Service.",
                    },
                },
                "x-kubernetes-validations": [
                    cel(
                        "!has(self.hostname) && !has(self.subdomain)",
                        f"template.spec.hostname and template.spec.subdomain of {who} are set by the "
                        "operator (pod name and headless Service); remove them",
                    )
                ],
            },
        },
    }


def _check_template(value: dict[str, Any]) -> dict[str, Any]:
    spec = value.get("spec")
    if not isinstance(spec, dict) or not isinstance(spec.get("containers"), list) or not spec["containers"]:
        raise ValueError("template.spec.containers must hold at least one container")
    return value


TrainerTemplate = Annotated[
    dict[str, Any], AfterValidator(_check_template), WithJsonSchema(_pod_template_schema("the trainer pod"))
]
InferenceTemplate = Annotated[
    dict[str, Any],
    AfterValidator(_check_template),
    WithJsonSchema(_pod_template_schema("each inference pod")),
]


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class TrainerSpec(_Model):
    """The trainer: one pod, or a job of several (FSDP across nodes); its rank 0 is the sync group's rank 0,
    the sender of the weights."""

    template: TrainerTemplate
    pods: int = Field(
        default=1,
        ge=1,
        le=MAX_TRAINER_PODS,
        description="Pods of the trainer's own job (`<name>-trainer-0` ... `-<pods-1>`, each with a stable DNS "
        "name under the group's Service). Each gets WEIGHTSYNC_TRAINER_PODS, WEIGHTSYNC_TRAINER_POD_INDEX and "
        "WEIGHTSYNC_TRAINER_RANKS_PER_POD for `torchrun --nnodes --node-rank`, with pod 0 "
        "(WEIGHTSYNC_MASTER_ADDR) as the rendezvous endpoint. A lost trainer pod loses the job: every trainer pod "
        "is re-created, together, at a new epoch. Immutable.",
        json_schema_extra=immutable("spec.trainer.pods"),
    )
    ranks_per_pod: int = Field(
        default=1,
        ge=1,
        le=MAX_TRAINER_RANKS_PER_POD,
        description="Ranks (GPUs) of the trainer's job in each trainer pod (torchrun's --nproc-per-node). "
        "Immutable.",
        json_schema_extra=immutable("spec.trainer.ranksPerPod"),
    )


class InferenceSpec(_Model):
    """The inference engines: `replicas` pods of `workersPerReplica` ranks each, the receivers."""

    replicas: int = Field(
        default=1,
        ge=1,
        le=MAX_REPLICAS,
        description="Number of inference engine pods (the scale subresource points here). Replica r gets "
        "rank offset 1 + r x workersPerReplica. Changing it re-forms the group at a new epoch.",
    )
    workers_per_replica: int = Field(
        default=1,
        ge=1,
        le=MAX_WORKERS_PER_REPLICA,
        description="Ranks (GPUs) inside one engine pod, its tensor x pipeline parallel size; worker k of "
        "replica r is rank 1 + r x workersPerReplica + k. Immutable.",
        json_schema_extra=immutable("spec.inference.workersPerReplica"),
    )
    template: InferenceTemplate


class RendezvousSpec(_Model):
    """Where and how long members meet: a TCP store hosted by the trainer at its DNS name."""

    port: int = Field(
        default=DEFAULT_PORT,
        ge=1,
        le=65535,
        description="TCP port of the rendezvous store on the trainer, and the headless Service's port. "
        "With hostNetwork, two groups on one node need different ports.",
    )
    timeout_seconds: float = Field(
        default=DEFAULT_TIMEOUT_SECONDS,
        gt=0,
        le=86400,
        description="Bound in seconds on every wait of the runtime: rendezvous, each sync, acknowledgements.",
    )


class TransportSpec(_Model):
    """How the weights move. Immutable: every member's environment carries it."""

    backend: Backend = Field(default="nccl", description="Communicator: `nccl` on GPUs, `gloo` on CPU.")
    protocol: Protocol = Field(
        default="weightsync",
        description="Wire protocol: `weightsync` (native, with an in-band manifest) or `vllm` (the inference "
        "pods are stock vLLM servers, driven over their HTTP API and vLLM's NCCL weight-transfer wire; see "
        "spec.engine). Stock vLLM speaks NCCL only: `vllm` with `gloo` is for CPU stand-ins in tests.",
    )
    packed: bool = Field(
        default=True, description="Pack tensors into shared buffers instead of one per tensor."
    )
    buffer_size_bytes: int = Field(
        default=DEFAULT_BUFFER_BYTES,
        ge=1 << 16,
        le=1 << 36,
        description="Size in bytes of each packing buffer (64 KiB to 64 GiB; default 1 GiB).",
    )
    num_buffers: int = Field(
        default=DEFAULT_NUM_BUFFERS, ge=1, le=8, description="Packing buffers in flight at once (1 to 8)."
    )
    checksums: bool = Field(default=False, description="Verify a checksum of every chunk on every receiver.")


class NetworkSpec(_Model):
    """The network every member uses. Immutable: NCCL hangs when members disagree on its settings."""

    host_network: bool = Field(
        default=False, description="Run every member pod in the node's network namespace (hostNetwork)."
    )
    nccl_env: dict[str, str] = Field(
        default_factory=dict,
        max_length=64,
        description="NCCL_* variables (NCCL_IB_HCA, NCCL_SOCKET_IFNAME, ...) given identically to every "
        "member, so that no two members of one communicator disagree. A template may not set them too.",
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.all(k, k.startsWith('NCCL_'))",
                    "spec.network.ncclEnv holds NCCL_* variables only; "
                    "put other variables in the pod templates",
                )
            ]
        },
    )
    rdma_resource: str | None = Field(
        default=None,
        max_length=MAX_RESOURCE_NAME_LENGTH,
        description="Extended resource name of an RDMA device (for example rdma/ib), as Kubernetes defines "
        "one: <domain>/<name>, not in the kubernetes.io domain. When set, the first container of every "
        "member requests and limits rdmaCount of it, unless a container of the template already sets that "
        "resource (in requests or limits): the template's own resources are never changed.",
        json_schema_extra={"x-kubernetes-validations": [cel(rule, message) for rule, message, _ in _RDMA_RULES]},
    )
    rdma_count: int = Field(
        default=1, ge=1, le=16, description="How many rdmaResource devices each member gets."
    )
    network_policy: bool = Field(
        default=True,
        description="Create a NetworkPolicy `<name>` admitting traffic to the group's pods only from the group's "
        "own pods (rendezvous, data and, for protocol vllm, the engines' HTTP port) and from the weightsync "
        "operator. Policies add up: admit your own clients (an inference gateway) with a policy of yours. "
        "hostNetwork pods are not subject to NetworkPolicy.",
    )

    @field_validator("nccl_env")
    @classmethod
    def _nccl_only(cls, value: dict[str, str]) -> dict[str, str]:
        others = sorted(k for k in value if not k.startswith("NCCL_"))
        if others:  # the CRD's CEL rule says the same, so the models and the API server agree
            raise ValueError(f"holds NCCL_* variables only, not {', '.join(others)}; put other variables in the "
                             "pod templates")
        return value

    @field_validator("rdma_resource")
    @classmethod
    def _extended_resource(cls, value: str | None) -> str | None:
        problem = None if value is None else extended_resource_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value


class FailurePolicy(_Model):
    """What happens when a member fails or vanishes: the group re-forms at a new epoch, up to a bound."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.maxBackoffSeconds >= self.backoffSeconds",
                    "spec.failurePolicy.maxBackoffSeconds must be at least spec.failurePolicy.backoffSeconds",
                )
            ]
        }
    )

    max_restarts: int = Field(
        default=10,
        ge=0,
        le=10000,
        description="Member failures (a pod that failed, exited or vanished) tolerated over the object's "
        "life; one more and the WeightSync is Failed. Raising it resumes a Failed group.",
    )
    backoff_seconds: float = Field(
        default=1.0,
        ge=0,
        le=3600,
        description="Delay before a lost member is re-created; doubles with every restart of the current "
        "streak (see backoffResetSeconds).",
    )
    max_backoff_seconds: float = Field(
        default=60.0, ge=0, le=86400, description="Upper bound of that delay in seconds."
    )
    backoff_reset_seconds: float = Field(
        default=600.0,
        ge=1,
        le=604800,
        description="A failure this many seconds or more after the previous one starts a new streak: its "
        "backoff is backoffSeconds again (as the kubelet's crash-loop backoff resets after 10 minutes). "
        "maxRestarts still counts every failure over the object's life.",
    )

    def backoff(self, restarts: int) -> float:
        """Seconds to wait before re-creating members after the `restarts`-th failure of a streak."""
        if restarts <= 0 or self.backoff_seconds == 0:
            return 0.0
        return float(min(self.max_backoff_seconds, self.backoff_seconds * 2 ** min(restarts - 1, 32)))


class EngineSpec(_Model):
    """Protocol `vllm`: how the trainer reaches and drives the engine servers (vLLM's HTTP API)."""

    port: int = Field(
        default=DEFAULT_ENGINE_PORT,
        ge=1,
        le=65535,
        description="HTTP port of every engine server (`vllm serve --port`, default 8000); the operator checks "
        "the template's command against it, and points the readiness probe (`/health`) and the trainer at it.",
    )
    pause_mode: VllmPauseMode = Field(
        default="keep",
        description="How each engine pauses around a weight update (`POST /pause?mode=`): keep (requests wait), "
        "wait (drain them first), abort (abort them).",
    )
    rendezvous: VllmRendezvous = Field(
        default="unique-id",
        description="How the engines join the trainer's NCCL communicator: unique-id (the NCCL id in the init "
        "request; nothing is unpickled) or tcp-store (vLLM's TCP form: a torch TCPStore on the trainer holds "
        "a pickled id that every engine unpickles; anyone reaching that port can write there).",
    )


UpdateStrategyType = Literal["OnDelete", "Replace"]


class UpdateStrategy(_Model):
    """How members made from an older pod template are brought up to date."""

    type: UpdateStrategyType = Field(
        default="OnDelete",
        description="OnDelete (the default): a member is re-created from the current template only when its pod "
        "is deleted; deleting a member that is out of date is a change, not a failure (no restart budget, "
        "no backoff). Replace: the operator replaces every out-of-date member itself, all at once, at the "
        "cost of one epoch and no restart budget.",
    )


def _defaults(model: type[_Model]) -> dict[str, Any]:
    """The whole default of an optional section (the API server checks an object default against its CEL
    rules before defaulting inside it, so `{}` would not do)."""
    out: dict[str, Any] = model().model_dump(by_alias=True, exclude_none=True, mode="json")
    return out


class WeightSyncSpec(_Model):
    """The desired sync group: one trainer pod and `replicas` inference pods wired into one group."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.network.rdmaResource) || self.transport.backend == 'nccl'",
                    "spec.network.rdmaResource needs spec.transport.backend 'nccl' (gloo does not use RDMA)",
                )
            ]
        }
    )

    trainer: TrainerSpec = Field(description="The trainer pod (rank 0, the sender).")
    inference: InferenceSpec = Field(description="The inference engine pods (the receivers).")
    rendezvous: RendezvousSpec = Field(
        default_factory=RendezvousSpec,
        description="Rendezvous port and timeouts. Immutable.",
        json_schema_extra={"default": _defaults(RendezvousSpec), **immutable("spec.rendezvous")},
    )
    transport: TransportSpec = Field(
        default_factory=TransportSpec,
        description="Backend, wire protocol and packing. Immutable.",
        json_schema_extra={"default": _defaults(TransportSpec), **immutable("spec.transport")},
    )
    network: NetworkSpec = Field(
        default_factory=NetworkSpec,
        description="hostNetwork, NCCL environment and RDMA devices. Immutable.",
        json_schema_extra={"default": _defaults(NetworkSpec), **immutable("spec.network")},
    )
    engine: EngineSpec = Field(
        default_factory=EngineSpec,
        description="Protocol `vllm`: the engine servers' port, pause mode and rendezvous form. Immutable.",
        json_schema_extra={"default": _defaults(EngineSpec), **immutable("spec.engine")},
    )
    failure_policy: FailurePolicy = Field(
        default_factory=FailurePolicy,
        description="Bound and backoff of member restarts.",
        json_schema_extra={"default": _defaults(FailurePolicy)},
    )
    update_strategy: UpdateStrategy = Field(
        default_factory=UpdateStrategy,
        description="How a changed pod template reaches members that exist.",
        json_schema_extra={"default": _defaults(UpdateStrategy)},
    )

    @property
    def world_size(self) -> int:
        """Ranks in the group: the trainer plus every inference worker."""
        return 1 + self.inference.replicas * self.inference.workers_per_replica


# --- status ---------------------------------------------------------------------------------------------


class _StatusModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)


class Condition(_StatusModel):
    """A metav1.Condition: one aspect of the group's state, with the reason it is so."""

    type: ConditionType = Field(description="Ready, Progressing, Degraded or Failed.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(description="CamelCase reason of the last transition.")
    message: str = Field(default="", description="Human-readable detail.")
    last_transition_time: str = Field(
        description="When the status last changed (RFC 3339).", json_schema_extra={"format": "date-time"}
    )
    observed_generation: int | None = Field(
        default=None, description="metadata.generation the condition was computed for."
    )


class Member(_StatusModel):
    """One member pod of the group."""

    pod: str = Field(description="Name of the member pod.")
    role: MemberRole = Field(description="trainer or inference.")
    rank_offset: int = Field(description="Group rank of the pod's first worker.")
    local_world_size: int = Field(description="Ranks (workers) in the pod.")
    ready: bool = Field(description="The pod is Ready.")
    up_to_date: bool | None = Field(
        default=None,
        description="The pod was made from the current template (see spec.updateStrategy); deleting a member "
        "that is not up to date is a change, not a failure.",
    )


#: Bounds of the trainer's report (the pod annotation weightsync.dev/last-sync, which the trainer writes and
#: the operator copies into status.lastSync): it is untrusted input, and a value the API server cannot store
#: would fail every status write.
MAX_SYNC_REPORT_BYTES = 16 * 1024
MAX_TRANSPORT_LENGTH = 128
MAX_TIME_LENGTH = 64
#: RFC 3339 as Go's time.RFC3339Nano parses it (a strict subset: upper-case T and Z, at most 9 fraction digits).
RFC3339_PATTERN = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})"
)


def _check_rfc3339(value: str | None) -> str | None:
    if value is None:
        return value
    valid = RFC3339_PATTERN.fullmatch(value) is not None
    if valid:
        try:
            datetime.fromisoformat(value)
        except ValueError:
            valid = False
    if not valid:
        raise ValueError("must be an RFC 3339 timestamp such as 2026-01-01T00:00:00Z")
    return value


def _count(what: str) -> Any:
    return Field(default=None, ge=0, le=MAX_STATUS_INT, description=f"{what} (0 to 2^63 - 1024).")


def _measure(what: str) -> Any:
    return Field(default=None, ge=0, allow_inf_nan=False, description=f"{what} (finite, at least 0).")


class LastSync(_StatusModel):
    """The trainer's report of its latest sync, copied from its pod's annotation weightsync.dev/last-sync.

    Parsed strictly (no strings for numbers) within bounds the API server can store; other fields of the
    report are ignored. A report out of bounds is dropped with an InvalidSyncReport event (see
    rejectedSyncReport) and the previous lastSync stays.
    """

    model_config = ConfigDict(strict=True)

    version: int = Field(
        ge=0, le=MAX_STATUS_INT, description="Weights version sent (the trainer's step; 0 to 2^63 - 1024)."
    )
    tensors: int | None = _count("Tensors sent")
    bytes: int | None = _count("Bytes sent")
    seconds: float | None = _measure("Wall time of the sync in seconds")
    gbps: float | None = _measure("Throughput in GB/s, 1e9 bytes per second")
    transport: str | None = Field(
        default=None,
        max_length=MAX_TRANSPORT_LENGTH,
        description="Transport actually used (for example NCCL over IB, NCCL over sockets, gloo).",
    )
    epoch: int | None = _count("Group epoch the sync ran at")
    time: Annotated[str | None, AfterValidator(_check_rfc3339)] = Field(
        default=None,
        max_length=MAX_TIME_LENGTH,
        description="When the sync finished (RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )


class RejectedSyncReport(_StatusModel):
    """The last trainer report the operator dropped, and why (each distinct bad report is announced once)."""

    digest: str = Field(
        max_length=64, description="SHA-256 (hex) of the rejected weightsync.dev/last-sync annotation value."
    )
    message: str = Field(max_length=1024, description="What is wrong with it: the field and why.")
    time: str = Field(
        description="When the operator rejected it (RFC 3339).", json_schema_extra={"format": "date-time"}
    )


class WeightSyncStatus(_StatusModel):
    """What the operator observed and decided; written by the operator only."""

    phase: Phase | None = Field(
        default=None,
        description="Pending (members being created), Forming (members starting or re-joining), Ready (every "
        "member Ready at the current epoch), Degraded (re-forming after a member failure), Failed (invalid "
        "spec or failurePolicy.maxRestarts exceeded; see the Failed condition).",
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready, Progressing, Degraded and Failed, each with a reason and a message.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(
        default=None, description="metadata.generation of the spec this status reflects."
    )
    epoch: int | None = Field(
        default=None,
        description="Group generation: bumped whenever membership changes (a member failed or vanished, or a "
        "scale); members see it in their weightsync.dev/epoch annotation and re-form the group.",
    )
    world_size: int | None = Field(default=None, description="Ranks in the group at the current epoch.")
    replicas: int | None = Field(
        default=None, description="Inference pods that exist (the scale subresource's status replicas)."
    )
    selector: str | None = Field(
        default=None, description="Label selector of the inference pods (for the scale subresource)."
    )
    ready: str | None = Field(default=None, description="Ready members out of desired members, as 'n/m'.")
    trainer_ready: str | None = Field(
        default=None, description="Ready trainer pods out of spec.trainer.pods, as 'n/m'."
    )
    members: list[Member] = Field(default_factory=list, description="The member pods that exist.")
    restarts: int | None = Field(default=None, description="Member failures so far (see failurePolicy).")
    restart_streak: int | None = Field(
        default=None,
        description="Member failures of the current streak: the backoff doubles with each; a failure "
        "failurePolicy.backoffResetSeconds after the previous one starts a new streak.",
    )
    last_failure_time: str | None = Field(
        default=None,
        description="When the operator last saw a member fail or vanish (RFC 3339); "
        "the backoff counts from it.",
        json_schema_extra={"format": "date-time"},
    )
    last_sync: LastSync | None = Field(default=None, description="The trainer's latest sync report.")
    rejected_sync_report: RejectedSyncReport | None = Field(
        default=None,
        description="The trainer's last report that was out of bounds and dropped (an InvalidSyncReport event "
        "says the same); cleared by the next valid report.",
    )


def parse_spec(spec: dict[str, Any]) -> WeightSyncSpec:
    """Parse (and default) a WeightSync's spec as the API server stores it."""
    return WeightSyncSpec.model_validate(spec)
