"""Host (CPU-side Python) overhead of a sync, per tensor: the MoE set's 18,867 names with tiny payloads.

With the payload almost nil, a sync's time is what the trainer and the receivers spend in Python per tensor
and per chunk, plus the store handshake. The buffer is sized so the plan has as many chunks as the real set
has with 1 GiB buffers (57 for MoE), so per-chunk work is counted the same way. gloo on the CPU: any machine.

    python bench/host_overhead.py --set moe --receivers 3 --syncs 20 --out host-overhead.json [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import multiprocessing as mp
import os
import platform
import pstats
import statistics
import sys
import time
from datetime import UTC, datetime
from typing import Any

import torch
from weightsync.runtime import WeightReceiver, WeightSender
from weightsync.runtime.local import group_envs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sync_bench import SETS, GiB, nbytes

ELEMENTS = 64  # per tensor: bf16, 128 bytes of payload


def tiny_params(set_name: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(ELEMENTS, generator=g).to(torch.bfloat16) for name, _ in SETS[set_name]()}


def buffer_for(set_name: str, real_buffer: int = GiB) -> int:
    """A buffer that cuts the tiny set into as many chunks as the real set has with `real_buffer`."""
    shapes = SETS[set_name]()
    chunks = max(1, -(-nbytes(shapes) // real_buffer))
    per_tensor = 256  # 128 bytes, aligned to the plan's 256
    return max(1 << 16, len(shapes) * per_tensor // chunks)  # the contract's smallest buffer is 64 KiB


def _profile_text(profiler: cProfile.Profile | None) -> str:
    if profiler is None:
        return ""
    profiler.disable()
    buf = io.StringIO()
    pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(15)
    return buf.getvalue()


def trainer(env: Any, set_name: str, syncs: int, profile: bool, idle: float, out: Any) -> None:
    params = tiny_params(set_name)
    items = list(params.items())
    profiler = cProfile.Profile() if profile else None
    rows = []
    with WeightSender(env, report_to_pod=False) as sender:
        for v in range(syncs + 1):
            if profiler is not None and v == 1:
                profiler.enable()
            time.sleep(idle)  # a training step: the receivers wait idle meanwhile
            t0 = time.perf_counter()
            sender.send(items, version=v)
            total = time.perf_counter() - t0
            rows.append({"total_ms": 1e3 * total, "first_byte_ms": 1e3 * sender.last_timings["first_byte_seconds"],
                         "layout_ms": 1e3 * sender.last_timings.get("layout_seconds", float("nan")),
                         "manifest_out_ms": 1e3 * sender.last_timings.get("manifest_out_seconds", float("nan")),
                         "go_ms": 1e3 * sender.last_timings.get("go_seconds", float("nan")),
                         "enqueue_ms": 1e3 * sender.last_timings["enqueue_seconds"]})
    out.put((0, rows, _profile_text(profiler)))


def receiver(env: Any, set_name: str, syncs: int, profile: bool, out: Any) -> None:
    params = {n: torch.empty_like(t) for n, t in tiny_params(set_name).items()}
    profiler = cProfile.Profile() if profile and env.rank_offset == 1 else None
    rows = []
    with WeightReceiver(env) as recv:
        for v in range(syncs + 1):
            if profiler is not None and v == 1:
                profiler.enable()
            recv.receive(into=params)
            timings = getattr(recv, "last_timings", {})  # older runtimes (for before/after runs) have none
            rows.append({"first_byte_ms": 1e3 * timings.get("first_byte_seconds", float("nan"))})
    out.put((env.rank_offset, rows, _profile_text(profiler)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", default="moe", choices=sorted(SETS))
    parser.add_argument("--receivers", type=int, default=3)
    parser.add_argument("--syncs", type=int, default=20)
    parser.add_argument("--profile", action="store_true", help="print the trainer's and rank 1's cProfile top 15")
    parser.add_argument("--idle-seconds", type=float, default=0.0,
                        help="the trainer waits this long before each sync (a training step), receivers wait idle")
    parser.add_argument("--out", default="host-overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    buffer = buffer_for(args.set)
    envs = group_envs(args.receivers, 1, timeout=120, buffer_bytes=buffer)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=trainer, args=(envs[0], args.set, args.syncs, args.profile, args.idle_seconds, out))]
    procs += [ctx.Process(target=receiver, args=(env, args.set, args.syncs, args.profile, out))
              for env in envs[1:]]
    for p in procs:
        p.start()
    results = dict((rank, (rows, text)) for rank, rows, text in (out.get(timeout=600) for _ in procs))
    for p in procs:
        p.join()
    steady = {rank: rows[1:] for rank, (rows, _) in results.items()}  # the first sync builds every cache

    def median(rank: int, key: str) -> float:
        return statistics.median(r[key] for r in steady[rank])

    summary = {
        "tensors": len(SETS[args.set]()), "receivers": args.receivers, "syncs": args.syncs,
        "idle_seconds": args.idle_seconds,
        "trainer_total_ms": median(0, "total_ms"), "trainer_first_byte_ms": median(0, "first_byte_ms"),
        "trainer_enqueue_ms": median(0, "enqueue_ms"), "trainer_layout_ms": median(0, "layout_ms"),
        "trainer_manifest_out_ms": median(0, "manifest_out_ms"),
        "trainer_go_ms": median(0, "go_ms"),
        "receiver_first_byte_ms": max(median(r, "first_byte_ms") for r in steady if r != 0),
        "first_sync_total_ms": results[0][0][0]["total_ms"],
    }
    per_tensor_us = 1e3 * summary["trainer_total_ms"] / summary["tensors"]
    import weightsync.runtime

    print(f"{args.set}: {summary['tensors']} tensors, {args.receivers} receivers, buffer {buffer} B, "
          f"runtime from {os.path.dirname(weightsync.runtime.__file__)}")
    for key, value in summary.items():
        print(f"  {key:<26} {value:10.2f}" if isinstance(value, float) else f"  {key:<26} {value:10d}")
    print(f"  trainer total per tensor   {per_tensor_us:10.2f} us")
    if args.profile:
        print("trainer:", results[0][1], "rank 1:", results[1][1], sep="\n")
    meta = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
            "python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or "",
            "cores": os.cpu_count(), "buffer_bytes": buffer}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "summary": summary, "per_sync": {str(k): v for k, v in steady.items()}}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
