"""Test scenarios: real sync-group members as local processes (spawned), and what they report back.

Each member is a real process talking over loopback (gloo) or NVLink (NCCL); nothing is mocked. Importable
as `local_members` from every test tier (tests/conftest.py puts tests/support on the path, which spawned
children inherit).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from multiprocessing.queues import Queue
from typing import Any

import torch
from weightsync.runtime.local import free_port, group_envs

from weightsync.contract import MemberEnv

__all__ = ["free_port", "group_envs"]

MIXED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.int8, torch.uint8,
                torch.int16, torch.int32, torch.int64, torch.bool, torch.float64, torch.complex64)


def make_tensors(count: int, version: int, device: str | torch.device = "cpu",
                 large_numel: int = 0) -> list[tuple[str, torch.Tensor]]:
    """`count` tensors of mixed dtypes and shapes (0-d, empty, non-contiguous), values depending on version.

    Shapes depend only on `count`, so every version has the same layout; `large_numel` adds one float32
    tensor of that many elements at the end (to exceed a small buffer).
    """
    g = torch.Generator().manual_seed(1234)
    vg = torch.Generator().manual_seed(version)
    out: list[tuple[str, torch.Tensor]] = []
    for i in range(count):
        dtype = MIXED_DTYPES[i % len(MIXED_DTYPES)]
        kind = int(torch.randint(0, 5, (1,), generator=g))
        if kind == 0:
            shape: tuple[int, ...] = ()
        elif kind == 1 and i % 7 == 0:
            shape = (0, int(torch.randint(1, 5, (1,), generator=g)))
        else:
            shape = tuple(int(d) for d in torch.randint(1, 40, (int(torch.randint(1, 4, (1,), generator=g)),),
                                                         generator=g))
        transposed = len(shape) == 2 and i % 3 == 0  # a non-contiguous source: a transposed view
        base = torch.randn(shape[::-1] if transposed else shape, generator=vg, dtype=torch.float32) * 8
        if dtype == torch.bool:
            t = base > 0
        elif dtype.is_complex:
            t = torch.complex(base, -base).to(dtype)
        elif dtype.is_floating_point:
            t = base.to(dtype)
        elif dtype == torch.uint8:
            t = base.abs().to(dtype)
        else:
            t = base.to(torch.int64).clamp(-100, 100).to(dtype)
        if transposed:
            t = t.t()
        out.append((f"layer.{i}.{str(dtype).removeprefix('torch.')}", t.to(device)))
    if large_numel:
        out.append(("large.weight", torch.randn(large_numel, generator=vg).to(device)))
    return out


def destinations_for(count: int, version: int, device: str | torch.device = "cpu",
                     large_numel: int = 0) -> dict[str, torch.Tensor]:
    """Contiguous, uninitialised destinations of `make_tensors(count, ...)`'s names, shapes and dtypes."""
    return {n: torch.empty_like(t, memory_format=torch.contiguous_format)
            for n, t in make_tensors(count, version, device, large_numel)}


def digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, t in sorted(named, key=lambda kv: kv[0]):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        flat = t.detach().cpu().contiguous()
        h.update(ctypes.string_at(flat.data_ptr(), flat.numel() * flat.element_size()) if flat.numel() else b"")
    return h.hexdigest()


_began = time.time()  # reset by each member when it starts its work: bounds are measured from there


def _begin() -> None:
    global _began
    _began = time.time()


def _result(rank: int, **kw: Any) -> dict[str, Any]:
    return {"rank": rank, "pid": os.getpid(), "began": _began, "at": time.time(), **kw}


def _error(rank: int, err: BaseException, **kw: Any) -> dict[str, Any]:
    ranks = getattr(err, "ranks", None) or getattr(err, "missing_ranks", None) or ()
    return _result(rank, error=type(err).__name__, message=str(err), ranks=list(ranks),
                   abandoned_version=getattr(err, "abandoned_version", None),
                   incomplete=getattr(err, "incomplete", False), trace=traceback.format_exc(), **kw)


