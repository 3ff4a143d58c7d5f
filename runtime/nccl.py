"""NCCL through its C API (ctypes), created from a raw 128-byte unique id.

Going below torch's ProcessGroupNCCL lets a foreign peer (an inference engine with its own NCCL binding)
join with nothing but the id published in the store, and keeps every communicator abortable: it is created
non-blocking, every wait on it polls with a liveness check, and a dead peer leads to ncclCommAbort instead
of a hang.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch
from weightsync.runtime.comm import Check, Fence, host_wait
from weightsync.runtime.errors import TransportError, WeightSyncError
from weightsync.runtime.settings import NcclTuning

NCCL_UNIQUE_ID_BYTES = 128
_IN_PROGRESS = 7
_UINT8 = 1
_FLOAT32 = 7
_SUM = 0
_UNDEF_INT = -(2**31)
_API_MAGIC = 0xCAFEBEEF
_CONFIG_VERSION = 21700  # the ncclConfig_t layout below is NCCL 2.17's; newer NCCL fills later fields


class _UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_byte * NCCL_UNIQUE_ID_BYTES)]


class _Config(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_size_t),
        ("magic", ctypes.c_uint),
        ("version", ctypes.c_uint),
        ("blocking", ctypes.c_int),
        ("cgaClusterSize", ctypes.c_int),
        ("minCTAs", ctypes.c_int),
        ("maxCTAs", ctypes.c_int),
        ("netName", ctypes.c_char_p),
        ("splitShare", ctypes.c_int),
    ]


def _find_library() -> str:
    explicit = os.environ.get("WEIGHTSYNC_NCCL_LIBRARY")
    if explicit:
        return explicit
    for entry in sys.path:
        hits = glob.glob(os.path.join(entry, "nvidia", "nccl", "lib", "libnccl.so*"))
        if hits:
            return sorted(hits)[0]
    return "libnccl.so.2"


class _Lib:
    def __init__(self) -> None:
        self.path = _find_library()
        lib = ctypes.CDLL(self.path)
        self.lib = lib
        lib.ncclGetErrorString.restype = ctypes.c_char_p
        lib.ncclGetLastError.restype = ctypes.c_char_p
        lib.ncclCommInitRankConfig.argtypes = [
            ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, _UniqueId, ctypes.c_int, ctypes.POINTER(_Config)]
        lib.ncclBroadcast.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                      ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        lib.ncclAllReduce.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                      ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        lib.ncclCommGetAsyncError.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
        lib.ncclCommAbort.argtypes = [ctypes.c_void_p]
        lib.ncclCommDestroy.argtypes = [ctypes.c_void_p]
        lib.ncclCommFinalize.argtypes = [ctypes.c_void_p]
        version = ctypes.c_int()
        self.check(lib.ncclGetVersion(ctypes.byref(version)), "ncclGetVersion")
        self.version = version.value

    def error(self, code: int) -> str:
        return (self.lib.ncclGetErrorString(code) or b"?").decode()

    def check(self, code: int, what: str, comm: Any = None) -> int:
        if code not in (0, _IN_PROGRESS):
            detail = ""
            if comm is not None:
                detail = (self.lib.ncclGetLastError(comm) or b"").decode()
            raise TransportError(f"{what} failed: {self.error(code)} {detail}".strip())
        return code


_lib: _Lib | None = None


def library() -> _Lib:
    global _lib
    if _lib is None:
        _lib = _Lib()
    return _lib


#: ncclDataType_t of the torch dtypes a collective can carry as themselves (`broadcast_typed`).
NCCL_DTYPES: dict[torch.dtype, int] = {
    torch.int8: 0, torch.uint8: 1, torch.int32: 2, torch.int64: 4, torch.float16: 6, torch.float32: 7,
    torch.float64: 8, torch.bfloat16: 9, torch.float8_e4m3fn: 10,
}


def new_unique_id() -> bytes:
    uid = _UniqueId()
    library().check(library().lib.ncclGetUniqueId(ctypes.byref(uid)), "ncclGetUniqueId")
    return bytes(uid.internal)


def _new_stream(device: torch.device, high_priority: bool = False) -> torch.cuda.Stream:
    # torch's priorities: lower numbers run first; priority_range() is (lowest, highest).
    priority = torch.cuda.Stream.priority_range()[1] if high_priority else 0  # type: ignore[call-arg]
    return torch.cuda.Stream(device, priority=priority)  # type: ignore[no-untyped-call]


def _new_event() -> torch.cuda.Event:
    return torch.cuda.Event()  # type: ignore[no-untyped-call]


class _EventFence:
    def __init__(self, event: torch.cuda.Event) -> None:
        self.event = event

    def query(self) -> bool:
        return bool(self.event.query())  # type: ignore[no-untyped-call]


class NcclCommunicator:
    """One NCCL communicator with a comm stream and a compute stream on one GPU."""

    def __init__(self, unique_id: bytes, rank: int, world_size: int, device: torch.device, check: Check,
                 tuning: NcclTuning | None = None) -> None:
        tuning = tuning or NcclTuning()
        if len(unique_id) != NCCL_UNIQUE_ID_BYTES:
            raise WeightSyncError(f"an NCCL unique id has {NCCL_UNIQUE_ID_BYTES} bytes, got {len(unique_id)}")
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.nccl = library()
        self.transport = f"nccl {self.nccl.version // 10000}.{self.nccl.version // 100 % 100}"
        torch.cuda.set_device(device)
        self.tuning = tuning
        self.comm_stream = _new_stream(device, tuning.high_priority_comm)
        self.compute_stream = _new_stream(device)
        self._keep: list[torch.Tensor] = []  # tensors in flight on the comm stream, until finish()
        self._depth = 0
        uid = _UniqueId()
        ctypes.memmove(uid.internal, unique_id, NCCL_UNIQUE_ID_BYTES)
        config = _Config(ctypes.sizeof(_Config), _API_MAGIC, _CONFIG_VERSION, 0, _UNDEF_INT,
                         _UNDEF_INT if tuning.min_ctas is None else tuning.min_ctas,
                         _UNDEF_INT if tuning.max_ctas is None else tuning.max_ctas, None, _UNDEF_INT)
        comm = ctypes.c_void_p()
        self.nccl.check(self.nccl.lib.ncclCommInitRankConfig(
            ctypes.byref(comm), world_size, uid, rank, ctypes.byref(config)), "ncclCommInitRankConfig")
        self.comm: ctypes.c_void_p | None = comm
        try:
            self._settle("ncclCommInitRankConfig", check)
        except BaseException:
            self.abort()
            raise

    def _group_depth(self) -> int:
        """Inside ncclGroupStart/End a non-blocking call reports in-progress until the group ends."""
        return self._depth

    def _async_state(self) -> int:
        state = ctypes.c_int()
        self.nccl.lib.ncclCommGetAsyncError(self.comm, ctypes.byref(state))
        return state.value

    def _settle(self, what: str, check: Check) -> None:
        """Wait for a non-blocking NCCL call to be accepted, checking peers' liveness meanwhile."""
        # Spin first: a non-blocking launch is usually accepted within microseconds, and a sleep per call
        # would cost a whole scheduler tick for each of thousands of tensors.
        spin_until = time.perf_counter() + 0.005
        pause = 0.0001
        while (state := self._async_state()) == _IN_PROGRESS:
            if time.perf_counter() < spin_until:
                continue
            check()
            time.sleep(pause)
            pause = min(pause * 2, 0.01)
        self.nccl.check(state, what, self.comm)

    def broadcast(self, tensor: torch.Tensor, root: int) -> None:
        if tensor.numel() == 0:
            return
        self._keep.append(tensor)
        code = self.nccl.lib.ncclBroadcast(
            tensor.data_ptr(), tensor.data_ptr(), tensor.numel() * tensor.element_size(), _UINT8, root,
            self.comm, self.comm_stream.cuda_stream)
        self.nccl.check(code, "ncclBroadcast", self.comm)
        if code == _IN_PROGRESS and self._group_depth() == 0:
            self._settle("ncclBroadcast", lambda: None)

    def broadcast_typed(self, tensor: torch.Tensor, root: int) -> None:
        """Broadcast as the tensor's own NCCL datatype and element count (0 elements too), as a peer that
        posts a typed receive expects (vLLM's workers)."""
        datatype = NCCL_DTYPES.get(tensor.dtype)
        if datatype is None:
            raise TransportError(f"NCCL has no datatype for {tensor.dtype}")
        self._keep.append(tensor)
        code = self.nccl.lib.ncclBroadcast(tensor.data_ptr(), tensor.data_ptr(), tensor.numel(), datatype, root,
                                           self.comm, self.comm_stream.cuda_stream)
        self.nccl.check(code, "ncclBroadcast", self.comm)
        if code == _IN_PROGRESS and self._group_depth() == 0:
            self._settle("ncclBroadcast", lambda: None)

    def all_reduce_one(self, check: Check) -> None:
        """One float32 element summed over every rank, waited for (bounded by `check`): the warm-up a
        vLLM worker runs right after joining, before any other collective."""
        with torch.cuda.stream(self.comm_stream):
            value = torch.zeros(1, dtype=torch.float32, device=self.device)
        code = self.nccl.lib.ncclAllReduce(value.data_ptr(), value.data_ptr(), 1, _FLOAT32, _SUM, self.comm,
                                           self.comm_stream.cuda_stream)
        self.nccl.check(code, "ncclAllReduce", self.comm)
        if code == _IN_PROGRESS:
            self._settle("ncclAllReduce", check)
        self._keep.append(value)
        self.finish(check)

    def comm_fence(self) -> Fence:
        event = _new_event()
        event.record(self.comm_stream)
        return _EventFence(event)

    def compute_fence(self) -> Fence | None:
        event = _new_event()
        event.record(self.compute_stream)
        return _EventFence(event)

    def comm_wait(self, fence: Fence | None) -> None:
        if isinstance(fence, _EventFence):
            self.comm_stream.wait_event(fence.event)

    def compute_wait(self, fence: Fence | None, check: Check) -> None:
        if isinstance(fence, _EventFence):
            self.compute_stream.wait_event(fence.event)

    def start(self) -> None:
        """Order both lanes after the caller's pending work (its optimizer step, its forward pass)."""
        current = torch.cuda.current_stream(self.device)
        self.comm_stream.wait_stream(current)
        self.compute_stream.wait_stream(current)

    @contextlib.contextmanager
    def compute_lane(self) -> Iterator[None]:
        with torch.cuda.stream(self.compute_stream):
            yield

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Broadcasts issued inside are launched together (an NCCL group): one launch for many tensors."""
        self.nccl.check(self.nccl.lib.ncclGroupStart(), "ncclGroupStart", self.comm)
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            code = self.nccl.check(self.nccl.lib.ncclGroupEnd(), "ncclGroupEnd", self.comm)
            if code == _IN_PROGRESS:
                self._settle("ncclGroupEnd", lambda: None)

    def finish(self, check: Check) -> None:
        def check_and_poll_nccl() -> None:
            state = self._async_state()
            if state not in (0, _IN_PROGRESS):
                self.nccl.check(state, "NCCL broadcast", self.comm)
            check()

        try:
            host_wait(self.comm_fence(), check_and_poll_nccl)
            host_wait(self.compute_fence(), check_and_poll_nccl)
        except BaseException:
            self.abort()
            raise
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.compute_stream)
        current.wait_stream(self.comm_stream)
        self._keep.clear()

    def abort(self) -> None:
        if self.comm is not None:
            self.nccl.lib.ncclCommAbort(self.comm)
            self.comm = None
        self._keep.clear()

    def close(self) -> None:
        if self.comm is not None:
            self.nccl.lib.ncclCommDestroy(self.comm)
            self.comm = None
