"""The trainer's communicator with vLLM engines: rank 0 of one group, the source of every broadcast.

Two implementations of one small interface: NCCL (a raw unique id, runtime/nccl.py), as stock vLLM engines
use it, and gloo on CPU (tests, the CPU sandbox), built on a torch TCPStore the trainer hosts (gloo has no fp8:
an fp8 tensor travels as its bytes, uint8, the same count). Both run the
warm-up (one float32 summed over every rank) before any other collective, and broadcast each tensor as its
own dtype and element count, 0 elements included, as a vLLM worker posts its receives. Packing runs on a
lane of its own where the device allows it (a CUDA stream), ordered against the broadcasts by fences, so
no host synchronisation sits in the loop; every wait is bounded by the caller's check.
"""

from __future__ import annotations

import contextlib
import ctypes
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Protocol

import torch
import torch.distributed as dist
from weightsync.runtime.errors import TransportError
from weightsync.runtime.settings import NcclTuning

#: Called while waiting; raises to stop the wait (a failed engine call, the deadline).
Check = Callable[[], None]


class Fence(Protocol):
    def query(self) -> bool: ...


class EngineComm(Protocol):
    transport: str
    device: torch.device

    def warm_up(self, check: Check) -> None: ...
    def start(self) -> None: ...
    def pack(self, tensors: list[torch.Tensor], out: torch.Tensor, slot_free: Fence | None,
             check: Check) -> Fence | None: ...
    def broadcast(self, tensor: torch.Tensor, after: Fence | None) -> Fence: ...
    def finish(self, check: Check) -> None: ...
    def abort(self) -> None: ...
    def close(self) -> None: ...


def flat_bytes(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor`'s bytes as a flat uint8 tensor on `device` (a view when it is contiguous there)."""
    t = tensor.detach()
    if t.device != device:
        t = t.to(device)
    return t.reshape(-1).view(torch.uint8)


class _Works:
    def __init__(self, works: list[Any]) -> None:
        self.works = works

    def query(self) -> bool:
        return all(w.is_completed() for w in self.works)


def _wait(fence: Fence | None, check: Check) -> None:
    pause = 0.0002
    while fence is not None and not fence.query():
        check()
        time.sleep(pause)
        pause = min(pause * 2, 0.01)


class GlooEngineComm:
    """gloo rank 0 of `world_size`, on `store`; blocks until every rank joined (gloo's own rendezvous,
    bounded by `timeout`)."""

    transport = "gloo/tcp"

    def __init__(self, store: dist.Store, world_size: int, timeout: float) -> None:
        self.device = torch.device("cpu")
        self.world_size = world_size
        try:
            self._pg: Any = dist.ProcessGroupGloo(store, 0, world_size, timedelta(seconds=timeout))
        except RuntimeError as err:
            raise TransportError(f"gloo could not connect the group: {str(err).splitlines()[0]}") from err
        self._works: list[Any] = []

    def _issue(self, work: Any) -> _Works:
        self._works.append(work)
        return _Works([work])

    def warm_up(self, check: Check) -> None:
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.SUM
        self._issue(self._pg.allreduce([torch.zeros(1, dtype=torch.float32)], opts))
        self.finish(check)

    def start(self) -> None:
        return None

    def pack(self, tensors: list[torch.Tensor], out: torch.Tensor, slot_free: Fence | None,
             check: Check) -> Fence | None:
        _wait(slot_free, check)  # the slot's last broadcast has gone
        torch.cat([flat_bytes(t, self.device) for t in tensors], out=out)
        return None

    def broadcast(self, tensor: torch.Tensor, after: Fence | None) -> Fence:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        if tensor.dtype == torch.float8_e4m3fn:  # gloo has no fp8: the same bytes and count, as uint8
            tensor = tensor.view(torch.uint8)
        return self._issue(self._pg.broadcast([tensor], opts))

    def finish(self, check: Check) -> None:
        _wait(_Works(self._works), check)
        works, self._works = self._works, []
        try:
            for work in works:
                work.wait()  # returns at once; raises what the work failed with
        except RuntimeError as err:
            raise TransportError(f"gloo: {str(err).splitlines()[0]}") from err

    def abort(self) -> None:
        # gloo works cannot be cancelled, and destroying the group joins threads that sit in a stuck peer's
        # socket until gloo's own time-out: the broken group is abandoned instead (as comm.py does).
        pg, self._pg = self._pg, None
        self._works = []
        if pg is not None:
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(pg))

    def close(self) -> None:
        self._pg = None
        self._works = []


class NcclEngineComm:
    """NCCL rank 0 of `world_size` from a raw unique id, on `device` (runtime/nccl.py: non-blocking,
    abortable)."""

    def __init__(self, unique_id: bytes, world_size: int, device: torch.device, check: Check,
                 tuning: NcclTuning | None = None) -> None:
        from weightsync.runtime.nccl import NcclCommunicator

        self.device = device
        self._comm = NcclCommunicator(unique_id, 0, world_size, device, check, tuning)
        self.transport = self._comm.transport

    def warm_up(self, check: Check) -> None:
        self._comm.all_reduce_one(check)

    def start(self) -> None:
        self._comm.start()

    def pack(self, tensors: list[torch.Tensor], out: torch.Tensor, slot_free: Fence | None,
             check: Check) -> Fence | None:
        self._comm.compute_wait(slot_free, check)  # on the device: the slot's last broadcast has gone
        with self._comm.compute_lane():
            torch.cat([flat_bytes(t, self.device) for t in tensors], out=out)
        return self._comm.compute_fence()

    def broadcast(self, tensor: torch.Tensor, after: Fence | None) -> Fence:
        self._comm.comm_wait(after)
        self._comm.broadcast_typed(tensor, 0)
        return self._comm.comm_fence()

    def finish(self, check: Check) -> None:
        self._comm.finish(check)

    def abort(self) -> None:
        self._comm.abort()

    def close(self) -> None:
        with contextlib.suppress(TransportError):
            self._comm.close()