def run_trainer(env: MemberEnv, versions: int, count: int, large_numel: int, results: Queue[Any],
                device: str = "cpu", send_kwargs: dict[str, Any] | None = None) -> None:
    from weightsync.runtime import WeightSender

    _begin()
    try:
        with WeightSender(env, device=device, **(send_kwargs or {})) as sender:
            digests, reports = {}, []
            for v in range(versions):
                named = make_tensors(count, v, device, large_numel)
                reports.append(sender.send(named, version=v).to_json())
                digests[v] = digest(named)
            results.put(_result(0, digests=digests, reports=reports))
    except BaseException as err:
        results.put(_error(0, err))


def run_receiver(env: MemberEnv, local_rank: int, versions: int, style: str, results: Queue[Any],
                 device: str = "cpu", count: int = 0, large_numel: int = 0, pause_in_loader: float = 0.0,
                 signals: Queue[Any] | None = None, exit_on_sigterm: bool = False,
                 shrink_large_after: int | None = None, signal_version: int | None = None) -> None:
    """Receive `versions` syncs. With `signals`, announce the first batch there; `pause_in_loader` seconds
    are spent in the loader for every batch (the test kills this process or another one meanwhile).
    `shrink_large_after`: once that version arrived, the destination of "large.weight" is replaced by one
    element smaller (an engine whose parameters changed between syncs). `signal_version`: signal and pause
    only during that version's sync."""
    from weightsync.runtime import WeightReceiver

    rank = env.rank_offset + local_rank
    if exit_on_sigterm:  # as an engine in a pod would: SIGTERM means leave now
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    _begin()
    abandoned: list[int] = []
    receiver = None
    try:
        with WeightReceiver(env, local_rank=local_rank, device=device) as receiver:
            digests, reports = {}, []
            destinations = destinations_for(count, 0, device, large_numel)
            for v in range(versions):
                got: dict[str, torch.Tensor] = {}

                def loader(batch: list[tuple[str, torch.Tensor]], got: dict[str, torch.Tensor] = got,
                           v: int = v) -> None:
                    if signal_version is not None and v != signal_version:
                        pass
                    else:
                        if signals is not None and not got:
                            signals.put(rank)
                        if pause_in_loader:
                            time.sleep(pause_in_loader)
                    for name, t in batch:
                        got[name] = t.clone()

                if style == "into":
                    report = receiver.receive(into=destinations)
                    digests[v] = digest(destinations.items())
                else:
                    report = receiver.receive(loader, on_abandon=lambda version, _err: abandoned.append(version))
                    digests[v] = digest(got.items())
                reports.append(report.to_json())
                if v == shrink_large_after:
                    destinations["large.weight"] = torch.empty(large_numel - 1, device=device)
            results.put(_result(rank, digests=digests, reports=reports))
    except BaseException as err:
        state = {} if receiver is None else {"holds_version": receiver.holds_version,
                                             "receiver_incomplete": receiver.incomplete}
        if receiver is not None and style == "into":
            state["held_digest"] = digest(destinations.items())
        results.put(_error(rank, err, loader_told_abandoned=abandoned, **state))


def run_polling_receiver(env: MemberEnv, count: int, signals: Queue[Any], results: Queue[Any]) -> None:
    """An engine that polls for weights between its own work: after a first sync (which forms the group),
    `receive(timeout=0.3)` until the next one arrives. Announces each time-out on `signals`; its result has
    that sync's version and digest, the time-outs and the runtime's threads alive at the end."""
    import threading

    from weightsync.runtime import WeightReceiver, WeightSyncError

    _begin()
    try:
        with WeightReceiver(env) as receiver:
            destinations = destinations_for(count, 0)
            receiver.receive(into=destinations)
            timeouts = 0
            while True:
                try:
                    report = receiver.receive(into=destinations, timeout=0.3)
                    break
                except WeightSyncError as err:
                    if "no sync started" not in str(err):
                        raise
                    timeouts += 1
                    signals.put(timeouts)
            runtime_threads = sum(1 for t in threading.enumerate() if t.name.startswith("weightsync"))
            results.put(_result(env.rank_offset, digest=digest(destinations.items()), version=report.version,
                                timeouts=timeouts, runtime_threads=runtime_threads))
    except BaseException as err:
        results.put(_error(env.rank_offset, err))


