"""The packing plan: where every tensor's bytes travel, computed once per set of tensors.

Pure: no torch, no group. Tensors are described by `TensorSpec`; the plan groups them, in iteration order,
into chunks. A packed chunk holds several tensors at aligned offsets inside one buffer of at most
`buffer_bytes`, so every slot can be viewed as its dtype; a tensor at least `direct_threshold` bytes large
travels in a chunk of its own, straight from the source into the destination, with no copy and no size
limit (NCCL and gloo broadcast any size).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

#: Slot alignment in bytes: a multiple of every dtype's size (complex128 is 16) and of the 128-byte
#: lines GPU copy kernels move, so every view is valid and copies stay coalesced.
ALIGNMENT = 256


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"
    shape: tuple[int, ...]
    itemsize: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@dataclass(frozen=True)
class Slot:
    """One tensor's place in a packed chunk."""

    index: int  # position of the tensor in the manifest
    offset: int  # byte offset inside the chunk, a multiple of ALIGNMENT
    nbytes: int


@dataclass(frozen=True)
class Chunk:
    kind: Literal["packed", "direct"]
    nbytes: int  # bytes on the wire: the packed extent, or the direct tensor's size
    slots: tuple[Slot, ...]


@dataclass(frozen=True)
class PackingPlan:
    buffer_bytes: int
    direct_threshold: int
    chunks: tuple[Chunk, ...]

    @cached_property
    def total_bytes(self) -> int:
        """Payload bytes, without alignment padding (computed once: a plan is reused for every sync)."""
        return sum(s.nbytes for c in self.chunks for s in c.slots)

    @cached_property
    def packed_chunks(self) -> int:
        return sum(1 for c in self.chunks if c.kind == "packed")


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


def make_plan(specs: list[TensorSpec], buffer_bytes: int, direct_threshold: int | None = None) -> PackingPlan:
    """Group `specs` (in order) into chunks; no packed chunk exceeds `buffer_bytes`.

    `direct_threshold` defaults to `buffer_bytes`: only what cannot share a buffer goes on its own.
    """
    if buffer_bytes < ALIGNMENT:
        raise ValueError(f"buffer_bytes must be at least {ALIGNMENT}, got {buffer_bytes}")
    threshold = buffer_bytes if direct_threshold is None else min(direct_threshold, buffer_bytes)
    if threshold <= 0:
        raise ValueError(f"direct_threshold must be positive, got {direct_threshold}")
    chunks: list[Chunk] = []
    slots: list[Slot] = []
    cursor = 0

    def close_packed() -> None:
        nonlocal slots, cursor
        if slots:
            chunks.append(Chunk("packed", cursor, tuple(slots)))
        slots, cursor = [], 0

    for index, spec in enumerate(specs):
        size = spec.nbytes
        if size >= threshold or size > buffer_bytes:
            close_packed()
            chunks.append(Chunk("direct", size, (Slot(index, 0, size),)))
            continue
        offset = align_up(cursor)
        if offset + size > buffer_bytes:
            close_packed()
            offset = 0
        slots.append(Slot(index, offset, size))
        cursor = offset + size
    close_packed()
    return PackingPlan(buffer_bytes, threshold, tuple(chunks))


def plan_digest(plan: PackingPlan) -> str:
    """A short digest of the plan, compared across members before any data moves."""
    doc = [plan.buffer_bytes, plan.direct_threshold, [[c.kind, c.nbytes, [[s.index, s.offset, s.nbytes]
           for s in c.slots]] for c in plan.chunks]]
    return hashlib.sha256(json.dumps(doc, separators=(",", ":")).encode()).hexdigest()[:16]


#: Direct tensors broadcast back to back are launched together (one NCCL group), at most this many at once.
MAX_DIRECT_BATCH = 128


def segments(plan: PackingPlan, max_direct_batch: int = MAX_DIRECT_BATCH) -> list[tuple[str, list[int]]]:
    """The plan's chunks as the data path walks them: ("packed", [i]) for a packed chunk, ("direct", [i, ...])
    for a run of consecutive direct chunks, launched as one batch."""
    out: list[tuple[str, list[int]]] = []
    for i, chunk in enumerate(plan.chunks):
        if chunk.kind == "direct" and out and out[-1][0] == "direct" and len(out[-1][1]) < max_direct_batch:
            out[-1][1].append(i)
        else:
            out.append((chunk.kind, [i]))
    return out
