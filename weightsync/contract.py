"""The env contract between the operator (which writes it) and the runtime (which reads it).

Every variable the operator injects into a member pod is a field of `MemberEnv`; the variable's name is
`WEIGHTSYNC_` plus the field name in upper case. Only prefixed names are used: a trainer's own
torch.distributed job owns MASTER_ADDR, RANK and friends and they must not be clobbered.

Pure pydantic: importable without torch or kopf.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import logging
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

log = logging.getLogger("weightsync.contract")

ENV_PREFIX = "WEIGHTSYNC_"

Role = Literal["trainer", "inference"]
Backend = Literal["nccl", "gloo"]
Protocol = Literal["weightsync", "vllm"]
#: How a vLLM engine's scheduler pauses around a weight update (vLLM's `POST /pause?mode=`): `keep` queues
#: requests in flight and new ones, `wait` drains them first, `abort` aborts them.
VllmPauseMode = Literal["keep", "wait", "abort"]
#: How vLLM engines join the trainer's communicator: the NCCL unique id in the init request, or vLLM's
#: TCP-store form (the engines read a pickled id from a torch TCPStore the trainer hosts).
VllmRendezvous = Literal["unique-id", "tcp-store"]

#: The pod annotation holding the group epoch; projected into members through a downward-API volume.
EPOCH_ANNOTATION = "weightsync.dev/epoch"
#: Where the downward-API volume with the pod's annotations is mounted inside every member container.
PODINFO_MOUNT_PATH = "/etc/weightsync/podinfo"
#: The file of that volume that holds the annotations (`key="value"` lines, the downward API's format).
ANNOTATIONS_FILE = f"{PODINFO_MOUNT_PATH}/annotations"

#: The group's current world size and, on the trainer, the inference pods' DNS names: a scale changes
#: both without restarting the survivors, whose env still holds the values from their creation.
WORLD_SIZE_ANNOTATION = "weightsync.dev/world-size"
ENDPOINTS_ANNOTATION = "weightsync.dev/endpoints"
#: The trainer pod's annotation carrying its last sync report (JSON of `SyncReport`), which the operator
#: aggregates into `status.lastSync`. The trainer may patch its own pod and nothing else (see docs/).
LAST_SYNC_ANNOTATION = "weightsync.dev/last-sync"

#: The trainer is rank 0 of every sync group, the sender of every broadcast.
TRAINER_RANK = 0

DEFAULT_PORT = 29500
DEFAULT_BUFFER_BYTES = 1 << 30
DEFAULT_NUM_BUFFERS = 2
DEFAULT_TIMEOUT_SECONDS = 300.0
#: vLLM's `vllm serve --port` default.
DEFAULT_ENGINE_PORT = 8000

# The bounds of the env fields, the same as the CRD's bounds of the spec fields they are written from
# (weightsync/api/models.py, which imports this module and so cannot be imported here; a unit test keeps
# the two in step). A value the API server would refuse is refused here too, so a hand-set or stale
# variable cannot make a member wait forever (WEIGHTSYNC_TIMEOUT_SECONDS=inf) or allocate without bound.
#: spec.rendezvous.timeoutSeconds: 0 < t <= one day.
MAX_TIMEOUT_SECONDS = 86400
#: spec.transport.bufferSizeBytes: 64 KiB to 64 GiB.
MIN_BUFFER_BYTES = 1 << 16
MAX_BUFFER_BYTES = 1 << 36
#: spec.transport.numBuffers: 1 to 8.
MAX_NUM_BUFFERS = 8
#: spec.trainer.pods and spec.trainer.ranksPerPod: the trainer's own job, at most 64 pods of 64 ranks.
MAX_TRAINER_PODS = 64
MAX_TRAINER_RANKS_PER_POD = 64
#: spec.inference.workersPerReplica: at most 64 workers (ranks) in one pod.
MAX_LOCAL_WORLD_SIZE = 64
#: 1 + spec.inference.replicas (at most 512) x spec.inference.workersPerReplica (at most 64).
MAX_WORLD_SIZE = 1 + 512 * MAX_LOCAL_WORLD_SIZE

#: `WEIGHTSYNC_*` variables that are not part of the member contract but are read by other parts of this
#: project (exact names). `MemberEnv.from_env` warns about any other non-contract `WEIGHTSYNC_*` variable
#: (most likely a misspelling), but not about these.
OTHER_VARIABLES = frozenset(
    {
        # runtime/nccl.py: path of the libnccl.so the vLLM-protocol communicator loads.
        "WEIGHTSYNC_NCCL_LIBRARY",
        # operator/__main__.py: the operator process's own settings.
        "WEIGHTSYNC_WATCH_NAMESPACES",
        "WEIGHTSYNC_PEERING_PRIORITY",
        "WEIGHTSYNC_LIVENESS_PORT",
        "WEIGHTSYNC_METRICS_PORT",
        "WEIGHTSYNC_RESYNC_SECONDS",
        "WEIGHTSYNC_STANDALONE",
        # hack/venv.sh, hack/build-sandbox-bins.sh: the cache directory and the control-plane versions.
        "WEIGHTSYNC_CACHE",
        "WEIGHTSYNC_K8S_VERSION",
        "WEIGHTSYNC_ETCD_VERSION",
        "WEIGHTSYNC_HELM_VERSION",
        # sandbox/paths.py: the checkout holding hack/ (for the sandbox's build script).
        "WEIGHTSYNC_REPO_ROOT",
        # tests/unit/test_docker.py: the hadolint binary.
        "WEIGHTSYNC_HADOLINT",
    }
)
#: Prefixes of further non-contract variables: the soak's (tests/e2e/test_soak.py) and the sandbox's
#: settings (WEIGHTSYNC_SANDBOX_STATE, _BIN_DIR, _SUBNET, _NODE_*, _BACKOFF_*; sandbox/, hack/, tests/,
#: examples/demo/).
OTHER_PREFIXES = ("WEIGHTSYNC_SANDBOX_", "WEIGHTSYNC_SOAK")
#: The annotations file is a few KiB; a larger one is refused rather than read whole (it is re-read often).
MAX_ANNOTATIONS_BYTES = 1 << 20
#: Annotations whose value must be a non-negative integer.
INTEGER_ANNOTATIONS = (EPOCH_ANNOTATION, WORLD_SIZE_ANNOTATION)


class ContractError(ValueError):
    """The environment does not hold a valid weightsync contract; the message names each bad variable."""


class MemberEnv(BaseModel):
    """What one member pod of a sync group knows about the group, read from `WEIGHTSYNC_*` variables."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, description="Name of the WeightSync object this pod belongs to.")
    namespace: str = Field(min_length=1, description="Namespace of the WeightSync object.")
    role: Role = Field(description="`trainer` (rank 0, the sender) or `inference` (a receiving engine).")
    master_addr: str = Field(
        min_length=1, description="DNS name or address of the trainer pod, which hosts the rendezvous store."
    )
    master_port: int = Field(
        default=DEFAULT_PORT, ge=1, le=65535, description="TCP port of the rendezvous store on the trainer."
    )
    world_size: int = Field(
        ge=2, le=MAX_WORLD_SIZE, description="Ranks in the sync group: 1 + replicas x workersPerReplica."
    )
    rank_offset: int = Field(
        ge=0,
        le=MAX_WORLD_SIZE - 1,
        description="Group rank of this pod's first worker; worker k of the pod is rank offset + k.",
    )
    local_world_size: int = Field(ge=1, le=MAX_LOCAL_WORLD_SIZE, description="Workers (GPUs, ranks) in this pod.")
    backend: Backend = Field(default="nccl", description="Communicator: `nccl` on GPUs, `gloo` on CPU.")
    protocol: Protocol = Field(
        default="weightsync",
        description="Wire protocol: `weightsync` (native, in-band manifest) or `vllm` (vLLM's NCCL engine).",
    )
    packed: bool = Field(default=True, description="Pack tensors into shared buffers instead of one per tensor.")
    buffer_bytes: int = Field(
        default=DEFAULT_BUFFER_BYTES,
        ge=MIN_BUFFER_BYTES,
        le=MAX_BUFFER_BYTES,
        description="Size in bytes of each packing buffer.",
    )
    num_buffers: int = Field(
        default=DEFAULT_NUM_BUFFERS, ge=1, le=MAX_NUM_BUFFERS, description="Packing buffers in flight at once."
    )
    timeout_seconds: float = Field(
        default=DEFAULT_TIMEOUT_SECONDS,
        gt=0,
        le=MAX_TIMEOUT_SECONDS,
        allow_inf_nan=False,
        description="Bound in seconds on every wait: rendezvous, sync, ack.",
    )
    token: str = Field(
        min_length=16,
        repr=False,
        description="Per-group secret from the operator's Secret; namespaces the rendezvous keys.",
    )
    epoch: int = Field(
        default=0, ge=0, description="Group epoch at pod creation; the annotations file, when present, wins."
    )
    annotations_file: str = Field(
        default=ANNOTATIONS_FILE,
        description="Downward-API file with the pod's annotations, read for the current epoch.",
    )
    checksums: bool = Field(default=False, description="Verify a checksum of every chunk on every receiver.")
    trainer_pods: int = Field(
        default=1,
        ge=1,
        le=MAX_TRAINER_PODS,
        description="Trainer only: pods of the trainer's own job (torchrun --nnodes); pod 0, at "
        "WEIGHTSYNC_MASTER_ADDR, is its rendezvous endpoint and holds the sync group's rank 0.",
    )
    trainer_pod_index: int = Field(
        default=0,
        ge=0,
        lt=MAX_TRAINER_PODS,
        description="Trainer only: this pod's index in the trainer's job (torchrun --node-rank).",
    )
    trainer_ranks_per_pod: int = Field(
        default=1,
        ge=1,
        le=MAX_TRAINER_RANKS_PER_POD,
        description="Trainer only: ranks of the trainer's job in each trainer pod (torchrun --nproc-per-node).",
    )
    endpoints: tuple[str, ...] = Field(
        default=(),
        description="Trainer only: the inference pods' DNS names, comma-separated, in replica order.",
    )
    engine_port: int = Field(
        default=DEFAULT_ENGINE_PORT,
        ge=1,
        le=65535,
        description="Protocol `vllm`: the HTTP port of every engine server; the trainer drives "
        "`http://<endpoint>:<port>` for each endpoint.",
    )
    engine_urls: tuple[str, ...] = Field(
        default=(),
        description="Protocol `vllm`, trainer only: the engines' base URLs (`http(s)://host[:port]`, no path), "
        "comma-separated, in replica order; when set, used instead of the endpoints and the engine port.",
    )
    vllm_pause_mode: VllmPauseMode = Field(
        default="keep",
        description="Protocol `vllm`: `POST /pause?mode=` before each update: `keep` (requests wait), `wait` "
        "(drain first), `abort` (abort them).",
    )
    vllm_rendezvous: VllmRendezvous = Field(
        default="unique-id",
        description="Protocol `vllm` on NCCL: `unique-id` (the id in the init request) or `tcp-store` (a "
        "torch TCPStore on the master port holding a pickled id, which the engines unpickle).",
    )

    @field_validator("engine_urls")
    @classmethod
    def _base_urls(cls, urls: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_base_url(u) for u in urls)

    @field_validator("master_addr")
    @classmethod
    def _master_host(cls, host: str) -> str:
        return check_host(host)

    @field_validator("endpoints")
    @classmethod
    def _endpoint_hosts(cls, hosts: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_host(h) for h in hosts)

    @model_validator(mode="after")
    def _ranks_fit(self) -> MemberEnv:
        if self.rank_offset + self.local_world_size > self.world_size:
            raise ValueError(
                f"WEIGHTSYNC_RANK_OFFSET ({self.rank_offset}) + WEIGHTSYNC_LOCAL_WORLD_SIZE "
                f"({self.local_world_size}) exceeds WEIGHTSYNC_WORLD_SIZE ({self.world_size})"
            )
        if self.role == "trainer" and (self.rank_offset, self.local_world_size) != (0, 1):
            raise ValueError("the trainer is rank 0 alone: WEIGHTSYNC_RANK_OFFSET=0, WEIGHTSYNC_LOCAL_WORLD_SIZE=1")
        if self.trainer_pod_index >= self.trainer_pods:
            raise ValueError(
                f"WEIGHTSYNC_TRAINER_POD_INDEX ({self.trainer_pod_index}) must be below WEIGHTSYNC_TRAINER_PODS "
                f"({self.trainer_pods})"
            )
        if self.role == "inference" and self.rank_offset == 0:
            raise ValueError("rank 0 belongs to the trainer: an inference pod needs WEIGHTSYNC_RANK_OFFSET >= 1")
        return self

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> MemberEnv:
        """Read the contract from `environ` (default: os.environ); errors name each bad variable.

        A `WEIGHTSYNC_*` variable that is neither in the contract nor one the project reads elsewhere
        (`OTHER_VARIABLES`, `OTHER_PREFIXES`) is logged as a warning, once per process, with the closest
        valid name: a misspelled variable would otherwise be ignored without a word."""
        environ = os.environ if environ is None else environ
        _warn_unknown(environ)
        raw: dict[str, Any] = {}
        for field in cls.model_fields:
            value = environ.get(env_name(field))
            if value is None:
                continue
            raw[field] = tuple(v for v in value.split(",") if v) if field in _LIST_FIELDS else value
        try:
            return cls.model_validate(raw)
        except ValidationError as err:
            raise ContractError(_describe(err, environ)) from None

    def to_env(self) -> dict[str, str]:
        """The variables that carry this contract, as the operator writes them into a pod spec."""
        env: dict[str, str] = {}
        for field, value in self.model_dump().items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, tuple):
                text = ",".join(value)
            else:
                text = str(value)
            env[env_name(field)] = text
        return env

    def engine_membership(self) -> tuple[int, int, tuple[str, ...]]:
        """Protocol `vllm`, on the trainer: (epoch, world size, the engines' base URLs) as the operator last
        published them, from one read of the annotations file. The URLs are `WEIGHTSYNC_ENGINE_URLS` when
        set, else `http://<endpoint>:<engine_port>` for each inference pod in the endpoints annotation (a
        scale changes it without restarting the trainer), or in `WEIGHTSYNC_ENDPOINTS` before the file
        exists."""
        annotations = read_annotations(Path(self.annotations_file))
        epoch, world_size = self._membership_of(annotations)
        if self.engine_urls:
            return epoch, world_size, self.engine_urls
        published = annotations.get(ENDPOINTS_ANNOTATION)
        hosts = tuple(h for h in published.split(",") if h) if published is not None else self.endpoints
        urls = []
        for host in hosts:
            where = f"[{host}]" if ":" in host and not host.startswith("[") else host
            try:
                check_host(host)  # the annotation's hosts get the check the variable's got at parse time
                urls.append(check_base_url(f"http://{where}:{self.engine_port}"))
            except ValueError as err:
                source = (f"annotations file {self.annotations_file}: annotation {ENDPOINTS_ANNOTATION}"
                          if published is not None else env_name("endpoints"))
                raise ContractError(f"{source}: endpoint {_clip(host)} is not a host name: {err}") from None
        return epoch, world_size, tuple(urls)

    def current_epoch(self) -> int:
        """The epoch from the annotations file when it is there (the operator bumps it), else `epoch`."""
        return self.membership()[0]

    def membership(self) -> tuple[int, int]:
        """(epoch, world size) as the operator last published them, read together from one file read;
        the env's values until the annotations file exists. A malformed file raises ContractError."""
        return self._membership_of(read_annotations(Path(self.annotations_file)))

    def _membership_of(self, annotations: Mapping[str, str]) -> tuple[int, int]:
        epoch = int(annotations.get(EPOCH_ANNOTATION, self.epoch))
        world_size = int(annotations.get(WORLD_SIZE_ANNOTATION, self.world_size))
        if not 2 <= world_size <= MAX_WORLD_SIZE:
            raise ContractError(f"annotations file {self.annotations_file}: annotation {WORLD_SIZE_ANNOTATION}: "
                                f"value {world_size} is outside 2..{MAX_WORLD_SIZE}")
        return epoch, world_size


