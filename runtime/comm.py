"""Communicators: move buffers between members, nothing else.

Both backends expose the same small interface so that the sender and receiver above them are one code
path: broadcasts are enqueued on the communicator's "comm" lane, packing and unpacking run on the "compute"
lane, and `Fence`s order the two without host synchronisation where the device allows it (CUDA events on
NCCL; on gloo the compute lane is the host itself, so waiting on a fence is a bounded host wait).
"""

from __future__ import annotations

import contextlib
import ctypes
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, Protocol

import torch
import torch.distributed as dist
from weightsync.runtime.errors import TransportError, WeightSyncError

#: Called while waiting; raises (PeerLostError, TimeoutError) to stop the wait.
Check = Callable[[], None]


def member_device(requested: torch.device | str | None, backend: str, cuda_index: Callable[[], int]) -> torch.device:
    """The device a member's buffers live on: `requested` if given, the CPU for gloo, else the CUDA device
    `cuda_index()` picks (called only when a GPU is visible)."""
    if requested is not None:
        return torch.device(requested)
    if backend == "gloo":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise WeightSyncError("WEIGHTSYNC_BACKEND=nccl needs a CUDA GPU and none is visible; "
                              "use the gloo backend on CPU")
    return torch.device("cuda", cuda_index())


class Fence(Protocol):
    def query(self) -> bool: ...


class Communicator(Protocol):
    rank: int
    world_size: int
    device: torch.device
    transport: str

    def start(self) -> None: ...
    def broadcast(self, tensor: torch.Tensor, root: int) -> None: ...
    def comm_fence(self) -> Fence: ...
    def compute_fence(self) -> Fence | None: ...
    def comm_wait(self, fence: Fence | None) -> None: ...
    def compute_wait(self, fence: Fence | None, check: Check) -> None: ...
    def compute_lane(self) -> contextlib.AbstractContextManager[None]: ...
    def batch(self) -> contextlib.AbstractContextManager[None]: ...
    def finish(self, check: Check) -> None: ...
    def abort(self) -> None: ...
    def close(self) -> None: ...


class _WorkFence:
    """Done when every work it covers is: gloo completes the works of one group out of order."""

    def __init__(self, works: list[dist.Work]) -> None:
        self.works = works

    def query(self) -> bool:
        return all(w.is_completed() for w in self.works)


def host_wait(fence: Fence | None, check: Check) -> None:
    """Poll `fence` until done, running `check` between polls (it raises on a dead peer or a timeout)."""
    if fence is None:
        return
    pause = 0.0002
    while not fence.query():
        check()
        time.sleep(pause)
        pause = min(pause * 2, 0.01)
    if isinstance(fence, _WorkFence):
        try:
            for work in fence.works:
                work.wait()  # surfaces an error the work finished with
        except RuntimeError as err:
            raise TransportError(f"gloo broadcast failed: {err}") from err


class GlooCommunicator:
    """gloo on CPU, built on the rendezvous store; never touches torch.distributed's default group."""

    transport = "gloo/tcp"

    def __init__(self, store: dist.Store, rank: int, world_size: int, timeout: float) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device("cpu")
        # Typed loosely: torch's stubs omit the collectives that ProcessGroupGloo inherits at run time.
        self._pg: Any = dist.ProcessGroupGloo(store, rank, world_size, timedelta(seconds=timeout))
        self._pending: list[dist.Work] = []  # works not yet seen complete

    def start(self) -> None:
        return None

    def broadcast(self, tensor: torch.Tensor, root: int) -> None:
        if tensor.numel() == 0:
            return
        opts = dist.BroadcastOptions()
        opts.rootRank = root
        self._pending.append(self._pg.broadcast([tensor], opts))

    def comm_fence(self) -> Fence:
        """Covers every broadcast issued so far: a fence over only the last one would let a reader see a
        tensor whose bytes have not all arrived (gloo's works of one batch finish in any order)."""
        pending = []
        for work in self._pending:
            if not work.is_completed():
                pending.append(work)
                continue
            try:
                work.wait()  # returns at once; raises if it failed
            except RuntimeError as err:
                raise TransportError(f"gloo broadcast failed: {err}") from err
        self._pending = pending
        return _WorkFence(list(pending))

    def compute_fence(self) -> Fence | None:
        return None  # compute on the host is synchronous

    def comm_wait(self, fence: Fence | None) -> None:
        return None  # host compute (packing) already happened when a broadcast is issued

    def compute_wait(self, fence: Fence | None, check: Check) -> None:
        host_wait(fence, check)

    @contextlib.contextmanager
    def compute_lane(self) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        yield  # gloo runs works one by one

    def finish(self, check: Check) -> None:
        host_wait(self.comm_fence(), check)

    def abort(self) -> None:
        # gloo works cannot be cancelled: destroying (or aborting) the group joins worker threads that sit
        # in a stuck peer's socket until gloo's own time-out. The broken group is abandoned instead: one
        # extra reference keeps its destructor from ever running in this process (a small, bounded leak
        # on a path that only a dead peer takes).
        pg, self._pg = self._pg, None
        if pg is not None:
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(pg))

    def close(self) -> None:
        self._pg = None
