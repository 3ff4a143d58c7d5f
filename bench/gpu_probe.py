"""What one GPU can tell about the data path, where no second GPU is lent (the broadcast itself needs two).

1. Packing and unpacking cost: the multi-tensor copy of every 1 GiB chunk of the dense and MoE sets, GPU time
   per chunk and GB/s (bytes copied), through weightsync's own plan and buffer views.
2. The trainer's side end to end on a one-rank NCCL communicator (a broadcast to nobody): the real
   `send_chunks` with the GPU timeline on, with full-speed and with bounded copies (runtime/copies.py);
   shows the host's time to first byte and enqueue time for 18,867 tensors on this host's CPU.
3. Contention, emulated: a receiver's pipeline where a copy kernel limited to a few thread blocks stands in
   for NCCL's receive (NCCL also runs a few dozen blocks per operation) and the real unpack follows each
   chunk on the compute stream, the next "receive" racing it for SMs. Measures how much longer each
   stand-in runs inside the pipeline than alone, with the comm stream at normal and at high priority.

    python bench/gpu_probe.py --out gpu-probe.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from typing import Any

import torch
import triton
import triton.language as tl
from weightsync.runtime import copies, nccl, transfer
from weightsync.runtime.packing import make_plan
from weightsync.runtime.settings import NcclTuning
from weightsync.runtime.transfer import Buffers, send_chunks, spec_of

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from sync_bench import SETS, GiB, make_params

DEVICE = torch.device("cuda", 0)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def plan_and_views(params: dict[str, torch.Tensor], buffer_bytes: int = GiB,
                   copy_programs: int | None = 32) -> tuple[Any, Any, Buffers]:
    specs = [spec_of(n, t) for n, t in params.items()]
    plan = make_plan(specs, buffer_bytes)
    buffers = Buffers(copy_programs)
    views = buffers.prepare(plan, specs, "probe", 2, DEVICE)
    return plan, views, buffers


def elapsed_ms(fn: Any, repeat: int = 5) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    times = []
    for _ in range(repeat):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def pack_costs(set_name: str, params: dict[str, torch.Tensor]) -> dict[str, Any]:
    plan, views, _ = plan_and_views(params)
    sources = list(params.values())
    packed = [i for i, c in enumerate(plan.chunks) if c.kind == "packed"]
    per_chunk = []
    for ci in packed[:6]:
        chunk = plan.chunks[ci]
        srcs = [sources[s.index] for s in chunk.slots]
        ms = elapsed_ms(lambda v=views[ci], s=srcs: torch._foreach_copy_(v, s))
        per_chunk.append({"chunk": ci, "tensors": len(srcs), "bytes": chunk.nbytes, "ms": ms,
                          "copy_gbps": 2 * chunk.nbytes / ms / 1e6})
    row = {"chunks": len(plan.chunks), "packed_chunks": len(packed), "per_chunk": per_chunk,
           "median_ms": statistics.median(r["ms"] for r in per_chunk),
           "median_copy_gbps": statistics.median(r["copy_gbps"] for r in per_chunk)}
    log(f"{set_name}: pack of a 1 GiB chunk {row['median_ms']:.3f} ms ({row['median_copy_gbps']:.0f} GB/s "
        f"read+write, {per_chunk[0]['tensors']} tensors), {len(packed)} packed chunks of {len(plan.chunks)}")
    return row


def trainer_alone(set_name: str, params: dict[str, torch.Tensor], copy_programs: int | None) -> dict[str, Any]:
    """The real send_chunks on a one-rank communicator: host timings and the GPU timeline."""
    tuning = NcclTuning()
    comm = nccl.NcclCommunicator(nccl.new_unique_id(), 0, 1, DEVICE, lambda: None, tuning)
    plan, views, buffers = plan_and_views(params, copy_programs=copy_programs)
    sources = list(params.values())
    runs = []
    timeline_object: transfer.Timeline | None = None
    for i in range(4):
        recording = transfer.Timeline() if i == 3 else None
        timeline_object = recording if recording is not None else timeline_object
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        first, enqueued = send_chunks(comm, plan, sources, views, buffers, lambda: None, recording)
        total = time.perf_counter() - t0
        runs.append({"first_byte_ms": 1e3 * (first - t0), "enqueue_ms": 1e3 * (enqueued - t0),
                     "total_ms": 1e3 * total})
    timeline = timeline_object.rows() if timeline_object is not None else []
    comm.close()
    packs = [r["end_ms"] - r["start_ms"] for r in timeline if r["what"] == "pack"]
    row = {"tuning": tuning.__dict__, "copy_programs": copy_programs, "runs": runs[1:], "timeline": timeline,
           "pack_ms_median": statistics.median(packs) if packs else 0.0,
           "gpu_span_ms": max(r["end_ms"] for r in timeline) if timeline else 0.0}
    last = runs[-1]
    log(f"{set_name} trainer alone, copies on {copy_programs or 'all'} blocks: first byte "
        f"{last['first_byte_ms']:.2f} ms, enqueue {last['enqueue_ms']:.1f} ms, total {last['total_ms']:.1f} ms, "
        f"GPU span {row['gpu_span_ms']:.1f} ms, pack {row['pack_ms_median']:.3f} ms/chunk")
    return row


@triton.jit
def _stand_in_receive(src, dst, n, BLOCK: tl.constexpr):
    """A persistent copy over a few programs: stands in for NCCL's receive kernel (a few dozen CTAs)."""
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    for start in range(pid * BLOCK, n, step):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


def stand_in(src: torch.Tensor, dst: torch.Tensor, ctas: int) -> None:
    n = min(src.numel(), dst.numel())
    _stand_in_receive[(ctas,)](src, dst, n, BLOCK=8192)