#: Fields whose variable is a comma-separated list.
_LIST_FIELDS = ("endpoints", "engine_urls")


_DNS_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def check_host(host: str) -> str:
    """`host` as a DNS name (RFC 1123 labels; `_` allowed, a final `.` too) or an IPv4/IPv6 address, as
    a socket connects to it: no scheme, port, path or space. Raises ValueError saying what is wrong."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    if len(name) <= 253 and name and all(_DNS_LABEL.fullmatch(label) for label in name.split(".")):
        return host
    hint = ""
    if host.startswith("[") and host.endswith("]"):
        hint = ": an IPv6 address goes without brackets"
    elif "://" in host or "/" in host:
        hint = ": a host only, without a scheme or a path"
    elif ":" in host:
        hint = ": a host only (the port is its own variable)"
    raise ValueError(f"{host!r} is not a DNS name or an IP address{hint}")


def check_base_url(url: str) -> str:
    """`url` as an engine's base URL: `http(s)://host[:port]` with no credentials, path, query or fragment
    (a trailing `/` is dropped). Raises ValueError saying what is wrong."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a port that is not a number in 0..65535
    except ValueError as err:
        raise ValueError(f"engine URL {url!r}: {err}") from None
    problem = ""
    if parts.scheme not in ("http", "https"):
        problem = "the scheme must be http or https"
    elif not parts.hostname:
        problem = "no host"
    elif parts.username is not None or parts.password is not None:
        problem = "credentials are not allowed"
    elif parts.path not in ("", "/"):
        problem = f"a path ({parts.path!r}) is not allowed: give the server's base URL"
    elif parts.query or parts.fragment or url.endswith(("?", "#")):
        problem = "a query or fragment is not allowed"
    elif port == 0:
        problem = "port 0"
    if problem:
        raise ValueError(f"engine URL {url!r}: {problem} (expected http(s)://host[:port])")
    return f"{parts.scheme}://{parts.netloc}"


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def reserved_env_names() -> frozenset[str]:
    """Every variable the operator owns; a user template that sets one of these is refused."""
    return frozenset(env_name(f) for f in MemberEnv.model_fields)


