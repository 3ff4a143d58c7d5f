"""What the trainer's per-sync tensor-list check costs, per tensor, in the ways it could be read.

Before its first byte, the sender confirms that the tensor list is the one it announced last time: the same
names, shapes, dtypes, and every tensor dense (strided) and not a DTensor. With 18,867 tensors (the MoE set)
that is most of the host's time before the first byte (bench/README.md), and it is all attribute reads of
torch tensors (~50-300 ns each). This times the candidate readings on the same tensors, interleaved, so they
see the same machine:

    python bench/layout_check.py --set moe --rounds 200 --out layout-check.json
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from host_overhead import tiny_params
from sync_bench import SETS

_FIRST, _SECOND = operator.itemgetter(0), operator.itemgetter(1)
_SHAPE, _DTYPE, _LAYOUT = operator.attrgetter("shape"), operator.attrgetter("dtype"), operator.attrgetter("layout")
_SHAPE_DTYPE = operator.attrgetter("shape", "dtype")
_ALL = operator.attrgetter("shape", "dtype", "layout", "__class__")


def variants(items: list[tuple[str, torch.Tensor]]) -> dict[str, Callable[[], bool]]:
    names0 = [n for n, _ in items]
    tensors0 = [t for _, t in items]
    shapes0, dtypes0 = list(map(_SHAPE, tensors0)), list(map(_DTYPE, tensors0))
    strided0 = [torch.strided] * len(items)
    classes0 = list(map(type, tensors0))
    pairs0 = list(map(_SHAPE_DTYPE, tensors0))
    all0 = list(map(_ALL, tensors0))

    def zip_passes() -> bool:  # bc1b3fd: zip, shapes, dtypes; no layout, no class
        names, tensors = zip(*items, strict=True)
        return list(names) == names0 and list(map(_SHAPE, tensors)) == shapes0 and list(map(_DTYPE, tensors)) == dtypes0

    def separate_passes() -> bool:  # names, classes, shapes, dtypes, layouts: one pass each
        names, tensors = list(map(_FIRST, items)), list(map(_SECOND, items))
        return (set(map(type, tensors)) <= {torch.Tensor} and names == names0
                and list(map(_SHAPE, tensors)) == shapes0 and list(map(_DTYPE, tensors)) == dtypes0
                and set(map(_LAYOUT, tensors)) <= {torch.strided})

    def separate_lists() -> bool:  # the same, compared as lists (identity first) instead of sets
        names, tensors = list(map(_FIRST, items)), list(map(_SECOND, items))
        return (list(map(type, tensors)) == classes0 and names == names0
                and list(map(_SHAPE, tensors)) == shapes0 and list(map(_DTYPE, tensors)) == dtypes0
                and list(map(_LAYOUT, tensors)) == strided0)

    def shape_dtype_fused() -> bool:  # shape and dtype in one pass, layout in another
        names, tensors = list(map(_FIRST, items)), list(map(_SECOND, items))
        return (list(map(type, tensors)) == classes0 and names == names0
                and list(map(_SHAPE_DTYPE, tensors)) == pairs0 and list(map(_LAYOUT, tensors)) == strided0)

    def all_fused() -> bool:  # every attribute in one pass over the tensors
        names, tensors = list(map(_FIRST, items)), list(map(_SECOND, items))
        return names == names0 and list(map(_ALL, tensors)) == all0

    def layout_alone() -> bool:
        return set(map(_LAYOUT, map(_SECOND, items))) <= {torch.strided}

    return {"zip_shapes_dtypes (bc1b3fd)": zip_passes, "separate passes, sets": separate_passes,
            "separate passes, lists": separate_lists, "shape+dtype fused, layout pass": shape_dtype_fused,
            "all in one pass": all_fused, "layout pass alone": layout_alone}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", default="moe", choices=sorted(SETS))
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--out", default="layout-check.json")
    args = parser.parse_args()
    items = list(tiny_params(args.set).items())
    checks = variants(items)
    assert all(f() for f in checks.values())
    times: dict[str, list[float]] = {k: [] for k in checks}
    for _ in range(args.rounds):
        for k, f in checks.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    rows = {k: {"median_ms": round(1e3 * statistics.median(v), 3), "p10_ms": round(1e3 * sorted(v)[len(v) // 10], 3),
                "median_ns_per_tensor": round(1e9 * statistics.median(v) / len(items), 1)} for k, v in times.items()}
    for k, r in rows.items():
        print(f"  {k:34s} {r['median_ms']:7.3f} ms  (p10 {r['p10_ms']:.3f})  "
              f"{r['median_ns_per_tensor']:6.1f} ns/tensor")
    doc = {"command": f"python bench/layout_check.py --set {args.set} --rounds {args.rounds}", "tensors": len(items),
           "python": platform.python_version(), "torch": torch.__version__, "machine": platform.processor(),
           "results": rows}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
