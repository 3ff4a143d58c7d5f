"""Test scenarios for a sharded trainer: every rank of a real torch.distributed job (gloo, CPU) holds an FSDP2
(`fully_shard`) model and calls `WeightSender.send`; receivers are other processes. Nothing is mocked.

Memory is measured as the kernel sees it: each trainer process resets its peak resident set (VmHWM, through
/proc/self/clear_refs) right before a send and reads it right after; the test runs them with glibc's mmap
threshold low (MALLOC_MMAP_THRESHOLD_), so that a freed tensor's pages go back to the kernel and the peak is
the peak of what was live, not of what malloc kept.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import signal
import time
from collections.abc import Iterator
from multiprocessing.queues import Queue
from typing import Any

import torch
from local_members import _begin, _error, _result, digest

from weightsync.contract import MemberEnv


#: (name, shape, dtype) of the test model: Linear layers (weight, bias) of `width`, `layers` deep, then an
#: odd-sized head (uneven shards: 2 and 4 ranks do not divide its rows) and a bf16 embedding.
def model_layout(layers: int, width: int) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    out: list[tuple[str, tuple[int, ...], torch.dtype]] = [("embed.weight", (37, width), torch.bfloat16)]
    for i in range(layers):
        out += [(f"layers.{i}.weight", (width, width), torch.float32), (f"layers.{i}.bias", (width,), torch.float32)]
    out += [("head.weight", (13, width), torch.float32), ("head.bias", (13,), torch.float32)]
    return out


class _Model(torch.nn.Module):
    def __init__(self, layers: int, width: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(37, width, dtype=torch.bfloat16)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(layers))
        self.head = torch.nn.Linear(width, 13)


def _build(layers: int, width: int, mesh: Any) -> _Model:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = _Model(layers, width)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _hwm_reset() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field}")


def _full_digest(model: torch.nn.Module, rank: int) -> str:
    """digest() of the full state, gathered one tensor at a time (every rank joins; rank 0 hashes)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        with torch.no_grad():
            full = p.full_tensor()  # type: ignore[attr-defined]
        if rank == 0:
            h.update(f"{name}|{full.dtype}|{tuple(full.shape)}|".encode())
            flat = full.contiguous()
            h.update(ctypes.string_at(flat.data_ptr(), flat.numel() * flat.element_size()) if flat.numel() else b"")
        del full
    return h.hexdigest()


class _Faulty:
    """The model's parameters as a source whose gathers, on `victim`, stop at tensor `at`: SIGKILL (a real
    kill, after that gather), SIGSTOP (stopped there for good) or an exception (this rank never joins the next
    gather)."""

    def __init__(self, items: list[tuple[str, torch.Tensor]], victim: int, rank: int, at: int, how: str,
                 announce: Queue[Any] | None) -> None:
        from weightsync.runtime.source import NamedTensors

        self.inner = NamedTensors(items)
        self.victim, self.rank, self.at, self.how, self.announce = victim, rank, at, how, announce

    def tensors(self) -> Any:
        return self.inner.tensors()

    def iter_full(self, gather_only: bool = False) -> Iterator[torch.Tensor | None]:
        for i, t in enumerate(self.inner.iter_full(gather_only)):
            if self.rank == self.victim and i == self.at:
                if self.how in ("kill", "stop"):
                    if self.announce is not None:
                        self.announce.put({"rank": -100, "killed_at": time.time(), "victim": self.rank})
                        self.announce.close()
                        self.announce.join_thread()  # on its way before the kill
                    # stop: alive, connected, silent (a wedged or SIGSTOPped rank), until the group is torn down
                    os.kill(os.getpid(), signal.SIGKILL if self.how == "kill" else signal.SIGSTOP)
                raise RuntimeError(f"a bug in trainer rank {self.rank}'s producer")
            yield t