def kill(pid: int) -> float:
    """SIGKILL a member; returns the wall-clock time of the kill."""
    os.kill(pid, signal.SIGKILL)
    return time.time()


def run_group(envs: list[MemberEnv], *, versions: int = 2, count: int = 100, large_numel: int = 0,
              styles: tuple[str, ...] = ("into", "loader"), devices: dict[int, str] | None = None,
              skip_ranks: tuple[int, ...] = (), block_rank: int | None = None, block_seconds: float = 3600.0,
              kill_on_first_batch: int | None = None, receiver_large_numel: int | None = None,
              receiver_kwargs: dict[int, dict[str, Any]] | None = None,
              wait: float = 120.0) -> dict[int, dict[str, Any]]:
    """Run a trainer and every inference worker of `envs` as separate processes; returns results by rank.

    `receiver_large_numel` gives the receivers' destinations another size for the large tensor.
    `skip_ranks` never start (a member that never arrives). `block_rank` spends `block_seconds` in its
    loader for every batch (the default: it stops there); `kill_on_first_batch` names the rank SIGKILLed as
    soon as that rank's first batch arrives (mid-sync), and its result records `killed_at`. A rank that
    stops for good is not waited for. `receiver_kwargs` adds arguments of `run_receiver` by rank.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results: Queue[Any] = ctx.Queue()
    signals: Queue[Any] = ctx.Queue()
    devices = devices or {}
    procs: dict[int, Any] = {}
    target: Callable[..., None]
    args: tuple[Any, ...]
    for env in envs:
        for k in range(env.local_world_size):
            rank = env.rank_offset + k
            if rank in skip_ranks:
                continue
            device = devices.get(rank, "cpu")
            if env.role == "trainer":
                target, args, kwargs = run_trainer, (env, versions, count, large_numel, results, device), {}
            else:
                style = styles[(rank - 1) % len(styles)] if rank != block_rank else "loader"
                target, args = run_receiver, (env, k, versions, style, results, device)
                kwargs = {"count": count,
                          "large_numel": large_numel if receiver_large_numel is None else receiver_large_numel,
                          "pause_in_loader": block_seconds if rank == block_rank else 0.0,
                          "signals": signals if rank == block_rank else None,
                          **(receiver_kwargs or {}).get(rank, {})}
            procs[rank] = ctx.Process(target=target, args=args, kwargs=kwargs, name=f"weightsync-rank-{rank}")
    for p in procs.values():
        p.start()
    out: dict[int, dict[str, Any]] = {}
    expected = set(procs)
    if block_rank is not None:
        signals.get(timeout=wait)
        if block_seconds >= wait:
            expected.discard(block_rank)
        if kill_on_first_batch is not None:
            killed_at = kill(procs[kill_on_first_batch].pid)
            out[kill_on_first_batch] = {"rank": kill_on_first_batch, "killed_at": killed_at}
            expected.discard(kill_on_first_batch)
    deadline = time.monotonic() + wait
    try:
        while expected - set(out):
            r = results.get(timeout=max(deadline - time.monotonic(), 0.1))
            out.setdefault(r["rank"], r)
    finally:
        for p in procs.values():
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
    return out


def run_trainer_with_own_job(env: MemberEnv, job_port: int, versions: int, results: Queue[Any]) -> None:
    """A trainer that is also rank 0 of its own torch.distributed job (MASTER_ADDR/RANK set by the user):
    its training collectives and weightsync's group must both keep working, interleaved."""
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(job_port), "RANK": "0", "WORLD_SIZE": "2"})
    try:
        dist.init_process_group("gloo")
        from weightsync.runtime import WeightSender

        sums, digests = [], {}
        with WeightSender(env) as sender:
            for v in range(versions):
                grad = torch.full((4,), float(v + 1))
                dist.all_reduce(grad)  # the training job's own collective, before and after each sync
                named = make_tensors(30, v)
                sender.send(named, version=v)
                digests[v] = digest(named)
                dist.all_reduce(grad)
                sums.append(grad.tolist())
        env_after = {k: os.environ[k] for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
        dist.destroy_process_group()
        results.put(_result(0, digests=digests, sums=sums, env_after=env_after))
    except BaseException as err:
        results.put(_error(0, err))


def run_training_peer(job_port: int, versions: int, results: Queue[Any]) -> None:
    """Rank 1 of the trainer's own job (not a weightsync member)."""
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(job_port), "RANK": "1", "WORLD_SIZE": "2"})
    try:
        dist.init_process_group("gloo")
        sums = []
        for v in range(versions):
            grad = torch.full((4,), float(v + 1))
            dist.all_reduce(grad)
            dist.all_reduce(grad)
            sums.append(grad.tolist())
        dist.destroy_process_group()
        results.put(_result(-1, sums=sums))
    except BaseException as err:
        results.put(_error(-1, err))


