"""Weight-sync benchmark on GPUs: one trainer GPU broadcasting to every other GPU, bf16, in ONE run:

  raw flat NCCL broadcast of the same byte count   (the ceiling)
  naive per-tensor broadcast                        (one NCCL call per tensor)
  a vLLM-style packed baseline                      (concatenate until a chunk exceeds 1 GiB, 2 buffers,
                                                     host stream sync per chunk; the receiver allocates each
                                                     chunk, splits it and copies every tensor into place)
  weightsync, end to end through WeightSender.send / WeightReceiver.receive(into=own parameters), checked
  bit-exact afterwards, for a few buffer settings

for the dense (Qwen2.5-7B shapes) and MoE (Qwen3-30B-A3B shapes) parameter sets. Reports GB/s (payload bytes
over the trainer's wall time until every receiver finished), the ratio to raw flat broadcast, the receivers'
peak memory overhead and the time to first byte.

    python bench/sync_bench.py --sets dense moe --out results.json      (uses every visible GPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from weightsync.runtime import WeightReceiver, WeightSender, transfer
from weightsync.runtime.local import free_port, group_envs
from weightsync.runtime.nccl import NcclCommunicator, new_unique_id
from weightsync.runtime.settings import NcclTuning, RuntimeSettings
from weightsync.runtime.transfer import checksum

GiB = 1 << 30


def dense_shapes() -> list[tuple[str, tuple[int, ...]]]:
    h, kv, ff, vocab = 3584, 512, 18944, 152064
    out: list[tuple[str, tuple[int, ...]]] = [("embed", (vocab, h))]
    for i in range(28):
        p = f"layers.{i}."
        out += [(p + "q", (h, h)), (p + "q_bias", (h,)), (p + "k", (kv, h)), (p + "k_bias", (kv,)),
                (p + "v", (kv, h)), (p + "v_bias", (kv,)), (p + "o", (h, h)), (p + "gate", (ff, h)),
                (p + "up", (ff, h)), (p + "down", (h, ff)), (p + "ln1", (h,)), (p + "ln2", (h,))]
    return [*out, ("norm", (h,)), ("lm_head", (vocab, h))]


def moe_shapes() -> list[tuple[str, tuple[int, ...]]]:
    h, vocab = 2048, 151936
    out: list[tuple[str, tuple[int, ...]]] = [("embed", (vocab, h))]
    for i in range(48):
        p = f"layers.{i}."
        out += [(p + "q", (4096, h)), (p + "k", (512, h)), (p + "v", (512, h)), (p + "o", (h, 4096)),
                (p + "q_norm", (128,)), (p + "k_norm", (128,)), (p + "router", (128, h)), (p + "ln1", (h,)),
                (p + "ln2", (h,))]
        for e in range(128):
            q = f"{p}experts.{e}."
            out += [(q + "gate", (768, h)), (q + "up", (768, h)), (q + "down", (h, 768))]
    return [*out, ("norm", (h,)), ("lm_head", (vocab, h))]


SETS = {"dense": dense_shapes, "moe": moe_shapes}


def nbytes(shapes: list[tuple[str, tuple[int, ...]]]) -> int:
    total = 0
    for _, s in shapes:
        n = 1
        for d in s:
            n *= d
        total += 2 * n
    return total


def make_params(shapes: list[tuple[str, tuple[int, ...]]], device: torch.device, fill: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    params = {}
    for name, shape in shapes:
        t = torch.empty(shape, dtype=torch.bfloat16, device=device)
        if fill:
            t.normal_(generator=g)
        params[name] = t
    return params


def barrier(device: torch.device) -> None:
    dist.barrier(device_ids=[device.index])
    torch.cuda.synchronize(device)


class Timer:
    """Times one transfer the same way for every method: all ranks leave a barrier, the transfer runs, every
    rank synchronises its GPU, a second barrier; the trainer's wall time is the result."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def run(self, fn: Any) -> tuple[float, float, int]:
        barrier(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        t0 = time.perf_counter()
        first = fn(t0)
        torch.cuda.synchronize(self.device)
        barrier(self.device)
        seconds = time.perf_counter() - t0
        overhead = torch.cuda.max_memory_allocated(self.device) - base
        return seconds, (first - t0) if first else 0.0, overhead


def raw_flat(comm: NcclCommunicator, total: int, rank: int) -> Any:
    flat = torch.empty(total, dtype=torch.uint8, device=comm.device)

    def fn(t0: float) -> float:
        comm.start()
        comm.broadcast(flat, 0)
        first = time.perf_counter()
        comm.finish(lambda: None)
        return first

    return fn, flat


def per_tensor(comm: NcclCommunicator, params: dict[str, torch.Tensor]) -> Any:
    tensors = list(params.values())

    def fn(t0: float) -> float:
        comm.start()
        first = 0.0
        for t in tensors:
            comm.broadcast(t.view(-1).view(torch.uint8), 0)
            first = first or time.perf_counter()
        comm.finish(lambda: None)
        return first

    return fn


def vllm_style(comm: NcclCommunicator, params: dict[str, torch.Tensor], rank: int, chunk_bytes: int = GiB) -> Any:
    """Written from the description of vLLM's packed NCCL weight transfer (not its code)."""
    names = list(params)
    chunks: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name in names:
        current.append(name)
        size += params[name].numel() * 2
        if size > chunk_bytes:  # concatenate until the chunk exceeds the limit
            chunks.append(current)
            current, size = [], 0
    if current:
        chunks.append(current)
    device = comm.device
    stream = comm.comm_stream

    def fn(t0: float) -> float:
        first = 0.0
        in_flight: list[torch.cuda.Event] = []
        for chunk in chunks:
            if rank == 0:
                packed = torch.cat([params[n].reshape(-1) for n in chunk]).view(torch.uint8)
            else:
                packed = torch.empty(sum(params[n].numel() for n in chunk) * 2, dtype=torch.uint8, device=device)
            stream.wait_stream(torch.cuda.current_stream(device))
            comm.broadcast(packed, 0)
            first = first or time.perf_counter()
            done = torch.cuda.Event()
            done.record(stream)
            packed.record_stream(stream)
            if rank != 0:
                torch.cuda.current_stream(device).wait_event(done)
                offset = 0
                for n in chunk:
                    k = params[n].numel() * 2
                    params[n].copy_(packed[offset:offset + k].view(torch.bfloat16).view(params[n].shape))
                    offset += k
            in_flight.append(done)
            if len(in_flight) >= 2:  # two buffers: the host waits for the older one before packing more
                in_flight.pop(0).synchronize()
        comm.finish(lambda: None)
        torch.cuda.current_stream(device).synchronize()
        return first

    return fn


def config_label(cfg: dict[str, Any]) -> str:
    copy = "full-speed copies" if cfg["copy_programs"] is None else f"copies on {cfg['copy_programs']} blocks"
    extra = (", high-priority NCCL stream" if cfg["high_priority"] else "") + (
        f", CTAs {cfg['ctas'][0]}-{cfg['ctas'][1]}" if cfg["ctas"] != (None, None) else "")
    return f"weightsync {cfg['buffer_bytes'] >> 20} MiB x{cfg['num_buffers']}, {copy}{extra}"


def record_timeline(fn: Any, endpoint: Any, rank: int, world: int) -> list[list[dict[str, Any]]]:
    """One more sync with the GPU timeline on; every rank's spans (ms from its own first mark)."""
    timeline = transfer.Timeline()
    plain = endpoint.settings
    endpoint.settings = dataclasses.replace(plain, timeline=timeline)
    barrier(torch.device("cuda", rank))
    fn(time.perf_counter())
    torch.cuda.synchronize()
    endpoint.settings = plain
    rows = timeline.rows()
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, rows)
    return gathered


