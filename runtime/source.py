"""Sharded and lazy sources: what a trainer hands to `WeightSender.send`, described without gathering.

A source has two sides:
- `tensors()`: every tensor's name, dtype, full shape and placement (which trainer ranks hold which part),
  read from metadata alone (a DTensor's global shape and placements; a `LazySource`'s declared list);
- `iter_full()`: the full tensors in that order, each materialised just in time. A DTensor is gathered with
  `full_tensor()`, a collective that every trainer rank runs in the same order; the sender releases each
  one once its bytes are packed or sent, so no more than the packing buffers and the largest tensor are
  held at once.

`iter_full(gather_only=True)` is what the trainer ranks that do not send run: they only join the gathers
(a plain tensor, already whole on every rank, needs no collective and is skipped there).

`Placement` says where each part of a tensor lives in the trainer job. Today only rank 0 sends; a later
multi-source mode (every trainer rank sending its own shard to the receivers, as vLLM's `nccl_m2n` does)
reads the same metadata, so the trainer's code, `send(model.named_parameters(), version)`, does not change.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from weightsync.runtime.errors import InvalidTensorsError

_SECOND = operator.itemgetter(1)

@dataclass(frozen=True)
class Placement:
    """Where a sharded tensor lives in the trainer job: its device mesh (trainer-job ranks, row-major, and
    the mesh's shape) and one placement per mesh dimension (`Shard(0)`, `Replicate()`, `Partial(sum)`), as
    torch's DTensor writes them. With these and the full shape, every rank's local slice follows
    (torch.distributed.tensor's `compute_local_shape_and_global_offset`)."""

    mesh_ranks: tuple[int, ...]
    mesh_shape: tuple[int, ...]
    placements: tuple[str, ...]


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of a source: its name, dtype and full shape; `placement` None means the whole tensor is
    on every trainer rank (a plain tensor, or one produced whole by a `LazySource`)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    placement: Placement | None = None

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


@runtime_checkable
class WeightSource(Protocol):
    """What `WeightSender.send` takes besides plain `(name, tensor)` pairs."""

    def tensors(self) -> Sequence[SourceTensor]:
        """Every tensor's metadata, in the order `iter_full` yields them; never gathers."""
        ...

    def iter_full(self, gather_only: bool = False) -> Iterator[torch.Tensor | None]:
        """The full tensors in order, each materialised when asked for (collectively, on every trainer rank).
        With `gather_only`, on a rank that does not send: yields None for a tensor that needs no collective
        on this rank (its full value is not wanted there)."""
        ...


_DTensor: type | None
try:
    from torch.distributed.tensor import DTensor

    _DTensor = DTensor
except ImportError:  # a torch built without distributed: no DTensor can reach send()
    _DTensor = None


def _is_dtensor(tensor: object) -> bool:
    return _DTensor is not None and isinstance(tensor, _DTensor)


def placement_of(tensor: torch.Tensor) -> Placement:
    mesh: Any = tensor.device_mesh  # type: ignore[attr-defined]
    ranks = tuple(int(r) for r in mesh.mesh.flatten().tolist())
    return Placement(ranks, tuple(int(d) for d in mesh.mesh.shape),
                     tuple(str(p) for p in tensor.placements))  # type: ignore[attr-defined]


class NamedTensors:
    """`(name, tensor)` pairs where some tensors are DTensors (FSDP2's `fully_shard` parameters, tensor
    parallel placements): the pairs are listed (cheap: a DTensor is its local shard), nothing is gathered
    until `iter_full` gets there."""

    def __init__(self, items: Sequence[tuple[str, torch.Tensor]]) -> None:
        self.items = items
        self._meta: tuple[SourceTensor, ...] | None = None

    def tensors(self) -> tuple[SourceTensor, ...]:
        if self._meta is None:
            self._meta = tuple(SourceTensor(name, t.dtype, tuple(t.shape),
                                            placement_of(t) if _is_dtensor(t) else None)
                               for name, t in self.items)
        return self._meta

    def iter_full(self, gather_only: bool = False) -> Iterator[torch.Tensor | None]:
        for _, t in self.items:
            if _is_dtensor(t):
                with torch.no_grad():
                    yield t.full_tensor().detach()  # type: ignore[attr-defined]
            else:
                yield None if gather_only else t.detach()


class LazySource:
    """A source whose tensors are produced one at a time by the caller, with their metadata declared up front
    (plain tensors can only be known by producing them, and the tensor list must reach the receivers before
    any data does).

        source = LazySource([SourceTensor(n, p.dtype, tuple(p.shape)) for n, p in model.named_parameters()],
                            lambda: (gather(p) for _, p in model.named_parameters()))
        sender.send(source, version=step)

    `produce` is called once per sync on every trainer rank (at most twice with checksums on) and must yield
    the tensors in the declared order; whatever collectives it runs, it runs on every rank. A tensor whose
    dtype or shape differs from its declaration fails the sync, naming it, before its bytes are sent.
    """

    def __init__(self, tensors: Iterable[SourceTensor], produce: Callable[[], Iterable[torch.Tensor]]) -> None:
        self._meta = tuple(tensors)
        self._produce = produce

    def tensors(self) -> tuple[SourceTensor, ...]:
        return self._meta

    def iter_full(self, gather_only: bool = False) -> Iterator[torch.Tensor | None]:
        produced = iter(self._produce())
        for meta in self._meta:
            try:
                t = next(produced)
            except StopIteration:
                raise ValueError(f"the source's producer ended before tensor {meta.name!r}: it declared "
                                 f"{len(self._meta)} tensors") from None
            if gather_only:
                yield None
                continue
            if not isinstance(t, torch.Tensor) or t.dtype != meta.dtype or tuple(t.shape) != meta.shape:
                got = (f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__)
                raise ValueError(f"tensor {meta.name!r} was declared {meta.dtype} {list(meta.shape)} but the "
                                 f"producer gave {got}")
            if _is_dtensor(t):
                t = t.full_tensor()  # type: ignore[attr-defined]
            yield t.detach()


def as_source(named_tensors: object) -> tuple[WeightSource | None, list[tuple[str, torch.Tensor]],
                                             list[torch.Tensor]]:
    """(the source, [], []) for a WeightSource; (None, the pairs, their tensors) for `(name, tensor)` pairs,
    a mapping (a state dict) counting as its items. Whether the pairs hold DTensors (`sharded_source`) and
    whether they really are pairs (`pair_problem`) is asked only of a tensor list that is not the last
    sync's: this runs before every sync, with tens of thousands of pairs on a MoE."""
    if isinstance(named_tensors, WeightSource):
        return named_tensors, [], []
    if isinstance(named_tensors, Mapping):
        named_tensors = named_tensors.items()
    if not isinstance(named_tensors, Iterable) or isinstance(named_tensors, (str, bytes, torch.Tensor)):
        raise InvalidTensorsError(f"send() takes (name, tensor) pairs or a WeightSource, not "
                                  f"{type(named_tensors).__name__}")
    items = list(named_tensors)
    try:
        tensors = list(map(_SECOND, items))
    except (TypeError, IndexError, KeyError):
        raise InvalidTensorsError(pair_problem(items) or "send() takes (name, tensor) pairs") from None
    return None, items, tensors


def sharded_source(items: list[tuple[str, torch.Tensor]], tensors: list[torch.Tensor]) -> NamedTensors | None:
    """The pairs as a source when any tensor is a DTensor (gathered just in time); None for plain tensors."""
    if _DTensor is None or not any(issubclass(c, _DTensor) for c in set(map(type, tensors))):
        return None
    problem = pair_problem(items)
    if problem is not None:
        raise InvalidTensorsError(problem)
    return NamedTensors(items)


def pair_problem(items: Sequence[object]) -> str | None:
    """What makes `items` not a list of `(name, tensor)` pairs, naming the first item at fault; None if they are."""
    for i, item in enumerate(items):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            shown = repr(item)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            return f"send() takes (name, tensor) pairs; item {i} is a {type(item).__name__}: {shown}"
        name, tensor = item
        if not isinstance(name, str):
            return f"send() takes (name, tensor) pairs; item {i}'s name is a {type(name).__name__}, not a str"
        if not isinstance(tensor, torch.Tensor):
            return f"tensor {name!r} (item {i}) is a {type(tensor).__name__}, not a torch.Tensor"
    return None