def run_trainer_on_command(env: MemberEnv, count: int, commands: Queue[Any], results: Queue[Any],
                           device: str = "cpu") -> None:
    """A trainer that sends version v whenever `v` arrives on `commands` (None ends it); one result each.
    A command `(v, variant)` sends `tensors_as(variant, ...)` instead: a caller's mistake of that kind."""
    from weightsync.runtime import WeightSender

    _begin()
    with WeightSender(env, device=device) as sender:
        while (command := commands.get()) is not None:
            version, variant = command if isinstance(command, tuple) else (command, "pairs")
            try:
                named = make_tensors(count, version, device)
                report = sender.send(tensors_as(variant, named), version=version)
                results.put(_result(0, version=version, digest=digest(named), report=report.to_json()))
            except BaseException as err:
                results.put(_error(0, err, value_error=isinstance(err, ValueError)))


def tensors_as(variant: str, named: list[tuple[str, torch.Tensor]]) -> Any:
    """`named` as a caller might pass it: `pairs` (as is), `mapping` (a state dict), or with a mistake:
    `sparse` / `csr` (the first 2-D float tensor in a sparse layout, same name, shape and dtype),
    `duplicate` (the last name twice), `triple` (a third item in every pair)."""
    if variant == "pairs":
        return named
    if variant == "mapping":
        return dict(named)
    if variant in ("sparse", "csr"):
        i = sparse_victim(named)
        name, t = named[i]
        return [*named[:i], (name, t.to_sparse() if variant == "sparse" else t.to_sparse_csr()), *named[i + 1:]]
    if variant == "duplicate":
        return [*named, named[-1]]
    if variant == "triple":
        return [(n, t, "extra") for n, t in named]
    raise ValueError(variant)


def sparse_victim(named: list[tuple[str, torch.Tensor]]) -> int:
    floats = (torch.float16, torch.float32, torch.bfloat16, torch.float64)
    return next(i for i, (_, t) in enumerate(named) if t.dtype in floats and t.dim() == 2)


def end_on_command(commands: Queue[Any], *processes: Any, wait: float = 30.0) -> None:
    """Tell a `run_trainer_on_command` trainer to end, then join every process, killing any still alive
    after `wait` seconds."""
    commands.put(None)
    for p in processes:
        p.join(timeout=wait)
        if p.is_alive():
            p.kill()


def write_membership(annotations_file: str, epoch: int, world_size: int) -> None:
    """Write a downward-API style annotations file, atomically, as the kubelet would."""
    from weightsync.contract import EPOCH_ANNOTATION, WORLD_SIZE_ANNOTATION

    tmp = f"{annotations_file}.tmp"
    with open(tmp, "w") as f:
        f.write(f'{EPOCH_ANNOTATION}="{epoch}"\n{WORLD_SIZE_ANNOTATION}="{world_size}"\n')
    os.replace(tmp, annotations_file)


