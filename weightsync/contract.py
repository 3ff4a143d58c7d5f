"""The env contract between the operator (which writes it) and the runtime (which reads it).

Every variable the operator injects into a member pod is a field of `MemberEnv`; the variable's name is
`WEIGHTSYNC_` plus the field name in upper case. Only prefixed names are used: a trainer's own
torch.distributed job owns MASTER_ADDR, RANK and friends and they must not be clobbered.

Pure pydantic: importable without torch or kopf.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ENV_PREFIX = "WEIGHTSYNC_"

Role = Literal["trainer", "inference"]
Backend = Literal["nccl", "gloo"]
Protocol = Literal["weightsync", "vllm"]

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
    world_size: int = Field(ge=2, description="Ranks in the sync group: 1 + replicas x workersPerReplica.")
    rank_offset: int = Field(
        ge=0, description="Group rank of this pod's first worker; worker k of the pod is rank offset + k."
    )
    local_world_size: int = Field(ge=1, description="Workers (GPUs, ranks) in this pod.")
    backend: Backend = Field(default="nccl", description="Communicator: `nccl` on GPUs, `gloo` on CPU.")
    protocol: Protocol = Field(
        default="weightsync",
        description="Wire protocol: `weightsync` (native, in-band manifest) or `vllm` (vLLM's NCCL engine).",
    )
    packed: bool = Field(default=True, description="Pack tensors into shared buffers instead of one per tensor.")
    buffer_bytes: int = Field(
        default=DEFAULT_BUFFER_BYTES, ge=1 << 16, description="Size in bytes of each packing buffer."
    )
    num_buffers: int = Field(
        default=DEFAULT_NUM_BUFFERS, ge=1, le=8, description="Packing buffers in flight at once."
    )
    timeout_seconds: float = Field(
        default=DEFAULT_TIMEOUT_SECONDS, gt=0, description="Bound on every wait: rendezvous, sync, ack."
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
    endpoints: tuple[str, ...] = Field(
        default=(),
        description="Trainer only: the inference pods' DNS names, comma-separated, in replica order.",
    )

    @model_validator(mode="after")
    def _ranks_fit(self) -> MemberEnv:
        if self.rank_offset + self.local_world_size > self.world_size:
            raise ValueError(
                f"WEIGHTSYNC_RANK_OFFSET ({self.rank_offset}) + WEIGHTSYNC_LOCAL_WORLD_SIZE "
                f"({self.local_world_size}) exceeds WEIGHTSYNC_WORLD_SIZE ({self.world_size})"
            )
        if self.role == "trainer" and (self.rank_offset, self.local_world_size) != (0, 1):
            raise ValueError("the trainer is rank 0 alone: WEIGHTSYNC_RANK_OFFSET=0, WEIGHTSYNC_LOCAL_WORLD_SIZE=1")
        if self.role == "inference" and self.rank_offset == 0:
            raise ValueError("rank 0 belongs to the trainer: an inference pod needs WEIGHTSYNC_RANK_OFFSET >= 1")
        return self

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> MemberEnv:
        """Read the contract from `environ` (default: os.environ); errors name each bad variable."""
        environ = os.environ if environ is None else environ
        raw: dict[str, Any] = {}
        for field in cls.model_fields:
            value = environ.get(env_name(field))
            if value is None:
                continue
            raw[field] = tuple(v for v in value.split(",") if v) if field == "endpoints" else value
        try:
            return cls.model_validate(raw)
        except ValidationError as err:
            raise ContractError(_describe(err)) from None

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

    def current_epoch(self) -> int:
        """The epoch from the annotations file when it is there (the operator bumps it), else `epoch`."""
        return self.membership()[0]

    def membership(self) -> tuple[int, int]:
        """(epoch, world size) as the operator last published them, read together from one file read;
        the env's values until the annotations file exists."""
        annotations = read_annotations(Path(self.annotations_file))
        epoch = int(annotations.get(EPOCH_ANNOTATION, self.epoch))
        world_size = int(annotations.get(WORLD_SIZE_ANNOTATION, self.world_size))
        return epoch, world_size


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def reserved_env_names() -> frozenset[str]:
    """Every variable the operator owns; a user template that sets one of these is refused."""
    return frozenset(env_name(f) for f in MemberEnv.model_fields)


def read_annotations(annotations_file: Path) -> dict[str, str]:
    """Parse a downward-API annotations file (`key="value"` per line, values JSON-quoted); {} if absent."""
    try:
        text = annotations_file.read_text()
    except FileNotFoundError:
        return {}
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            value = value.strip()
            out[key.strip()] = json.loads(value) if value.startswith('"') else value
    return out


def read_epoch(annotations_file: Path, default: int = 0) -> int:
    """The epoch annotation of a downward-API annotations file, or `default` without one."""
    return int(read_annotations(annotations_file).get(EPOCH_ANNOTATION, default))


def _describe(err: ValidationError) -> str:
    problems = []
    for e in err.errors():
        loc = e["loc"]
        where = env_name(str(loc[0])) if loc else "WEIGHTSYNC_* environment"
        missing = e["type"] == "missing"
        problems.append(f"{where}: {'not set' if missing else e['msg']}")
    return "invalid weightsync environment: " + "; ".join(problems)


def _describe_type(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return " \\| ".join(f"`{a}`" for a in get_args(annotation))
    if get_origin(annotation) is tuple:
        return "comma-separated list"
    return str(getattr(annotation, "__name__", annotation))


def markdown_table() -> str:
    """The env contract as a Markdown table, generated for docs/."""
    rows = ["| variable | type | default | meaning |", "|---|---|---|---|"]
    for name, field in MemberEnv.model_fields.items():
        default = "required" if field.is_required() else f"`{field.default!r}`"
        kind = _describe_type(field.annotation)
        rows.append(f"| `{env_name(name)}` | {kind} | {default} | {field.description} |")
    return "\n".join(rows) + "\n"
