"""vLLM's wire as pure functions: dtypes, the chunk-closing rule, an aligned order, update_info, the TCP-store
form's pickle (read back by walking its opcodes, never unpickled)."""

from __future__ import annotations

import math
import pickletools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vllm_standin import unique_id_from_pickle
from weightsync.runtime import vllm_wire as wire
from weightsync.runtime.packing import TensorSpec

ITEMSIZE = wire.PACKED_DTYPES


def spec(name: str, dtype: str, *shape: int) -> TensorSpec:
    return TensorSpec(name, dtype, tuple(shape), ITEMSIZE.get(dtype, 1))


def test_dtype_names_drop_the_torch_prefix() -> None:
    import torch

    assert [wire.dtype_name(d) for d in (torch.bfloat16, torch.float8_e4m3fn, torch.int64)] == [
        "bfloat16", "float8_e4m3fn", "int64"]
    assert all(getattr(torch, name).itemsize == size for name, size in wire.PACKED_DTYPES.items())


@pytest.mark.parametrize("dtype", ["bool", "float8_e5m2", "int16", "uint16", "uint32", "uint64", "complex64",
                                   "complex128"])
def test_a_dtype_outside_vllms_nccl_map_travels_packed_but_is_refused_unpacked(dtype: str) -> None:
    specs = [spec("layers.0.w", "bfloat16", 4), spec("layers.1.mask", dtype, 4)]
    wire.check_dtypes(specs, packed=True)
    with pytest.raises(ValueError, match=rf"'layers.1.mask' \({dtype}\) unpacked .*packed, it also takes .*{dtype}"):
        wire.check_dtypes(specs, packed=False)


@pytest.mark.parametrize("dtype", ["float8_e4m3fnuz", "qint8", "uint4", "float4_e2m1fn_x2"])
def test_a_dtype_vllm_cannot_view_is_refused_packed_too(dtype: str) -> None:
    with pytest.raises(ValueError, match=rf"'layers.1.q' \({dtype}\) packed"):
        wire.check_dtypes([spec("layers.0.w", "bfloat16", 4), spec("layers.1.q", dtype, 4)], packed=True)


def test_many_bad_tensors_are_named_five_at_a_time() -> None:
    with pytest.raises(ValueError, match=r"and 2 more"):
        wire.check_dtypes([spec(f"t{i}", "bool", 1) for i in range(7)], packed=False)


@pytest.mark.parametrize(("sizes", "limit", "expected"), [
    ([], 100, []),  # nothing: no broadcast at all
    ([100], 100, [100]),  # exactly the buffer: not over it, flushed at the end
    ([100, 1], 100, [101]),  # over it by the second tensor: closed right after it
    ([99, 1, 5], 100, [105]),  # 99, then exactly 100 (not over), then over
    ([101], 100, [101]),  # one tensor over the buffer: a chunk of its own
    ([101, 3], 100, [101, 3]),
    ([60, 60, 60], 100, [120, 60]),
    ([50, 51, 0, 0], 100, [101, 0]),  # a remainder of 0-byte tensors: still one 0-byte broadcast
    ([0, 0], 100, [0]),
    ([1] * 5, 2, [3, 2]),
])
def test_the_chunk_closing_rule(sizes: list[int], limit: int, expected: list[int]) -> None:
    assert wire.chunk_bytes(sizes, limit) == expected


def test_an_fp8_weight_before_its_fp32_scale_is_reordered_so_the_scale_is_aligned() -> None:
    specs = [spec("l.0.w", "float8_e4m3fn", 3, 5), spec("l.0.scale", "float32", 1), spec("l.1.w", "bfloat16", 4)]
    assert wire.misaligned(specs, 1 << 20) == [("l.0.scale", 15), ("l.1.w", 19)]
    order = wire.wire_order(specs, 1 << 20)
    assert sorted(order) == [0, 1, 2] and not wire.misaligned([specs[i] for i in order], 1 << 20)
    assert order == [2, 1, 0]  # 8-byte sizes first, then 4, then the odd 15


def test_an_aligned_order_is_kept_as_it_is() -> None:
    specs = [spec(f"model.layers.{i}.{p}", d, *s) for i in range(4)
             for p, d, s in (("w", "bfloat16", (64, 32)), ("scale", "float32", (64,)), ("q", "float8_e4m3fn", (64, 8)))]
    assert wire.wire_order(specs, 1000) == list(range(len(specs)))


def test_an_odd_sized_tensor_can_only_end_a_chunk_so_it_moves_on_to_a_later_one() -> None:
    specs = [spec("a.q", "float8_e4m3fn", 3), spec("a.s", "float32", 2), spec("b.w", "bfloat16", 8),
             spec("c.w", "float32", 4)]
    order = wire.wire_order(specs, 20)
    assert not wire.misaligned([specs[i] for i in order], 20)
    assert order == [1, 2, 3, 0]


