"""The in-band manifest: everything a receiver needs to know about a sync, as JSON (never pickle).

The trainer publishes one per sync through the rendezvous store; receivers rebuild the packing plan from it,
check it against their own configuration and destinations, and only then does any data move. The tensor
list (tens of thousands of entries for a large MoE) is sent once per tensor set and epoch; later syncs of the
same set carry only its signature, so the per-sync cost does not grow with the number of tensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from weightsync.runtime.packing import PackingPlan, TensorSpec, make_plan, plan_digest

MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class TransferConfig:
    """The settings every member must share; any difference is refused before data moves."""

    protocol: str
    packed: bool
    buffer_bytes: int
    num_buffers: int
    checksums: bool

    def differences(self, other: TransferConfig) -> list[str]:
        """Human-readable differences, `name: trainer has X, this member has Y`, empty when they agree."""
        out = []
        for name in ("protocol", "packed", "buffer_bytes", "num_buffers", "checksums"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                out.append(f"{name}: trainer has {theirs!r}, this member has {mine!r}")
        return out


def _plan_for(tensors: tuple[TensorSpec, ...], config: TransferConfig, direct_threshold: int) -> PackingPlan:
    if config.packed:
        return make_plan(list(tensors), config.buffer_bytes, direct_threshold)
    return make_plan(list(tensors), 1 << 62, 1)  # unpacked: every tensor on its own


@dataclass(frozen=True)
class Manifest:
    version: int
    config: TransferConfig
    tensors: tuple[TensorSpec, ...]
    direct_threshold: int
    plan_digest: str
    signature: str  # identifies the tensor set and its plan, whatever the version
    checksums: tuple[int, ...] = field(default=())

    def plan(self) -> PackingPlan:
        return _plan_for(self.tensors, self.config, self.direct_threshold)

    def with_version(self, version: int, checksums: tuple[int, ...]) -> Manifest:
        return Manifest(version, self.config, self.tensors, self.direct_threshold, self.plan_digest, self.signature,
                        checksums)

    def to_doc(self, include_tensors: bool = True) -> dict[str, object]:
        doc: dict[str, object] = {
            "format": MANIFEST_FORMAT,
            "version": self.version,
            "signature": self.signature,
            "config": dataclasses.asdict(self.config),
            "direct_threshold": self.direct_threshold,
            "plan_digest": self.plan_digest,
            "checksums": list(self.checksums),
        }
        if include_tensors:
            doc["tensors"] = [[t.name, t.dtype, list(t.shape), t.itemsize] for t in self.tensors]
        return doc

    @classmethod
    def from_doc(cls, doc: dict[str, Any], known: dict[str, Manifest] | None = None) -> Manifest:
        """Parse a manifest; a compact one (no tensor list) takes its tensors from `known`, by signature.

        The document comes from a sealed store value (only a member of the group can have written it), yet
        is checked as input all the same: a malformed one is a ValueError naming what is wrong."""
        if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
            got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise ValueError(f"unsupported manifest format {got!r}, expected {MANIFEST_FORMAT}")
        try:
            return cls._parse(doc, known)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"malformed manifest: {type(err).__name__}: {err}") from None

    @classmethod
    def _parse(cls, doc: dict[str, Any], known: dict[str, Manifest] | None) -> Manifest:
        signature = str(doc["signature"])
        if "tensors" in doc:
            tensors = tuple(TensorSpec(n, d, tuple(s), i) for n, d, s, i in doc["tensors"])
        elif known is not None and signature in known:
            tensors = known[signature].tensors
        else:
            raise ValueError(f"the manifest refers to tensor set {signature}, which this member never received")
        return cls(
            version=int(doc["version"]),
            config=TransferConfig(**doc["config"]),
            tensors=tensors,
            direct_threshold=int(doc["direct_threshold"]),
            plan_digest=str(doc["plan_digest"]),
            signature=signature,
            checksums=tuple(int(c) for c in doc["checksums"]),
        )


def build_manifest(version: int, config: TransferConfig, tensors: list[TensorSpec], direct_threshold: int,
                   checksums: tuple[int, ...] = ()) -> tuple[Manifest, PackingPlan]:
    specs = tuple(tensors)
    plan = _plan_for(specs, config, direct_threshold)
    digest = plan_digest(plan)
    signature = hashlib.sha256(
        json.dumps([[t.name, t.dtype, list(t.shape)] for t in specs]).encode() + digest.encode()).hexdigest()[:16]
    return Manifest(version, config, specs, direct_threshold, digest, signature, checksums), plan
