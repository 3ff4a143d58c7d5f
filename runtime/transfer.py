"""The data path of one sync: pack, broadcast and unpack chunks according to the plan.

The same code runs on gloo and on NCCL; the communicator decides whether a fence is a CUDA event (no host
synchronisation until the very end) or a host wait. Views into the packing buffers are computed once per
tensor set and reused for every later sync.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from weightsync.runtime.comm import Check, Communicator, Fence, host_wait
from weightsync.runtime.copies import BoundedCopies
from weightsync.runtime.packing import PackingPlan, TensorSpec, segments

from weightsync.contract import TRAINER_RANK

#: A receiver's loader: gets each batch of (name, tensor); the tensors are only valid during the call.
Loader = Callable[[list[tuple[str, torch.Tensor]]], None]


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection during a sync: with tens of thousands of tensors alive, one full collection
    costs tens of milliseconds, more than the per-tensor work of a whole sync. Garbage waits until after."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def spec_of(name: str, tensor: torch.Tensor) -> TensorSpec:
    return TensorSpec(name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), tensor.element_size())


def dtype_of(spec: TensorSpec) -> torch.dtype:
    dtype = getattr(torch, spec.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"tensor {spec.name!r} has dtype {spec.dtype!r}, which this torch does not know")
    return dtype


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (0-d and bool included)."""
    return tensor.reshape(-1).view(torch.uint8)


class Buffers:
    """The packing buffers and, per tensor set, the views of every slot, both made once and reused."""

    def __init__(self, copy_programs: int | None = 32) -> None:
        self.buffers: list[torch.Tensor] = []
        self._views: dict[tuple[str, str], list[list[torch.Tensor]]] = {}
        self.copies = BoundedCopies(copy_programs)

    def prepare(self, plan: PackingPlan, specs: Sequence[TensorSpec], signature: str, num_buffers: int,
                device: torch.device) -> list[list[torch.Tensor]]:
        """Buffers big enough for the plan's largest packed chunk; returns the slot views per chunk."""
        need = max((c.nbytes for c in plan.chunks if c.kind == "packed"), default=0)
        count = num_buffers if plan.packed_chunks else 0
        if (len(self.buffers) != count or (count and self.buffers[0].numel() < need)
                or (count and self.buffers[0].device != device)):
            self.buffers = [torch.empty(need, dtype=torch.uint8, device=device) for _ in range(count)]
            self._views.clear()
        self.copies.use(signature)
        key = (signature, str(device))
        views = self._views.get(key)
        if views is None:
            views = []
            packed_index = 0
            for chunk in plan.chunks:
                if chunk.kind != "packed":
                    views.append([])
                    continue
                buf = self.buffers[packed_index % count]
                packed_index += 1
                views.append([
                    buf[s.offset:s.offset + s.nbytes].view(dtype_of(specs[s.index])).view(specs[s.index].shape)
                    for s in chunk.slots
                ])
            self._views[key] = views
        return views

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self.buffers)


@dataclass
class ChecksumAccumulator:
    """Per-tensor checksums computed on the device, fetched once at the end of the sync."""

    enabled: bool
    values: dict[int, torch.Tensor]

    def add(self, index: int, tensor: torch.Tensor) -> None:
        if self.enabled:
            self.values[index] = checksum(tensor)

    def fetch(self, count: int) -> list[int]:
        return [int(self.values[i].item()) for i in range(count)] if self.enabled else []


_WEIGHT_PERIOD = 65521
_BLOCK = _WEIGHT_PERIOD * 256
_weights: dict[torch.device, torch.Tensor] = {}


def checksum(tensor: torch.Tensor) -> torch.Tensor:
    """A position-sensitive checksum of a tensor's bytes (a 0-d int64 tensor on its device)."""
    data = as_bytes(tensor.contiguous())
    device = data.device
    weights = _weights.get(device)
    if weights is None:
        weights = _weights[device] = torch.arange(_BLOCK, device=device, dtype=torch.int32) % _WEIGHT_PERIOD + 1
    total = torch.zeros((), dtype=torch.int64, device=device) + data.numel()
    for start in range(0, data.numel(), _BLOCK):
        block = data[start:start + _BLOCK]
        total += (block.to(torch.int32) * weights[: block.numel()]).sum(dtype=torch.int64)
    return total