def run_receiver_until(env: MemberEnv, local_rank: int, count: int, last_version: int, results: Queue[Any],
                       style: str = "into", busy: dict[int, float] | None = None) -> None:
    """A long-lived engine: receives again and again, reporting every outcome (a version and its digest, or
    the error), until it holds `last_version`; the same process throughout. `busy[v]`: once v arrived, spend
    that many seconds elsewhere (a long generation step) before calling receive() again."""
    from weightsync.runtime import WeightReceiver, WeightSyncError

    rank = env.rank_offset + local_rank
    _begin()
    try:
        with WeightReceiver(env, local_rank=local_rank) as receiver:
            destinations = destinations_for(count, 0)
            params = {n: torch.nn.Parameter(t, requires_grad=t.is_floating_point() or t.is_complex())
                      for n, t in destinations.items()}  # as an engine's model holds them
            while True:
                got: dict[str, torch.Tensor] = {}

                def loader(batch: list[tuple[str, torch.Tensor]], got: dict[str, torch.Tensor] = got) -> None:
                    got.update((name, t.clone()) for name, t in batch)

                try:
                    if style == "into":
                        report = receiver.receive(into=params)
                        held = digest(params.items())
                    else:
                        report = receiver.receive(loader)
                        held = digest(got.items())
                except WeightSyncError as err:
                    results.put(_error(rank, err, pid=os.getpid()))
                    continue
                results.put(_result(rank, version=report.version, digest=held, epoch=report.epoch))
                if report.version >= last_version:
                    break
                if busy and report.version in busy:
                    time.sleep(busy[report.version])
        results.put(_result(rank, finished=True))
    except BaseException as err:
        results.put(_error(rank, err, finished=True))


def run_trainer_reporting_store(env: MemberEnv, count: int, syncs: int, results: Queue[Any],
                                large_numel: int = 0, sample_every: int = 100) -> None:
    """A trainer that sends `syncs` versions back to back and samples its store's keys and bytes."""
    from weightsync.runtime import WeightSender

    _begin()
    try:
        with WeightSender(env) as sender:
            variants = [make_tensors(count, k, large_numel=large_numel) for k in range(3)]
            samples = []
            for v in range(syncs):
                named = variants[v % len(variants)]
                sender.send(named, version=v)
                if v % sample_every == 0 or v == syncs - 1:
                    assert sender.group._client is not None
                    samples.append({"version": v, **sender.group._client.stats()})
            results.put(_result(0, samples=samples, digest=digest(named)))
    except BaseException as err:
        results.put(_error(0, err))


def run_receiver_counting(env: MemberEnv, count: int, syncs: int, results: Queue[Any], large_numel: int = 0) -> None:
    """Receives `syncs` versions into its destinations; reports the digest of the last."""
    from weightsync.runtime import WeightReceiver

    rank = env.rank_offset
    _begin()
    try:
        with WeightReceiver(env) as receiver:
            destinations = destinations_for(count, 0, large_numel=large_numel)
            for _ in range(syncs):
                report = receiver.receive(into=destinations)
            results.put(_result(rank, version=report.version, digest=digest(destinations.items())))
    except BaseException as err:
        results.put(_error(rank, err))


def many_tiny_tensors(count: int, version: int) -> list[tuple[str, torch.Tensor]]:
    """`count` one-element tensors (a huge MoE's tensor list, in miniature), values depending on version."""
    values = torch.arange(count, dtype=torch.float32) + version * count
    return [(f"experts.{i}.w", t) for i, t in enumerate(values.split(1))]