def timeline_summary(ranks: list[list[dict[str, Any]]]) -> list[str]:
    """Per rank: GPU time in broadcasts, the gaps between them, and in packing or unpacking copies."""
    out = []
    for rank, rows in enumerate(ranks):
        casts = sorted((r for r in rows if r["what"] == "broadcast"), key=lambda r: r["start_ms"])
        copies_ms = sum(r["end_ms"] - r["start_ms"] for r in rows if r["what"] != "broadcast")
        busy = sum(r["end_ms"] - r["start_ms"] for r in casts)
        gaps = sum(max(0.0, b["start_ms"] - a["end_ms"]) for a, b in itertools.pairwise(casts))
        end = max((r["end_ms"] for r in rows), default=0.0)
        first = casts[0]["start_ms"] if casts else 0.0
        out.append(f"rank {rank}: first broadcast at {first:.2f} ms, broadcasts {busy:.1f} ms in {len(casts)}, "
                   f"gaps {gaps:.2f} ms, copies {copies_ms:.1f} ms, last span ends {end:.1f} ms")
    return out


def member(rank: int, world: int, job_port: int, envs: list[Any], sets: list[str], iters: int,
           configs: list[dict[str, Any]], out_path: str, timeline: bool) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(job_port)})
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    uid = torch.empty(128, dtype=torch.uint8, device=device)
    if rank == 0:
        uid.copy_(torch.tensor(list(new_unique_id()), dtype=torch.uint8))
    dist.broadcast(uid, 0)
    comm = NcclCommunicator(bytes(uid.cpu().tolist()), rank, world, device, lambda: None)
    timer = Timer(device)
    results: dict[str, Any] = {}

    def log(msg: str) -> None:
        if rank == 0:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def measure(label: str, fn: Any, total: int, persistent: Any = lambda: 0) -> dict[str, Any]:
        """`persistent()`: bytes a method keeps allocated between syncs (its buffers), added to the peak."""
        runs = [timer.run(fn) for _ in range(iters + 1)][1:]  # the first run warms up
        secs = [r[0] for r in runs]
        overhead = torch.tensor([max(r[2] for r in runs) + persistent()], device=device)
        if rank == 0:
            overhead.zero_()  # receivers' overhead only
        dist.all_reduce(overhead, op=dist.ReduceOp.MAX)
        med = statistics.median(secs)
        row = {"seconds": secs, "seconds_median": med, "gbps": total / med / 1e9,
               "first_byte_ms": 1e3 * statistics.median(r[1] for r in runs),
               "receiver_peak_overhead_bytes": int(overhead.item())}
        log(f"{label:<34} {row['gbps']:7.1f} GB/s  median {med * 1e3:8.1f} ms  first byte "
            f"{row['first_byte_ms']:6.2f} ms  receiver overhead {row['receiver_peak_overhead_bytes'] / GiB:6.2f} GiB")
        return row

    for set_name in sets:
        shapes = SETS[set_name]()
        total = nbytes(shapes)
        log(f"== {set_name}: {len(shapes)} tensors, {total / 1e9:.1f} GB, {world - 1} receivers ==")
        params = make_params(shapes, device, fill=rank == 0)
        rows: dict[str, Any] = {}
        fn, flat = raw_flat(comm, total, rank)
        rows["raw_flat_broadcast"] = measure("raw flat broadcast", fn, total)
        del fn, flat
        torch.cuda.empty_cache()
        rows["per_tensor_broadcast"] = measure("per-tensor broadcast", per_tensor(comm, params), total)
        rows["vllm_style_packed"] = measure("vLLM-style packed (1 GiB x 2)", vllm_style(comm, params, rank), total)
        torch.cuda.empty_cache()
        for i, cfg in enumerate(configs):
            env = envs[i][0 if rank == 0 else rank]
            label = config_label(cfg)
            settings = RuntimeSettings(direct_threshold=cfg["direct"], copy_programs=cfg["copy_programs"],
                                       nccl=NcclTuning(cfg["high_priority"], *cfg["ctas"]))
            env = env.model_copy(update={"buffer_bytes": cfg["buffer_bytes"], "num_buffers": cfg["num_buffers"]})
            timings: list[dict[str, float]] = []
            if rank != 0:
                for t in params.values():
                    t.zero_()  # the baselines delivered the same data: weightsync must deliver it again
            if rank == 0:
                endpoint: Any = WeightSender(env, device=device, settings=settings, report_to_pod=False)
                items = list(params.items())

                def fn(t0: float, endpoint: Any = endpoint, items: Any = items, timings: Any = timings) -> float:
                    endpoint.send(items, version=len(timings))
                    timings.append(endpoint.last_timings)
                    return t0 + endpoint.last_timings["first_byte_seconds"]
            else:
                endpoint = WeightReceiver(env, device=device, settings=settings)

                def fn(t0: float, endpoint: Any = endpoint, params: Any = params) -> float:
                    endpoint.receive(into=params)
                    return 0.0

            row = measure(label, fn, total,
                          persistent=lambda endpoint=endpoint: 0 if rank == 0 else endpoint.buffers.nbytes)
            row["config"] = cfg
            if rank == 0:
                row["host_enqueue_ms"] = 1e3 * statistics.median(t["enqueue_seconds"] for t in timings[1:])
                row["trainer_layout_check_ms"] = 1e3 * statistics.median(t["layout_seconds"] for t in timings[1:])
                row["buffer_bytes_allocated"] = timings[-1]["buffer_bytes_allocated"]
            if timeline:
                row["timeline"] = record_timeline(fn, endpoint, rank, world)
                if rank == 0:
                    for line in timeline_summary(row["timeline"]):
                        log("    " + line)
            # Bit-exact check: every receiver's parameters against the trainer's, per-tensor checksums.
            sums = torch.stack([checksum(t) for t in params.values()])
            reference = sums.clone()
            dist.broadcast(reference, 0)
            mismatches = torch.tensor([int((sums != reference).sum().item())], device=device)
            dist.all_reduce(mismatches)
            row["bit_exact"] = int(mismatches.item()) == 0
            log(f"    bit-exact on every receiver: {row['bit_exact']}")
            endpoint.close()
            del endpoint, fn
            torch.cuda.empty_cache()
            rows[f"weightsync[{i}]"] = row
        raw = rows["raw_flat_broadcast"]["gbps"]
        for row in rows.values():
            row["ratio_to_raw"] = row["gbps"] / raw
        best = max((k for k in rows if k.startswith("weightsync")), key=lambda k: rows[k]["gbps"])
        results[set_name] = {"tensors": len(shapes), "bytes": total, "methods": rows, "best_weightsync": best}
        log(f"   best weightsync: {best} at {rows[best]['ratio_to_raw']:.3f} x raw")
        del params
        torch.cuda.empty_cache()
    comm.close()
    dist.destroy_process_group()
    if rank == 0:
        meta = {"gpus": world, "gpu_name": torch.cuda.get_device_name(0), "torch": torch.__version__,
                "nccl": comm.nccl.version, "iters": iters,
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "command": " ".join(sys.argv),
                "nccl_env": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}}
        with open(out_path, "w") as f:
            json.dump({"meta": meta, "sets": results}, f, indent=2)
        print(f"wrote {out_path}", flush=True)


