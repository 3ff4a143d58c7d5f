"""Packing and unpacking copies that leave NCCL its share of the GPU.

A multi-tensor copy at full speed (torch._foreach_copy_: every SM, ~2.8 TB/s of HBM traffic on an H200) that
overlaps a broadcast slows the broadcast: measured on one H200 with a stand-in for NCCL's receive kernel,
the stand-in ran 6-8% longer while foreach unpacks ran beside it, and not measurably longer beside the same
unpacks on 32 thread blocks (bench/gpu_probe.py, bench/results/gpu-probe-1xH200.*). At 32 blocks a 1 GiB
chunk still copies in ~2.4 ms, inside the ~3 ms its broadcast takes. So chunks that overlap a broadcast are
copied by a Triton kernel on a fixed number of programs; the first pack and the last unpack, which overlap
nothing, keep the full-speed copy. CPU tensors and a missing Triton fall back to torch._foreach_copy_, and so
do the tensors of a chunk that are not whole 4-byte words at 4-byte addresses (odd-sized int8 or bool ones).

The pointer tables of a chunk live on the GPU and are rebuilt only when a tensor's address changes.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Sequence
from typing import Any

import torch

log = logging.getLogger("weightsync.runtime")

_WORD = 4  # bytes per element the kernel moves
_BLOCK = 4096  # words per program and step
_MAX_BYTES = 1 << 31  # larger tensors (only in packed chunks of buffers over 2 GiB) go through torch's copy
_CONTIGUOUS = operator.methodcaller("is_contiguous")

_kernel: Any = None  # the compiled-on-first-use Triton kernel; False once it proved unusable
#: Why the bounded copy kernel is not used in this process (None while it is, or before its first use).
unavailable_reason: str | None = None


def _load_kernel() -> Any:
    global _kernel
    if _kernel is None:
        try:
            import triton
            import triton.language as tl
        except ImportError as err:
            _disable(f"Triton is not installed ({err})")
            return _kernel

        # No annotations but the constexpr: Triton resolves every annotation as a global of the kernel.
        @triton.jit  # type: ignore[untyped-decorator]
        def bounded_copy(srcs, dsts, words, count, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
            pid = tl.program_id(0)
            step = tl.num_programs(0) * BLOCK
            for i in range(count):
                src = tl.load(srcs + i).to(tl.pointer_type(tl.int32))
                dst = tl.load(dsts + i).to(tl.pointer_type(tl.int32))
                n = tl.load(words + i)
                for start in range(pid * BLOCK, n, step):
                    offs = start + tl.arange(0, BLOCK)
                    mask = offs < n
                    tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)

        _kernel = bounded_copy
    return _kernel


class _Table:
    """A chunk's bounded copy: the pointer table of the pairs the kernel takes, and the pairs it leaves."""

    def __init__(self, src_ptrs: list[int], dst_ptrs: list[int], device: torch.device, taken: list[bool],
                 destinations: Sequence[torch.Tensor]) -> None:
        self.src_ptrs, self.dst_ptrs = src_ptrs, dst_ptrs
        picked = [i for i, ok in enumerate(taken) if ok]
        self.left = [i for i, ok in enumerate(taken) if not ok]
        self.count = len(picked)
        self.pointers = torch.tensor(
            [[src_ptrs[i] for i in picked], [dst_ptrs[i] for i in picked],
             [destinations[i].numel() * destinations[i].element_size() // _WORD for i in picked]],
            dtype=torch.int64).to(device) if picked else None


class BoundedCopies:
    """Per chunk and direction, the GPU pointer table of a bounded copy, rebuilt when an address changes."""

    def __init__(self, programs: int | None = 32) -> None:
        #: Programs (thread blocks) of the bounded copy (RuntimeSettings.copy_programs); None: every copy runs
        #: at full speed (foreach_copy_).
        self.programs = programs
        self._tables: dict[tuple[str, int], _Table] = {}
        self._signature = ""
        #: Chunks this object copied with the bounded kernel (tensors it cannot take go through torch's copy).
        self.kernel_copies = 0

    def use(self, signature: str) -> None:
        """Chunk numbers refer to this tensor set's plan from now on."""
        if signature != self._signature:
            self._tables.clear()
            self._signature = signature

    def copy(self, key: tuple[str, int], destinations: Sequence[torch.Tensor], sources: Sequence[torch.Tensor],
             bounded: bool) -> None:
        """destinations[i].copy_(sources[i]) for all i; on `programs` blocks when `bounded` and possible."""
        programs = self.programs
        kernel = _load_kernel() if bounded and programs is not None and destinations and \
            destinations[0].device.type == "cuda" else None
        table = self._table(key, destinations, sources) if kernel else None
        if not kernel or table is None or table.pointers is None:
            torch._foreach_copy_(list(destinations), list(sources))
            return
        try:
            kernel[(programs,)](table.pointers[0], table.pointers[1], table.pointers[2], table.count, BLOCK=_BLOCK)
        except Exception as err:  # no compiler, no cache directory, an unsupported GPU: say so once
            _disable(str(err).splitlines()[0] if str(err) else type(err).__name__)
            torch._foreach_copy_(list(destinations), list(sources))
            return
        self.kernel_copies += 1
        if table.left:
            torch._foreach_copy_([destinations[i] for i in table.left], [sources[i] for i in table.left])

    def _table(self, key: tuple[str, int], destinations: Sequence[torch.Tensor],
               sources: Sequence[torch.Tensor]) -> _Table:
        src_ptrs = [s.data_ptr() for s in sources]
        dst_ptrs = [d.data_ptr() for d in destinations]
        cached = self._tables.get(key)
        # The same addresses are not enough: a square weight transposed in place (`p.data = p.data.t()`)
        # keeps its address, shape and dtype, and the kernel would copy its storage order as if it were
        # the tensor's. (A complex weight given a lazy conjugate or negative view in place, `p.data =
        # p.data.conj()`, is not looked for here: its bytes would travel unconjugated.)
        if (cached is not None and cached.src_ptrs == src_ptrs and cached.dst_ptrs == dst_ptrs
                and all(map(_CONTIGUOUS, sources)) and all(map(_CONTIGUOUS, destinations))):
            return cached
        taken = _takes(destinations, sources, src_ptrs, dst_ptrs)
        table = self._tables[key] = _Table(src_ptrs, dst_ptrs, destinations[0].device, taken, destinations)
        return table


def _disable(reason: str) -> None:
    global _kernel, unavailable_reason
    _kernel, unavailable_reason = False, reason
    log.warning("bounded copy kernel unavailable (%s); packing and unpacking at full speed instead", reason)


def _takes(destinations: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], src_ptrs: list[int],
           dst_ptrs: list[int]) -> list[bool]:
    """Per pair, whether the kernel can copy it: whole 4-byte words at 4-byte addresses, contiguous, the same
    size, dtype and device on both sides, no lazy conjugate or negative view, and under 2 GiB (the kernel's
    offsets are 32-bit)."""
    device = destinations[0].device
    return [not (d.numel() * d.element_size() % _WORD or d.numel() * d.element_size() >= _MAX_BYTES
                 or sp % _WORD or dp % _WORD or d.dtype != s.dtype
                 or d.shape != s.shape or not d.is_contiguous() or not s.is_contiguous() or s.device != device
                 or s.is_conj() or s.is_neg() or d.is_conj() or d.is_neg()
                 or d.device != device or d.numel() == 0)
            for d, s, sp, dp in zip(destinations, sources, src_ptrs, dst_ptrs, strict=True)]
