"""Property-based tests of the packing plan: any shapes, dtypes and buffer sizes."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from weightsync.runtime.packing import ALIGNMENT, TensorSpec, make_plan, segments
from weightsync.runtime.transfer import Buffers, dtype_of

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.int8, torch.uint8, torch.int16,
          torch.int32, torch.int64, torch.bool, torch.float64, torch.complex64, torch.complex128]

shapes = st.lists(st.integers(min_value=0, max_value=9), min_size=0, max_size=3).map(tuple)
specs_strategy = st.lists(st.tuples(st.sampled_from(DTYPES), shapes), min_size=0, max_size=40)


def to_specs(items: list[tuple[torch.dtype, tuple[int, ...]]]) -> list[TensorSpec]:
    return [TensorSpec(f"t{i}", str(d).removeprefix("torch."), s, torch.empty((), dtype=d).element_size())
            for i, (d, s) in enumerate(items)]


@settings(max_examples=300, deadline=None)
@given(items=specs_strategy, buffer_bytes=st.integers(min_value=ALIGNMENT, max_value=4096),
       threshold=st.one_of(st.none(), st.integers(min_value=1, max_value=4096)))
def test_every_tensor_is_placed_once_aligned_and_within_its_buffer(items, buffer_bytes, threshold) -> None:
    specs = to_specs(items)
    plan = make_plan(specs, buffer_bytes, threshold)

    placed = [s.index for c in plan.chunks for s in c.slots]
    assert placed == list(range(len(specs))), "every tensor exactly once, in iteration order"
    for chunk in plan.chunks:
        if chunk.kind == "packed":
            assert chunk.nbytes <= buffer_bytes
            end = 0
            for slot in chunk.slots:
                assert slot.offset % ALIGNMENT == 0
                assert slot.offset >= end, "slots never overlap"
                assert slot.nbytes == specs[slot.index].nbytes
                end = slot.offset + slot.nbytes
            assert chunk.nbytes == end
        else:
            (slot,) = chunk.slots
            assert slot.offset == 0 and chunk.nbytes == specs[slot.index].nbytes
            assert chunk.nbytes >= plan.direct_threshold or chunk.nbytes > buffer_bytes
    assert plan.total_bytes == sum(s.nbytes for s in specs)


@settings(max_examples=150, deadline=None)
@given(items=specs_strategy, buffer_bytes=st.integers(min_value=ALIGNMENT, max_value=2048),
       num_buffers=st.integers(min_value=1, max_value=3), seed=st.integers(0, 2**16))
def test_packing_through_the_views_puts_every_byte_in_the_right_place(items, buffer_bytes, num_buffers, seed) -> None:
    specs = to_specs(items)
    plan = make_plan(specs, buffer_bytes)
    g = torch.Generator().manual_seed(seed)
    # Random bytes, except that a bool's byte must be 0 or 1 (copy_ normalises any other value).
    sources = [torch.randint(0, 2 if s.dtype == "bool" else 256, (s.nbytes,), generator=g, dtype=torch.uint8)
               .view(dtype_of(s)).view(s.shape) for s in specs]
    buffers = Buffers()
    views = buffers.prepare(plan, specs, "sig", num_buffers, torch.device("cpu"))

    packed_index = 0
    for chunk, chunk_views in zip(plan.chunks, views, strict=True):
        if chunk.kind != "packed":
            assert chunk_views == []
            continue
        buf = buffers.buffers[packed_index % num_buffers]
        packed_index += 1
        buf.zero_()
        for slot, view in zip(chunk.slots, chunk_views, strict=True):
            assert view.dtype == dtype_of(specs[slot.index]) and tuple(view.shape) == specs[slot.index].shape
            view.copy_(sources[slot.index])
        for slot in chunk.slots:
            expected = sources[slot.index].reshape(-1).view(torch.uint8)
            assert torch.equal(buf[slot.offset:slot.offset + slot.nbytes], expected)
    assert all(b.numel() <= buffer_bytes for b in buffers.buffers)


def test_a_tensor_larger_than_the_buffer_travels_on_its_own() -> None:
    specs = to_specs([(torch.float32, (10,)), (torch.float32, (1000,)), (torch.float32, (10,))])
    plan = make_plan(specs, 1024)
    assert [c.kind for c in plan.chunks] == ["packed", "direct", "packed"]


def test_a_buffer_smaller_than_the_alignment_is_refused() -> None:
    with pytest.raises(ValueError, match="buffer_bytes must be at least 256"):
        make_plan([], 100)


@settings(max_examples=200, deadline=None)
@given(items=specs_strategy, buffer_bytes=st.integers(min_value=ALIGNMENT, max_value=4096),
       threshold=st.integers(min_value=1, max_value=4096), batch=st.integers(min_value=1, max_value=5))
def test_segments_walk_every_chunk_once_in_order_with_bounded_direct_batches(items, buffer_bytes, threshold,
                                                                             batch) -> None:
    plan = make_plan(to_specs(items), buffer_bytes, threshold)
    walked = segments(plan, batch)
    assert [i for _, run in walked for i in run] == list(range(len(plan.chunks)))
    for kind, run in walked:
        assert all(plan.chunks[i].kind == kind for i in run)
        assert len(run) == 1 if kind == "packed" else 1 <= len(run) <= batch
    for (kind_a, run_a), (kind_b, _) in itertools.pairwise(walked):
        assert not (kind_a == kind_b == "direct") or len(run_a) == batch, "direct runs split only at the cap"