def parse_config(spec: str) -> dict[str, Any]:
    buf, count, direct, *options = spec.split(":")
    cfg: dict[str, Any] = {"buffer_bytes": int(buf) << 20, "num_buffers": int(count), "direct": int(direct) << 20,
                           "copy_programs": RuntimeSettings().copy_programs, "high_priority": False,
                           "ctas": (None, None)}
    for option in options:
        key, _, value = option.partition("=")
        if key == "copy":
            cfg["copy_programs"] = None if value == "full" else int(value)
        elif key == "prio":
            cfg["high_priority"] = value == "high"
        elif key == "ctas":
            low, high = value.split("-")
            cfg["ctas"] = (int(low), int(high))
        else:
            raise SystemExit(f"unknown option {option!r} in --configs {spec!r}")
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["dense", "moe"], choices=sorted(SETS))
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", default="bench-results.json")
    parser.add_argument("--configs", default="1024:2:1024,1024:2:1024:copy=full,2048:2:2048",
                        help="weightsync settings to try, comma-separated: buffer MiB:buffers:direct-threshold MiB"
                             "[:copy=BLOCKS|full][:prio=high|normal][:ctas=MIN-MAX] (copy: thread blocks of the "
                             "bounded pack/unpack kernel, full: torch's full-speed copies; prio: the NCCL stream's "
                             "priority; ctas: ncclConfig_t minCTAs-maxCTAs)")
    parser.add_argument("--timeline", action="store_true",
                        help="after each weightsync setting, one more sync with the GPU timeline of every rank")
    args = parser.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    world = torch.cuda.device_count()
    if world < 2:
        raise SystemExit("needs at least 2 GPUs")
    configs = [parse_config(spec) for spec in args.configs.split(",")]
    envs = [group_envs(world - 1, 1, backend="nccl", timeout=300, port=free_port()) for _ in configs]
    mp.spawn(member, args=(world, free_port(), envs, args.sets, args.iters, configs, args.out, args.timeline),
             nprocs=world)


if __name__ == "__main__":
    main()