def read_annotations(annotations_file: Path) -> dict[str, str]:
    """Parse a downward-API annotations file (`key="value"` per line, values JSON-quoted); {} if absent
    (before the kubelet has written the volume, or outside Kubernetes).

    Raises ContractError naming the file (and the annotation key and value, where one is at fault) when
    the file cannot be read, is larger than MAX_ANNOTATIONS_BYTES, holds a value that is not valid JSON,
    or holds an epoch or world-size annotation that is not a non-negative integer."""
    try:
        # Non-blocking, and only a regular file: a FIFO or a device there must not hang or flood the reader.
        fd = os.open(annotations_file, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ContractError(f"annotations file {annotations_file}: not a regular file")
            data = f.read(MAX_ANNOTATIONS_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError as err:
        raise ContractError(f"annotations file {annotations_file}: cannot be read: {err}") from None
    if len(data) > MAX_ANNOTATIONS_BYTES:
        raise ContractError(
            f"annotations file {annotations_file}: larger than {MAX_ANNOTATIONS_BYTES} bytes; "
            "not a downward-API annotations file?"
        )
    try:
        text = data.decode()
    except UnicodeDecodeError as err:
        raise ContractError(f"annotations file {annotations_file}: not UTF-8 ({err})") from None
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if value.startswith('"'):
            try:
                value = str(json.loads(value))
            except ValueError as err:
                raise ContractError(
                    f"annotations file {annotations_file}: annotation {key}: value {_clip(value)} is not a "
                    f"JSON string ({err})"
                ) from None
        if key in INTEGER_ANNOTATIONS and not (value.isascii() and value.isdigit() and len(value) <= 18):
            raise ContractError(
                f"annotations file {annotations_file}: annotation {key}: value {_clip(value)} is not a "
                "non-negative integer"
            )
        out[key] = value
    return out


def read_epoch(annotations_file: Path, default: int = 0) -> int:
    """The epoch annotation of a downward-API annotations file, or `default` without one."""
    return int(read_annotations(annotations_file).get(EPOCH_ANNOTATION, default))


def _clip(value: object, limit: int = 80) -> str:
    """repr of `value`, cut to about `limit` characters (a bad value is quoted in errors, never whole)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "...'"


#: The bounds a field's metadata can hold (annotated_types' Gt, Ge, ...), in words.
_BOUND_WORDS = (
    ("gt", "> {}"),
    ("ge", ">= {}"),
    ("lt", "< {}"),
    ("le", "<= {}"),
    ("min_length", "at least {} characters"),
    ("max_length", "at most {} characters"),
)


def _bounds(field: FieldInfo) -> str:
    """The allowed range of a field, in words (`> 0, <= 86400, finite`), or "" for an unbounded one."""
    parts = []
    for m in field.metadata:
        if getattr(m, "min_length", None) == 1:
            parts.append("non-empty")
            continue
        parts += [text.format(getattr(m, attr)) for attr, text in _BOUND_WORDS if getattr(m, attr, None) is not None]
        if getattr(m, "allow_inf_nan", True) is False:  # pydantic's AllowInfNan
            parts.append("finite")
    return ", ".join(parts)


def _describe(err: ValidationError, environ: Mapping[str, str] | None = None) -> str:
    problems = []
    for e in err.errors():
        loc = e["loc"]
        field = str(loc[0]) if loc else ""
        info = MemberEnv.model_fields.get(field)
        if info is None:
            problems.append(f"WEIGHTSYNC_* environment: {e['msg']}")
            continue
        where = env_name(field)
        if e["type"] == "missing":
            near = _close_unknown(where, environ or {})
            problems.append(f"{where}: not set" + (f" ({near} is set: a misspelling?)" if near else ""))
            continue
        detail = e["msg"]
        if field != "token":  # a secret: never quoted
            detail += f", got {_clip(environ.get(where) if environ else e['input'])}"
        bounds = _bounds(info)
        if bounds and info.annotation is not str:  # pydantic's own message already says a string's bound
            detail += f" (allowed: {bounds})"
        problems.append(f"{where}: {detail}")
    return "invalid weightsync environment: " + "; ".join(problems)


def _closest(name: str) -> str | None:
    """The valid variable `name` most likely misspells, if any: the same name in upper case, else the
    closest by difflib (without the common prefix), else the one name holding all of its words
    (`WEIGHTSYNC_PORT` -> `WEIGHTSYNC_MASTER_PORT`: of several contract variables holding them, the first
    declared, the group's own settings coming before the engines'); contract variables before the others."""
    upper = name.upper()
    if upper in reserved_env_names() or upper in OTHER_VARIABLES:  # right name, wrong case
        return upper
    suffix = upper[len(ENV_PREFIX) :]
    words = set(suffix.split("_")) - {""}
    for names, declared in (([env_name(f) for f in MemberEnv.model_fields], True), (sorted(OTHER_VARIABLES), False)):
        known = {n[len(ENV_PREFIX) :]: n for n in names}
        match = difflib.get_close_matches(suffix, sorted(known), n=1)
        if match:
            return known[match[0]]
        holding = [n for k, n in known.items() if words and words <= set(k.split("_"))]
        if len(holding) == 1 or (holding and declared):
            return holding[0]
    return None


def _is_unknown(name: str) -> bool:
    if not name.upper().startswith(ENV_PREFIX) or name in OTHER_VARIABLES or name.startswith(OTHER_PREFIXES):
        return False
    return name not in reserved_env_names()


def _close_unknown(name: str, environ: Mapping[str, str]) -> str | None:
    """An unknown variable set in `environ` that looks like a misspelling of the contract variable `name`."""
    return next((n for n in sorted(environ) if _is_unknown(n) and _closest(n) == name), None)


#: Unknown variables already warned about by this process (each is warned about once).
_warned: set[str] = set()


def _warn_unknown(environ: Mapping[str, str]) -> None:
    for name in sorted(environ):
        if name in _warned or not _is_unknown(name):
            continue
        _warned.add(name)
        near = _closest(name)
        hint = f" (did you mean {near}?)" if near else ""
        log.warning("%s is not a weightsync variable%s; ignored", name, hint)


def _describe_type(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return " \\| ".join(f"`{a}`" for a in get_args(annotation))
    if get_origin(annotation) is tuple:
        return "comma-separated list"
    return str(getattr(annotation, "__name__", annotation))


def markdown_table() -> str:
    """The env contract as a Markdown table, generated for docs/."""
    rows = ["| variable | type | default | bounds | meaning |", "|---|---|---|---|---|"]
    for name, field in MemberEnv.model_fields.items():
        default = "required" if field.is_required() else f"`{field.default!r}`"
        kind = _describe_type(field.annotation)
        rows.append(f"| `{env_name(name)}` | {kind} | {default} | {_bounds(field)} | {field.description} |")
    return "\n".join(rows) + "\n"
