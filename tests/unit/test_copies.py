"""Which chunks the bounded copy kernel may take, and the CPU fallback (no GPU needed)."""

from __future__ import annotations

import torch
from weightsync.runtime.copies import BoundedCopies, _takes


def _ptrs(tensors: list[torch.Tensor]) -> list[int]:
    return [t.data_ptr() for t in tensors]


def test_whole_aligned_words_of_the_same_layout_are_eligible() -> None:
    src = [torch.randn(6, 8).to(torch.bfloat16), torch.randn(128)]
    dst = [torch.empty_like(t) for t in src]
    assert _takes(dst, src, _ptrs(src), _ptrs(dst)) == [True, True]


def test_odd_sizes_misaligned_addresses_strides_and_dtype_changes_are_not() -> None:
    base = torch.zeros(16, dtype=torch.int8)
    src = [torch.zeros(3, dtype=torch.int8), base[1:9], torch.randn(4, 8).t(), torch.randn(8).half(), torch.randn(8)]
    dst = [torch.empty(3, dtype=torch.int8), torch.zeros(8, dtype=torch.int8), torch.empty(8, 4),
           torch.empty(8, dtype=torch.bfloat16), torch.empty(8)]
    assert _takes(dst, src, _ptrs(src), _ptrs(dst)) == [False, False, False, False, True]


def test_tensors_of_2_gib_or_more_are_left_to_torch() -> None:
    huge = [torch.empty(1 << 29, device="meta")]  # 2 GiB of float32, with no memory behind it
    just_under = [torch.empty((1 << 29) - 1, device="meta")]
    assert _takes(huge, huge, [0], [0]) == [False]
    assert _takes(just_under, just_under, [0], [0]) == [True]


def test_cpu_tensors_are_copied_by_torch() -> None:
    src = [torch.randn(5, 3), torch.arange(7, dtype=torch.int8)]
    dst = [torch.empty_like(t) for t in src]
    BoundedCopies().copy(("unpack", 0), dst, src, bounded=True)
    assert all(torch.equal(d, s) for d, s in zip(dst, src, strict=True))
