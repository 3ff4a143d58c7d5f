"""The bounded copy kernel on one GPU: bit-exact against torch's own copy, whatever the tensors."""

from __future__ import annotations

import pytest
import torch
from local_members import make_tensors
from weightsync.runtime import copies, nccl
from weightsync.runtime.packing import make_plan
from weightsync.runtime.transfer import Buffers, send_chunks, spec_of

pytestmark = pytest.mark.single_gpu

DEVICE = "cuda:0"


def _pairs(count: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    shapes = [(768, 2048), (2048,), (128,), (3, 5), (4096, 17), (1,), (0,), (100_001,)]
    sources = [torch.randn(shapes[i % len(shapes)], generator=g, device=DEVICE).to(torch.bfloat16)
               for i in range(count)]
    return [torch.empty_like(s) for s in sources], sources


def test_bounded_copy_is_bit_exact_and_follows_a_destination_that_moved() -> None:
    dests, sources = _pairs(40, 0)
    bounded = copies.BoundedCopies()
    bounded.use("set-a")
    bounded.copy(("unpack", 0), dests, sources, bounded=True)
    assert copies.unavailable_reason is None
    assert bounded.kernel_copies == 1
    assert all(torch.equal(d, s) for d, s in zip(dests, sources, strict=True))

    # The engine replaced a parameter (a new address) and the values changed: the next copy lands there.
    dests[7] = torch.empty_like(dests[7])
    _, sources = _pairs(40, 1)
    bounded.copy(("unpack", 0), dests, sources, bounded=True)
    assert bounded.kernel_copies == 2
    assert all(torch.equal(d, s) for d, s in zip(dests, sources, strict=True))


def test_a_source_transposed_in_place_at_the_same_address_is_copied_in_its_new_order() -> None:
    square = torch.randn(256, 256, device=DEVICE)
    param = torch.nn.Parameter(square.clone())
    sources = [torch.randn(1000, device=DEVICE), param]
    dests = [torch.empty_like(s) for s in sources]
    bounded = copies.BoundedCopies()
    bounded.copy(("pack", 0), dests, sources, bounded=True)
    assert bounded.kernel_copies == 1 and torch.equal(dests[1], param)

    # Same address, shape and dtype; only the strides changed. Copying its storage order would hand the
    # receivers the untransposed weight.
    param.data = param.data.t()
    assert param.data_ptr() == sources[1].data_ptr() and not param.is_contiguous()
    bounded.copy(("pack", 0), dests, sources, bounded=True)
    assert torch.equal(dests[1], square.t()) and torch.equal(dests[0], sources[0])


def test_tensors_the_kernel_cannot_take_go_through_torch_and_still_arrive() -> None:
    odd = [torch.arange(7, dtype=torch.int8, device=DEVICE), torch.ones(3, dtype=torch.bool, device=DEVICE)]
    strided = [torch.randn(64, 64, device=DEVICE).t()]
    mixed = [*odd, torch.randn(1000, device=DEVICE), *strided]
    for sources, by_kernel in ((odd, 0), (strided, 0), (mixed, 1)):
        dests = [torch.empty(s.shape, dtype=s.dtype, device=DEVICE) for s in sources]
        bounded = copies.BoundedCopies()
        bounded.copy(("pack", 0), dests, sources, bounded=True)
        assert bounded.kernel_copies == by_kernel
        assert all(torch.equal(d, s) for d, s in zip(dests, sources, strict=True))


def test_the_trainer_packs_every_chunk_bit_exact_on_a_one_rank_communicator() -> None:
    named = make_tensors(300, 3, DEVICE, large_numel=3_000_000)
    specs = [spec_of(n, t) for n, t in named]
    plan = make_plan(specs, 1 << 20)
    buffers = Buffers()
    views = buffers.prepare(plan, specs, "test", 2, torch.device(DEVICE))
    comm = nccl.NcclCommunicator(nccl.new_unique_id(), 0, 1, torch.device(DEVICE), lambda: None)
    sources = [t for _, t in named]
    packed = [i for i, c in enumerate(plan.chunks) if c.kind == "packed"]
    try:
        for upto in (packed[0], packed[len(packed) // 2], packed[-1]):
            # The plan cut short after chunk `upto`: what the buffers hold then is that chunk, packed.
            short = type(plan)(plan.buffer_bytes, plan.direct_threshold, plan.chunks[: upto + 1])
            launched = buffers.copies.kernel_copies
            send_chunks(comm, short, sources, views, buffers, lambda: None)
            # Every pack after the first overlaps a broadcast: those that the kernel can take, it takes.
            assert upto == packed[0] or buffers.copies.kernel_copies > launched
            for slot, view in zip(plan.chunks[upto].slots, views[upto], strict=True):
                assert torch.equal(view, sources[slot.index].contiguous()), specs[slot.index].name
    finally:
        comm.close()