_dtypes = st.sampled_from(sorted(ITEMSIZE))
_specs = st.lists(st.tuples(_dtypes, st.lists(st.integers(0, 7), max_size=3)), max_size=30)


@settings(max_examples=400, deadline=None)
@given(_specs, st.integers(1, 200))
def test_every_order_chosen_is_a_permutation_with_every_offset_aligned(raw: list[tuple[str, list[int]]],
                                                                        limit: int) -> None:
    specs = [spec(f"t{i}", d, *shape) for i, (d, shape) in enumerate(raw)]
    order = wire.wire_order(specs, limit)
    assert sorted(order) == list(range(len(specs)))
    ordered = [specs[i] for i in order]
    assert wire.misaligned(ordered, limit) == []
    if not wire.misaligned(specs, limit):
        assert order == list(range(len(specs)))
    # The chunks cover every byte exactly once, in order, and only the last one may be at most the buffer.
    sizes = [s.nbytes for s in ordered]
    chunk_sizes = wire.chunk_bytes(sizes, limit)
    assert sum(chunk_sizes) == sum(sizes) and all(c > limit for c in chunk_sizes[:-1])
    assert sum(len(c) for c in wire.chunks(sizes, limit)) == len(specs)


def test_update_info_and_the_same_as_last_lists() -> None:
    specs = [spec("w", "bfloat16", 2, 3), spec("b", "float32"), spec("e", "int64", 0)]
    assert wire.update_info(specs) == {"names": ["w", "b", "e"], "dtype_names": ["bfloat16", "float32", "int64"],
                                       "shapes": [[2, 3], [], [0]]}
    assert wire.same_as_last() == {"names": [], "dtype_names": [], "shapes": []}
    assert math.prod([]) == 1  # a 0-d tensor has one element


def test_the_tcp_store_pickle_is_vllms_ncclUniqueId_byte_for_byte() -> None:
    """The bytes CPython writes for vLLM's ctypes struct (pickle.dumps(ncclUniqueId(...), protocol=4)),
    reproduced from its opcode listing, and read back without unpickling."""
    raw = bytes(range(128))
    data = wire.unique_id_pickle(raw)
    listing = [(op.name, arg) for op, arg, _ in pickletools.genops(data)]
    assert [n for n, _ in listing] == [
        "PROTO", "FRAME", "SHORT_BINUNICODE", "MEMOIZE", "SHORT_BINUNICODE", "MEMOIZE", "STACK_GLOBAL", "MEMOIZE",
        "SHORT_BINUNICODE", "MEMOIZE", "SHORT_BINUNICODE", "MEMOIZE", "STACK_GLOBAL", "MEMOIZE", "EMPTY_DICT",
        "MEMOIZE", "SHORT_BINBYTES", "MEMOIZE", "TUPLE2", "MEMOIZE", "TUPLE2", "MEMOIZE", "REDUCE", "MEMOIZE", "STOP"]
    assert [a for n, a in listing if n == "SHORT_BINUNICODE"] == [
        "_ctypes", "_unpickle", "vllm.distributed.device_communicators.pynccl_wrapper", "ncclUniqueId"]
    assert listing[1][1] == len(data) - 11  # the frame holds everything after its header
    assert unique_id_from_pickle(data) == raw
    with pytest.raises(ValueError, match="128 bytes"):
        wire.unique_id_pickle(b"short")


def test_the_pickle_matches_what_cpython_writes_for_the_struct() -> None:
    import ctypes
    import pickle
    import sys
    import types

    name = "vllm.distributed.device_communicators.pynccl_wrapper"
    fake = {n: types.ModuleType(n) for n in ("vllm", "vllm.distributed", "vllm.distributed.device_communicators",
                                              name)}

    class ncclUniqueId(ctypes.Structure):  # vLLM's name
        _fields_ = [("internal", ctypes.c_byte * 128)]

    ncclUniqueId.__module__ = name
    ncclUniqueId.__qualname__ = "ncclUniqueId"
    fake[name].ncclUniqueId = ncclUniqueId  # type: ignore[attr-defined]
    saved = {n: sys.modules.get(n) for n in fake}
    sys.modules.update(fake)
    try:
        value = ncclUniqueId()
        ctypes.memmove(value.internal, bytes(range(128, 256)), 128)
        expected = pickle.dumps(value, protocol=4)  # writing only: nothing is ever unpickled
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
    assert wire.unique_id_pickle(bytes(range(128, 256))) == expected