class Timeline:
    """CUDA events around every pack, broadcast and unpack of one sync: where the GPU time of a sync went.

    A diagnostic for the benchmark (RuntimeSettings.timeline), never on in production: one event pair per chunk.
    """

    def __init__(self) -> None:
        self.origin: torch.cuda.Event | None = None
        self.marks: list[tuple[str, int, torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def span(self, what: str, chunk: int, stream: torch.cuda.Stream) -> Iterator[None]:
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        if self.origin is None:
            self.origin = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            self.origin.record(stream)
        start.record(stream)
        yield
        end.record(stream)
        self.marks.append((what, chunk, start, end))

    def rows(self) -> list[dict[str, float | int | str]]:
        """(what, chunk, start ms, end ms) relative to the first mark; call after the sync finished."""
        assert self.origin is not None
        return [{"what": what, "chunk": chunk, "start_ms": self.origin.elapsed_time(a),
                 "end_ms": self.origin.elapsed_time(b)} for what, chunk, a, b in self.marks]


def _span(timeline: Timeline | None, comm: Communicator, what: str,
          chunk: int) -> contextlib.AbstractContextManager[None]:
    stream = getattr(comm, "comm_stream" if what == "broadcast" else "compute_stream", None)
    if timeline is None or stream is None:
        return contextlib.nullcontext()
    return timeline.span(what, chunk, stream)


def send_chunks(comm: Communicator, plan: PackingPlan, sources: Sequence[torch.Tensor],
                views: list[list[torch.Tensor]], buffers: Buffers, check: Check,
                timeline: Timeline | None = None) -> tuple[float, float]:
    """Returns when every chunk is on the wire and done: (first broadcast enqueued, last enqueued), as
    perf_counter() values, to measure time to first byte and the host's own overhead.

    A pack that overlaps a broadcast runs on few SMs (copies.py); the first, which overlaps none, at full speed.
    """
    comm.start()
    copies = buffers.copies
    wire = buffers.buffers
    first = 0.0
    free_after: list[Fence | None] = [None] * len(wire)
    packed_index = 0
    for kind, chunk_indices in segments_of(plan):
        if kind == "direct":
            staged = []
            for ci in chunk_indices:
                source = sources[plan.chunks[ci].slots[0].index]
                if not source.is_contiguous() or source.device != comm.device:
                    with comm.compute_lane():
                        source = source.to(comm.device).contiguous()
                    comm.comm_wait(comm.compute_fence())
                staged.append(source)
            with _span(timeline, comm, "broadcast", chunk_indices[0]), comm.batch():
                for source in staged:
                    comm.broadcast(as_bytes(source), TRAINER_RANK)
            first = first or time.perf_counter()
            continue
        ci = chunk_indices[0]
        chunk = plan.chunks[ci]
        b = packed_index % len(wire)
        packed_index += 1
        comm.compute_wait(free_after[b], check)
        with comm.compute_lane(), _span(timeline, comm, "pack", ci):
            copies.copy(("pack", ci), views[ci], [sources[s.index] for s in chunk.slots], bounded=bool(first))
        comm.comm_wait(comm.compute_fence())
        with _span(timeline, comm, "broadcast", ci):
            comm.broadcast(wire[b][: chunk.nbytes], TRAINER_RANK)
        first = first or time.perf_counter()
        free_after[b] = comm.comm_fence()
    enqueued = time.perf_counter()
    comm.finish(check)
    return first or enqueued, enqueued


def send_chunks_lazy(comm: Communicator, plan: PackingPlan, specs: Sequence[TensorSpec],
                     fetch: Callable[[], torch.Tensor], views: list[list[torch.Tensor]], buffers: Buffers,
                     check: Check) -> tuple[float, float]:
    """`send_chunks` for a source whose tensors are materialised one at a time (a DTensor's gather):
    `fetch()` returns the next tensor in plan order, which is the tensor list's order.

    Memory: a fetched tensor is held only until the copy or broadcast that reads it is done, and a tensor
    is fetched only once the ones still held and it fit in the size of the largest tensor (one alone always
    does). So besides the packing buffers at most one largest tensor's bytes are held by the sender. The
    wire is `send_chunks`'s, so receivers cannot tell the two apart; direct tensors go one at a time."""
    comm.start()
    wire = buffers.buffers
    budget = max((s.nbytes for s in specs), default=0)
    held: list[tuple[Fence | None, int, torch.Tensor]] = []  # (done when, bytes, tensor)
    held_bytes = 0
    first = 0.0
    free_after: list[Fence | None] = [None] * len(wire)
    packed_index = 0

    def take(nbytes: int) -> torch.Tensor:
        nonlocal held_bytes
        while held and (held_bytes + nbytes > budget or (held[0][0] is not None and held[0][0].query())):
            fence, n, _ = held.pop(0)
            host_wait(fence, check)
            held_bytes -= n
        tensor = fetch()
        comm.start()  # both lanes after the gather, which ran on the caller's stream
        return tensor

    def hold(fence: Fence | None, nbytes: int, tensor: torch.Tensor) -> None:
        nonlocal held_bytes
        if fence is not None:
            held.append((fence, nbytes, tensor))
            held_bytes += nbytes

    for chunk_index, chunk in enumerate(plan.chunks):
        if chunk.kind == "direct":
            slot = chunk.slots[0]
            source = take(slot.nbytes)
            if not source.is_contiguous() or source.device != comm.device:
                with comm.compute_lane():
                    source = source.to(comm.device).contiguous()
                comm.comm_wait(comm.compute_fence())
            comm.broadcast(as_bytes(source), TRAINER_RANK)
            first = first or time.perf_counter()
            hold(comm.comm_fence(), slot.nbytes, source)
            del source
            continue
        b = packed_index % len(wire)
        packed_index += 1
        comm.compute_wait(free_after[b], check)  # the buffer's last broadcast is done before it is written again
        for slot, view in zip(chunk.slots, views[chunk_index], strict=True):
            source = take(slot.nbytes)
            with comm.compute_lane():
                view.copy_(source)
            hold(comm.compute_fence(), slot.nbytes, source)
            del source
        comm.comm_wait(comm.compute_fence())
        comm.broadcast(wire[b][: chunk.nbytes], TRAINER_RANK)
        first = first or time.perf_counter()
        free_after[b] = comm.comm_fence()
    enqueued = time.perf_counter()
    comm.finish(check)
    held.clear()
    return first or enqueued, enqueued


def destinations_by_chunk(plan: PackingPlan, specs: Sequence[TensorSpec],
                          destinations: Mapping[str, torch.Tensor]) -> list[list[torch.Tensor]]:
    """Every chunk's destination tensors in slot order: computed once per tensor set and destination mapping,
    so a sync does no per-tensor look-ups."""
    return [[destinations[specs[s.index].name] for s in chunk.slots] for chunk in plan.chunks]


def receive_chunks(comm: Communicator, plan: PackingPlan, specs: Sequence[TensorSpec], views: list[list[torch.Tensor]],
                   buffers: Buffers, targets: list[list[torch.Tensor]] | None,
                   loader: Loader | None, checksums: ChecksumAccumulator, check: Check,
                   timeline: Timeline | None = None) -> float:
    """Returns once every chunk arrived and was delivered: the perf_counter() value at which the first
    receive was enqueued, to measure a receiver's own time to first byte.

    An unpack that overlaps a broadcast runs on few SMs (copies.py); the last, which overlaps none, at full
    speed."""
    comm.start()
    copies = buffers.copies
    wire = buffers.buffers
    last_chunk = len(plan.chunks) - 1
    first = 0.0
    reusable_after: list[Fence | None] = [None] * len(wire)
    packed_index = 0
    for kind, chunk_indices in segments_of(plan):
        if kind == "direct":
            # (spec index, landing tensor, the destination to copy into when it could not be the landing)
            landings: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []
            with _span(timeline, comm, "broadcast", chunk_indices[0]), comm.batch():
                for ci in chunk_indices:
                    index = plan.chunks[ci].slots[0].index
                    spec = specs[index]
                    target = targets[ci][0] if targets is not None else None
                    if target is not None and target.is_contiguous() and target.device == comm.device:
                        landings.append((index, target, None))
                    else:
                        landing = torch.empty(spec.shape, dtype=dtype_of(spec), device=comm.device)
                        landings.append((index, landing, target))
                    comm.broadcast(as_bytes(landings[-1][1]), TRAINER_RANK)
            first = first or time.perf_counter()
            comm.compute_wait(comm.comm_fence(), check)
            with comm.compute_lane(), _span(timeline, comm, "unpack", chunk_indices[0]):
                for index, landing, target in landings:
                    checksums.add(index, landing)
                    if target is not None:
                        target.copy_(landing)
                if loader is not None:
                    loader([(specs[index].name, landing) for index, landing, _ in landings])
            continue
        ci = chunk_indices[0]
        chunk = plan.chunks[ci]
        chunk_views = views[ci]
        b = packed_index % len(wire)
        packed_index += 1
        comm.comm_wait(reusable_after[b])
        with _span(timeline, comm, "broadcast", ci):
            comm.broadcast(wire[b][: chunk.nbytes], TRAINER_RANK)
        first = first or time.perf_counter()
        comm.compute_wait(comm.comm_fence(), check)
        with comm.compute_lane(), _span(timeline, comm, "unpack", ci):
            if checksums.enabled:
                for slot, view in zip(chunk.slots, chunk_views, strict=True):
                    checksums.add(slot.index, view)
            if targets is not None:
                copies.copy(("unpack", ci), targets[ci], chunk_views, bounded=ci != last_chunk)
            elif loader is not None:
                loader([(specs[s.index].name, v) for s, v in zip(chunk.slots, chunk_views, strict=True)])
        reusable_after[b] = comm.compute_fence()
    if not first:
        first = time.perf_counter()
    comm.finish(check)
    return first


_segments: dict[int, tuple[PackingPlan, list[tuple[str, list[int]]]]] = {}


def segments_of(plan: PackingPlan) -> list[tuple[str, list[int]]]:
    """`segments(plan)`, computed once per plan object (the callers keep their plans)."""
    hit = _segments.get(id(plan))
    if hit is None or hit[0] is not plan:
        if len(_segments) > 16:
            _segments.clear()
        hit = _segments[id(plan)] = (plan, segments(plan))
    return hit[1]