def run_fsdp_trainer(env: MemberEnv, rank: int, world: int, job_port: int, versions: int, results: Queue[Any],
                     layers: int = 4, width: int = 64, measure: bool = False,
                     fault: dict[str, Any] | None = None, job_timeout: float = 60.0) -> None:
    """Trainer rank `rank` of a `world`-rank FSDP2 job: sends `versions` versions, changing the weights
    between them. Reports per version the full digest (rank 0), the report, and with `measure` the peak
    extra resident memory of the send. `fault`: {victim, at, how: kill|stop|raise, version}."""
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(job_port), "RANK": str(rank),
                       "WORLD_SIZE": str(world)})
    tag = -1 - rank if rank else 0  # results: rank 0 as the sync group's 0, the others as -1, -2, ...
    _begin()
    import faulthandler
    import sys

    faulthandler.dump_traceback_later(100, exit=False, file=sys.stderr)
    try:
        dist.init_process_group("gloo", timeout=timedelta(seconds=job_timeout))
        mesh = init_device_mesh("cpu", (world,))
        model = _build(layers, width, mesh)
        from weightsync.runtime import WeightSender

        out: dict[str, Any] = {"digests": {}, "reports": [], "peaks": [], "baselines": []}
        # (WEIGHTSYNC_TRAINER_RANKS_PER_POD says the same in a pod; the rank is torch.distributed's)
        with WeightSender(env, trainer_world_size=world) as sender:
            assert (sender.trainer_rank, sender.trainer_world_size) == (rank, world)
            for v in range(versions):
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(1.0)
                named: Any = list(model.named_parameters())
                if fault is not None and fault.get("version", 0) == v:
                    named = _Faulty(named, fault["victim"], rank, fault["at"], fault["how"], fault.get("queue"))
                baseline = _hwm_reset() if measure else 0
                try:
                    report = sender.send(named, version=v)
                except BaseException as err:
                    results.put(_error(tag, err, trainer_rank=rank, trainer_ranks=list(
                        getattr(err, "trainer_ranks", ())), job_lost=getattr(err, "job_lost", None)))
                    # The job's collectives are out of step (a gather abandoned): leave without tearing the
                    # process group down, as a torchrun worker that raised would.
                    sender.close()
                    results.close()
                    results.join_thread()
                    os._exit(1)
                if measure:
                    out["peaks"].append(_status("VmHWM") - baseline)
                    out["baselines"].append(baseline)
                out["reports"].append(report.to_json())
                out["digests"][v] = _full_digest(model, rank)
        dist.destroy_process_group()
        results.put(_result(tag, trainer_rank=rank, **out))
    except BaseException as err:
        results.put(_error(tag, err, trainer_rank=rank))


def run_layout_receiver(env: MemberEnv, layers: int, width: int, versions: int, results: Queue[Any],
                        style: str = "into") -> None:
    """A receiver of the test model's full tensors: into destinations, or through a loader."""
    from weightsync.runtime import WeightReceiver

    rank = env.rank_offset
    _begin()
    try:
        with WeightReceiver(env) as receiver:
            destinations = {n: torch.empty(s, dtype=d) for n, s, d in model_layout(layers, width)}
            digests, reports = {}, []
            for v in range(versions):
                if style == "into":
                    report = receiver.receive(into=destinations)
                    digests[v] = digest(destinations.items())
                else:
                    got: dict[str, torch.Tensor] = {}
                    report = receiver.receive(lambda batch, got=got: got.update((n, t.clone()) for n, t in batch))
                    digests[v] = digest(got.items())
                reports.append(report.to_json())
            results.put(_result(rank, digests=digests, reports=reports))
    except BaseException as err:
        results.put(_error(rank, err))


def run_sharded_group(envs: list[MemberEnv], world: int, *, versions: int = 3, layers: int = 4, width: int = 64,
                      measure: bool = False, fault: dict[str, Any] | None = None,
                      wait: float = 120.0) -> dict[int, dict[str, Any]]:
    """A `world`-rank trainer job and every receiver of `envs`, each a process; results keyed by sync-group
    rank for rank 0 and the receivers, -1 - r for trainer rank r > 0. A killed rank is keyed by itself with
    `killed_at` (the time its kill came)."""
    import multiprocessing as mp

    from local_members import free_port

    ctx = mp.get_context("spawn")
    results: Queue[Any] = ctx.Queue()
    job_port = free_port()
    if fault is not None and fault.get("how") in ("kill", "stop"):
        fault = {**fault, "queue": results}
    procs = [ctx.Process(target=run_fsdp_trainer, args=(envs[0], r, world, job_port, versions, results),
                         kwargs={"layers": layers, "width": width, "measure": measure, "fault": fault},
                         name=f"weightsync-trainer-{r}") for r in range(world)]
    for i, env in enumerate(envs[1:]):
        procs.append(ctx.Process(target=run_layout_receiver, args=(env, layers, width, versions, results),
                                 kwargs={"style": "into" if i % 2 == 0 else "loader"}))
    for p in procs:
        p.start()
    expected = {0, *(-1 - r for r in range(1, world)), *(e.rank_offset for e in envs[1:])}
    out: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + wait
    import queue

    try:
        while expected - set(out):
            try:
                r = results.get(timeout=max(deadline - time.monotonic(), 0.1))
            except queue.Empty:
                out.update({k: {"rank": k, "error": "NoResult", "message": f"no result within {wait}s"}
                            for k in expected - set(out)})
                break
            if r["rank"] == -100:  # a victim's kill
                key = 0 if r["victim"] == 0 else -1 - r["victim"]
                out[key] = {"killed_at": r["killed_at"]}
                continue
            out.setdefault(r["rank"], r)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    return out