def contention(set_name: str, params: dict[str, torch.Tensor], ctas: int, high_priority: bool,
               unpack_programs: int | None = None) -> dict[str, Any]:
    """`unpack_programs`: unpack with the runtime's bounded copy (runtime/copies.py) on that many programs
    instead of foreach_copy_."""
    plan, views, buffers = plan_and_views(params)
    dests = list(params.values())
    packed = [i for i, c in enumerate(plan.chunks) if c.kind == "packed"][:12]
    bounded = copies.BoundedCopies(unpack_programs)

    def unpack(ci: int) -> None:
        targets = [dests[sl.index] for sl in plan.chunks[ci].slots]
        if unpack_programs:
            bounded.copy(("unpack", ci), targets, views[ci], bounded=True)
        else:
            torch._foreach_copy_(targets, views[ci])

    unpack_alone = statistics.median(elapsed_ms(lambda ci=ci: unpack(ci)) for ci in packed[:4])
    assert not unpack_programs or (bounded.kernel_copies and copies.unavailable_reason is None), \
        f"the bounded copy kernel did not run: {copies.unavailable_reason}"
    wire = torch.empty(GiB // 8, dtype=torch.int64, device=DEVICE)  # "the wire": read by the stand-in
    bufs = [b[: b.numel() // 8 * 8].view(torch.int64) for b in buffers.buffers]
    comm = torch.cuda.Stream(DEVICE, priority=torch.cuda.Stream.priority_range()[1] if high_priority else 0)
    compute = torch.cuda.Stream(DEVICE)
    alone = elapsed_ms(lambda: stand_in(wire, bufs[0], ctas))

    def pipeline(spans: list[tuple[Any, Any]]) -> None:
        reusable: list[Any] = [None, None]
        for k, ci in enumerate(packed):
            b = k % 2
            with torch.cuda.stream(comm):
                if reusable[b] is not None:
                    comm.wait_event(reusable[b])
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record(comm)
                stand_in(wire, bufs[b], ctas)
                e.record(comm)
                spans.append((s, e))
            compute.wait_event(e)
            with torch.cuda.stream(compute):
                unpack(ci)
                done = torch.cuda.Event()
                done.record(compute)
                reusable[b] = done

    results = []
    for _ in range(3):
        spans: list[tuple[Any, Any]] = []
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        pipeline(spans)
        torch.cuda.synchronize()
        wall = 1e3 * (time.perf_counter() - t0)
        inside = [s.elapsed_time(e) for s, e in spans]
        results.append({"wall_ms": wall, "stand_in_ms": inside})
    inside = results[-1]["stand_in_ms"]
    row = {"ctas": ctas, "high_priority_comm": high_priority, "unpack_programs": unpack_programs,
           "unpack_alone_ms": unpack_alone, "stand_in_alone_ms": alone,
           "stand_in_in_pipeline_median_ms": statistics.median(inside[1:]),
           "slowdown": statistics.median(inside[1:]) / alone, "wall_ms": results[-1]["wall_ms"],
           "ideal_ms": alone * len(packed), "chunks": len(packed)}
    log(f"{set_name} contention, stand-in {ctas} CTAs ({GiB / alone / 1e6:.0f} GB/s alone), comm priority "
        f"{'high' if high_priority else 'normal'}, unpack {unpack_programs or 'foreach'} "
        f"({unpack_alone:.2f} ms alone): stand-in {row['stand_in_in_pipeline_median_ms']:.3f} ms in the "
        f"pipeline vs {alone:.3f} alone (x{row['slowdown']:.3f}); wall {row['wall_ms']:.1f} ms vs "
        f"{row['ideal_ms']:.1f} ideal")
    return row


def check_bounded_copy(params: dict[str, torch.Tensor]) -> bool:
    """The runtime's bounded copy moves every byte of a chunk (bit-exact), through its Triton kernel."""
    plan, views, _ = plan_and_views(params)
    ci = next(i for i, c in enumerate(plan.chunks) if c.kind == "packed")
    sources = [list(params.values())[sl.index] for sl in plan.chunks[ci].slots]
    bounded = copies.BoundedCopies(16)
    bounded.copy(("pack", ci), views[ci], sources, bounded=True)
    ok = bounded.kernel_copies == 1 and all(torch.equal(v, s) for v, s in zip(views[ci], sources, strict=True))
    log(f"bounded copy kernel bit-exact on chunk {ci} ({len(sources)} tensors): {ok}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["dense", "moe"], choices=sorted(SETS))
    parser.add_argument("--ctas", type=int, nargs="+", default=[8, 24], help="stand-in receive's thread blocks")
    parser.add_argument("--unpack-programs", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--compare-priority", action="store_true",
                        help="run every contention case with the stand-in's stream at normal and at high priority")
    parser.add_argument("--out", default="gpu-probe.json")
    args = parser.parse_args()
    torch.cuda.set_device(DEVICE)
    out: dict[str, Any] = {"meta": {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                                    "nccl": nccl.library().version, "triton": triton.__version__,
                                    "date": datetime.now(UTC).isoformat(timespec="seconds"),
                                    "command": " ".join(sys.argv)}, "sets": {}}
    for set_name in args.sets:
        params = make_params(SETS[set_name](), DEVICE, fill=True)
        row: dict[str, Any] = {"pack": pack_costs(set_name, params)}
        row["trainer_alone"] = [trainer_alone(set_name, params, p) for p in (None, 32, 64)]
        row["unpack_check"] = check_bounded_copy(params)
        row["contention"] = [contention(set_name, params, c, prio, u) for c in args.ctas
                             for prio in ((False, True) if args.compare_priority else (False,))
                             for u in (None, *args.unpack_programs)]
        out["sets"][set_name] = row
        del params
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