def run_many_tensors(env: MemberEnv, count: int, results: Queue[Any]) -> None:
    """Trainer or receiver of one sync of `many_tiny_tensors(count, 1)`; reports the digest."""
    from weightsync.runtime import WeightReceiver, WeightSender

    rank = env.rank_offset
    _begin()
    try:
        if env.role == "trainer":
            with WeightSender(env) as sender:
                named = many_tiny_tensors(count, 1)
                report = sender.send(named, version=1)
                results.put(_result(0, digest=digest(named), tensors=report.tensors))
        else:
            with WeightReceiver(env) as receiver:
                destinations = dict(many_tiny_tensors(count, 0))
                report = receiver.receive(into=destinations)
                results.put(_result(rank, digest=digest(destinations.items()), tensors=report.tensors))
    except BaseException as err:
        results.put(_error(rank, err))


def run_rogue(host: str, port: int, results: Queue[Any], flood: int = 300) -> None:
    """An attacker that reaches the trainer's store port but has no token: every attack a TCPStore client
    could make, plus garbage, oversized frames and a connection flood. Reports what each attempt got."""
    import socket
    import struct
    from datetime import timedelta

    import torch.distributed as dist

    outcome: dict[str, str] = {}
    try:  # 1. speak torch's TCPStore protocol: list keys, read the group record, write a fake manifest
        store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=3), use_libuv=True)
        try:
            outcome["list_keys"] = repr(store.list_keys()[:5])  # type: ignore[attr-defined]
        except Exception as err:
            outcome["list_keys"] = f"refused: {type(err).__name__}"
        try:
            store.set("weightsync/x/e0/f0/abort", '{"by":0,"reason":"rogue","ranks":[1]}')
            outcome["inject"] = "written"
        except Exception as err:
            outcome["inject"] = f"refused: {type(err).__name__}"
    except Exception as err:
        outcome["tcpstore_connect"] = f"refused: {type(err).__name__}"
    for name, head in (("garbage", os.urandom(64)), ("huge_frame", struct.pack("!Q", 1 << 40)),
                       ("huge_frame_32", struct.pack("!I", 0xFFFFFFF0))):
        sent = 0
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                s.sendall(head)
                filler = os.urandom(1 << 16)
                while sent < 256 << 20:  # keep pushing: an unauthenticated peer must be cut off, not buffered
                    s.sendall(filler)
                    sent += len(filler)
                outcome[name] = f"accepted {sent >> 20} MiB"
        except OSError as err:
            outcome[name] = f"cut off after {sent >> 10} KiB: {type(err).__name__}"
    flooders = []
    for _ in range(flood):  # connections that never speak
        try:
            flooders.append(socket.create_connection((host, port), timeout=2))
        except OSError:
            break
    outcome["flood_opened"] = str(len(flooders))
    results.put(_result(-2, outcome=outcome))
    time.sleep(3600)  # holds the flood open until the test kills this process


def rss_bytes(pid: int) -> int:
    """A process's resident set size."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def run_rekeying_receiver(env: MemberEnv, count: int, results: Queue[Any]) -> None:
    """Receives v0 into a dict, then re-keys the SAME dict in place (the same tensors under swapped names)
    and receives v1: each name must get its own tensor's bytes. Reports the digest of each."""
    from weightsync.runtime import WeightReceiver

    rank = env.rank_offset
    _begin()
    try:
        with WeightReceiver(env) as receiver:
            into = destinations_for(count, 0)
            receiver.receive(into=into)
            first = digest(into.items())
            names = list(into)
            tensors = list(into.values())
            into.clear()
            # Swap the destinations of every pair of same-shaped, same-dtype tensors: names move, order stays.
            by_layout: dict[tuple[Any, ...], list[int]] = {}
            for i, t in enumerate(tensors):
                by_layout.setdefault((t.dtype, tuple(t.shape)), []).append(i)
            mapping = list(range(len(names)))
            for group in by_layout.values():
                for a, b in zip(group[::2], group[1::2], strict=False):
                    mapping[a], mapping[b] = b, a
            for i, name in enumerate(names):
                into[name] = tensors[mapping[i]]
            receiver.receive(into=into)
            results.put(_result(rank, digests={0: first, 1: digest(into.items())}))
    except BaseException as err:
        results.put(_error(rank, err))
