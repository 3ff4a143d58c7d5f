"""The in-band manifest: everything a receiver needs to know about a sync, as JSON (never pickle).

The trainer publishes one per sync through the rendezvous store; receivers rebuild the packing plan from it,
check it against their own configuration and destinations, and only then does any data move.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from weightsync.runtime.plan import Plan, TensorSpec, make_plan, plan_digest

MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class TransferConfig:
    """The settings every member must share; any difference is refused before data moves."""

    protocol: str
    packed: bool
    buffer_bytes: int
    num_buffers: int
    checksums: bool

    def digest(self) -> str:
        doc = [self.protocol, self.packed, self.buffer_bytes, self.num_buffers, self.checksums]
        return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:16]

    def differences(self, other: TransferConfig) -> list[str]:
        """Human-readable differences, `name: mine != theirs`, empty when they agree."""
        out = []
        for name in ("protocol", "packed", "buffer_bytes", "num_buffers", "checksums"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                out.append(f"{name}: trainer has {theirs!r}, this member has {mine!r}")
        return out


@dataclass(frozen=True)
class Manifest:
    version: int
    config: TransferConfig
    tensors: tuple[TensorSpec, ...]
    direct_threshold: int
    plan_digest: str
    checksums: tuple[int, ...] = field(default=())

    def plan(self) -> Plan:
        return make_plan(list(self.tensors), self.config.buffer_bytes if self.config.packed else 1 << 62,
                         self.direct_threshold if self.config.packed else 1)

    def signature(self) -> str:
        """Identifies the tensor set and plan, independent of the version: the key of cached views."""
        return hashlib.sha256(
            json.dumps([[t.name, t.dtype, list(t.shape)] for t in self.tensors]).encode()
            + self.plan_digest.encode()
        ).hexdigest()[:16]

    def to_json(self) -> bytes:
        doc = {
            "format": MANIFEST_FORMAT,
            "version": self.version,
            "config": {
                "protocol": self.config.protocol,
                "packed": self.config.packed,
                "buffer_bytes": self.config.buffer_bytes,
                "num_buffers": self.config.num_buffers,
                "checksums": self.config.checksums,
            },
            "direct_threshold": self.direct_threshold,
            "plan_digest": self.plan_digest,
            "tensors": [[t.name, t.dtype, list(t.shape), t.itemsize] for t in self.tensors],
            "checksums": list(self.checksums),
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        doc = json.loads(raw)
        if doc.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"unsupported manifest format {doc.get('format')!r}, expected {MANIFEST_FORMAT}")
        return cls(
            version=int(doc["version"]),
            config=TransferConfig(**doc["config"]),
            tensors=tuple(TensorSpec(n, d, tuple(s), i) for n, d, s, i in doc["tensors"]),
            direct_threshold=int(doc["direct_threshold"]),
            plan_digest=str(doc["plan_digest"]),
            checksums=tuple(int(c) for c in doc["checksums"]),
        )


def build_manifest(version: int, config: TransferConfig, tensors: list[TensorSpec], direct_threshold: int,
                   checksums: tuple[int, ...] = ()) -> tuple[Manifest, Plan]:
    draft = Manifest(version, config, tuple(tensors), direct_threshold, "", checksums)
    plan = draft.plan()
    return Manifest(version, config, tuple(tensors), direct_threshold, plan_digest(plan), checksums), plan
