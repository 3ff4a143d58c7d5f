"""Helpers to run a real sync group of local processes: for the test suite, benchmarks and users who want
to try their loader without a cluster. Each member is a real process talking over loopback (gloo) or
NVLink (NCCL); nothing is mocked.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import secrets
import signal
import socket
import time
import traceback
from collections.abc import Iterable
from multiprocessing.queues import Queue
from typing import Any

import torch

from weightsync.contract import MemberEnv

MIXED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.int8, torch.uint8,
                torch.int16, torch.int32, torch.int64, torch.bool, torch.float64, torch.complex64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def group_envs(replicas: int, workers_per_replica: int, *, backend: str = "gloo", port: int | None = None,
               timeout: float = 30.0, **overrides: Any) -> list[MemberEnv]:
    """The contract of a trainer plus `replicas` inference pods, all on this machine."""
    world = 1 + replicas * workers_per_replica
    common = {"name": "local", "namespace": "default", "master_addr": "127.0.0.1",
              "master_port": port or free_port(), "world_size": world, "backend": backend,
              "token": secrets.token_hex(16), "timeout_seconds": timeout,
              "annotations_file": "/nonexistent/weightsync-annotations", **overrides}
    envs = [MemberEnv(role="trainer", rank_offset=0, local_world_size=1, **common)]
    for r in range(replicas):
        envs.append(MemberEnv(role="inference", rank_offset=1 + r * workers_per_replica,
                              local_world_size=workers_per_replica, **common))
    return envs


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


def digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, t in sorted(named, key=lambda kv: kv[0]):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        flat = t.detach().cpu().contiguous()
        h.update(ctypes.string_at(flat.data_ptr(), flat.numel() * flat.element_size()) if flat.numel() else b"")
    return h.hexdigest()


def _result(rank: int, **kw: Any) -> dict[str, Any]:
    return {"rank": rank, "pid": os.getpid(), "at": time.time(), **kw}


def _error(rank: int, err: BaseException) -> dict[str, Any]:
    ranks = getattr(err, "ranks", None) or getattr(err, "missing_ranks", None) or ()
    return _result(rank, error=type(err).__name__, message=str(err), ranks=list(ranks),
                   trace=traceback.format_exc())


def run_trainer(env: MemberEnv, versions: int, count: int, large_numel: int, results: Queue[Any],
                device: str = "cpu", send_kwargs: dict[str, Any] | None = None) -> None:
    from weightsync.runtime import WeightSender

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
                 device: str = "cpu", count: int = 0, large_numel: int = 0, block_in_loader: bool = False,
                 signals: Queue[Any] | None = None) -> None:
    """Receive `versions` syncs; with `block_in_loader`, announce the first batch on `signals` and stop there
    (the test then kills this process or another one mid-sync)."""
    from weightsync.runtime import WeightReceiver

    rank = env.rank_offset + local_rank
    try:
        with WeightReceiver(env, local_rank=local_rank, device=device) as receiver:
            digests, reports = {}, []
            destinations = {n: torch.empty_like(t, memory_format=torch.contiguous_format)
                            for n, t in make_tensors(count, 0, device, large_numel)}
            for v in range(versions):
                got: dict[str, torch.Tensor] = {}

                def loader(batch: list[tuple[str, torch.Tensor]]) -> None:
                    if signals is not None:
                        signals.put(rank)
                    if block_in_loader:
                        time.sleep(3600)
                    for name, t in batch:
                        got[name] = t.clone()

                if style == "into":
                    report = receiver.receive(into=destinations)
                    digests[v] = digest(destinations.items())
                else:
                    report = receiver.receive(loader)
                    digests[v] = digest(got.items())
                reports.append(report.to_json())
            results.put(_result(rank, digests=digests, reports=reports))
    except BaseException as err:
        results.put(_error(rank, err))


def kill(pid: int) -> float:
    """SIGKILL a member; returns the wall-clock time of the kill."""
    os.kill(pid, signal.SIGKILL)
    return time.time()
