"""A stand-in for a stock vLLM 0.33 server: its RL control plane over real HTTP, with a real receiver behind it.

    python tests/support/vllm_standin.py --port 0 --workers 2 [--log requests.jsonl] [--fail-at update_weights]

Written from the protocol as docs/runtime.md states it (read from vLLM 0.33's wheel), not from vLLM's code:
the routes, methods, query vs body, answers, 400 for a malformed body, 500 for a worker's error (unknown keys
in init_info/update_info, session-state errors, a view that fails), the session state machine (start, update, finish),
`weight_version` "default" until a successful finish sets it, pause/resume/is_paused, shutdown refused
while a session is active. K worker ranks (threads, each with its own group) join the trainer's group at
rank_offset..rank_offset+K-1, run the warm-up, and receive per update_info as vLLM's consumer does:
packed, one uint8 broadcast per chunk (the chunk-closing rule with B from init_info) viewed with
`chunk.split(sizes)[i].contiguous().view(dtype)` (so a misaligned order fails as in vLLM); unpacked, one
broadcast per tensor of its dtype; three empty lists reuse the previous tensor list.

Groups: the TCP form joins a gloo group on CPU (this runtime's CPU convention: the trainer's TCPStore, under
the prefix it names at `weightsync/vllm-gloo/formation`), or NCCL with `--comm nccl` (the id read from the
pickle at `broadcast_from/0/0` by walking its opcodes, never unpickled); the unique-id form joins NCCL
through runtime/nccl.py (GPUs only).

It records every request (method, path, query, body) and, per worker, every tensor's sha256 and every
broadcast's dtype and count: `GET /debug/requests`, `/debug/tensors?version=V`, `/debug/broadcasts`,
`/debug/state`; `POST /debug/faults` replaces the faults (and restarts their counts). Faults, by flag or
there: `--fail-at STEP[:N]` answers 500 to the N-th call of STEP (a route name: update_weights, ...),
`--stall-at STEP[:N]` leaves that call unanswered (for --stall-seconds, then the connection closes),
`--world-size N` reports N workers, `--stale-version` keeps reporting the version before the last finish.
As stock vLLM, it serves the weight-transfer routes only with `VLLM_SERVER_DEV_MODE` a non-zero integer
(else they are 404; a value that is not an integer ends it at start, as `bool(int(...))` does in vLLM) and
builds its transfer engine only with `--weight-transfer-config '{"backend": "nccl"}'` (else every
weight-transfer call is a 500 "Weight transfer not configured"). `--print-checksums` prints, after every
finish that sets a version, one line per worker for a user to compare with the trainer's:
`loaded v=<version> worker=<k> tensors=<n> checksum=<16 hex>` (sha256 over the tensors sorted by name, of
`name|dtype|shape|` and the raw bytes: examples/demo/demo_model.py's checksum).
A stall does not hold the engine: other calls are served meanwhile (a real vLLM engine runs one call at a
time, so there everything after a stuck call waits too).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import ctypes
import hashlib
import json
import math
import os
import pickletools
import sys
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import torch
import torch.distributed as dist

INIT_FIELDS = ("rank_offset", "world_size", "master_address", "master_port", "nccl_unique_id_b64", "packed",
               "packed_buffer_size_bytes", "packed_num_buffers")
UPDATE_FIELDS = ("names", "dtype_names", "shapes")
#: What vLLM's worker can receive unpacked (its NCCL dtype map).
RECEIVABLE = (torch.int8, torch.uint8, torch.int32, torch.int64, torch.float16, torch.float32, torch.float64,
              torch.bfloat16, torch.float8_e4m3fn)
PAUSE_MODES = ("abort", "wait", "keep")
UNIQUE_ID_KEY = "broadcast_from/0/0"
UNIQUE_ID_GLOBALS = ["_ctypes", "_unpickle", "vllm.distributed.device_communicators.pynccl_wrapper",
                     "ncclUniqueId"]
#: This runtime's CPU convention (runtime/vllm_sender.py): the trainer names the formation here.
GLOO_FORMATION_KEY = "weightsync/vllm-gloo/formation"
GLOO_PREFIX = "weightsync/vllm-gloo/"
STEPS = ("get_world_size", "pause", "resume", "is_paused", "init_weight_transfer_engine",
         "shutdown_weight_transfer_engine", "start_weight_update", "update_weights", "finish_weight_update",
         "update_weight_version", "weight_info")


class BadRequest(Exception):
    """A malformed request: 400, as FastAPI's validation error."""


class WorkerError(Exception):
    """A worker raised: 500, as `Call to collective_rpc method failed: ...`."""


def unique_id_from_pickle(data: bytes) -> bytes:
    """The 128 bytes of vLLM's pickled ncclUniqueId, read by walking its opcodes (nothing is unpickled):
    `_ctypes._unpickle(vllm...pynccl_wrapper.ncclUniqueId, ({}, <128 bytes>))` and nothing else."""
    strings, raw, ops = [], None, []
    for op, arg, _ in pickletools.genops(data):
        ops.append(op.name)
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name in ("SHORT_BINBYTES", "BINBYTES"):
            raw = arg
        elif op.name == "GLOBAL":
            strings += str(arg).split(" ")
    allowed = {"PROTO", "FRAME", "SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "GLOBAL", "MEMOIZE", "STACK_GLOBAL",
               "EMPTY_DICT", "SHORT_BINBYTES", "BINBYTES", "TUPLE2", "REDUCE", "STOP"}
    if strings != UNIQUE_ID_GLOBALS or not isinstance(raw, bytes) or len(raw) != 128 or set(ops) - allowed:
        raise WorkerError(f"the value at {UNIQUE_ID_KEY} is not a pickled vLLM ncclUniqueId: globals {strings}, "
                          f"opcodes {sorted(set(ops) - allowed)} not expected")
    return raw


def sha256_of(t: torch.Tensor) -> str:
    flat = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(ctypes.string_at(flat.data_ptr(), flat.numel()) if flat.numel() else b"").hexdigest()


class Faults:
    def __init__(self, fail_at: list[str], stall_at: list[str], stall_seconds: float | None,
                 world_size: int | None, stale_version: bool) -> None:
        self.fail = self._parse(fail_at)
        self.stall = self._parse(stall_at)
        self.stall_seconds = stall_seconds
        self.world_size = world_size
        self.stale_version = stale_version
        self.calls: dict[str, int] = {}

    @staticmethod
    def _parse(specs: list[str]) -> set[tuple[str, int]]:
        out = set()
        for spec in specs:
            step, _, nth = spec.partition(":")
            if step not in STEPS:
                raise SystemExit(f"unknown step {step!r}; steps: {', '.join(STEPS)}")
            out.add((step, int(nth or 1)))
        return out

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Faults:
        return cls(list(doc.get("fail_at", [])), list(doc.get("stall_at", [])), doc.get("stall_seconds"),
                   doc.get("world_size"), bool(doc.get("stale_version", False)))

    def hit(self, step: str) -> str | None:
        n = self.calls[step] = self.calls.get(step, 0) + 1
        if (step, n) in self.fail:
            return "fail"
        if (step, n) in self.stall:
            return "stall"
        return None


class Worker:
    """One worker rank of the server: its own group with the trainer."""

    def __init__(self, rank: int, device: torch.device) -> None:
        self.rank = rank
        self.device = device
        self.pg: Any = None
        self.nccl: Any = None
        self.store: Any = None

    def join_gloo(self, info: dict[str, Any], timeout: float) -> None:
        store = dist.TCPStore(info["master_address"], info["master_port"], info["world_size"], False,
                              timedelta(seconds=timeout))
        formation = store.get(GLOO_FORMATION_KEY).decode()
        if not formation.isdigit():
            raise WorkerError(f"{GLOO_FORMATION_KEY} holds {formation!r}, not a formation number")
        self.store = store
        self.pg = dist.ProcessGroupGloo(dist.PrefixStore(f"{GLOO_PREFIX}{formation}/", store), self.rank,
                                        info["world_size"], timedelta(seconds=timeout))

    def join_nccl(self, unique_id: bytes, world_size: int, timeout: float) -> None:
        from weightsync.runtime.nccl import NcclCommunicator

        deadline = time.monotonic() + timeout

        def check() -> None:
            if time.monotonic() > deadline:
                raise WorkerError(f"rank {self.rank}: NCCL did not connect within {timeout}s")

        self.nccl = NcclCommunicator(unique_id, self.rank, world_size, self.device, check)
        self._timeout = timeout

    def _nccl_check(self) -> Callable[[], None]:
        deadline = time.monotonic() + self._timeout

        def check() -> None:
            if time.monotonic() > deadline:
                raise WorkerError(f"rank {self.rank}: a broadcast did not complete within {self._timeout}s")

        return check

    def warm_up(self) -> None:
        if self.nccl is not None:
            torch.cuda.set_device(self.device)  # each call runs on a thread of its own
            self.nccl.all_reduce_one(self._nccl_check())
            return
        value = torch.zeros(1, dtype=torch.float32)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.SUM
        self.pg.allreduce([value], opts).wait()

    def receive(self, tensor: torch.Tensor) -> None:
        """One broadcast from rank 0, of the tensor's dtype and element count."""
        if self.nccl is not None:
            torch.cuda.set_device(self.device)
            self.nccl.broadcast_typed(tensor, 0)
            self.nccl.finish(self._nccl_check())
            return
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        if tensor.dtype == torch.float8_e4m3fn:  # gloo has no fp8 (NCCL has): the same bytes and count
            tensor = tensor.view(torch.uint8)
        self.pg.broadcast([tensor], opts).wait()

    def close(self) -> None:
        if self.nccl is not None:
            self.nccl.abort()
        self.pg = self.nccl = self.store = None


class Engine:
    """The server's state: one call at a time reaches the workers (vLLM's engine core)."""

    def __init__(self, workers: int, faults: Faults, timeout: float, comm: str, devices: list[str]) -> None:
        self.k = workers
        self.faults = faults
        self.timeout = timeout
        self.comm = comm
        self.devices = devices
        self.lock = threading.Lock()
        self.workers: list[Worker] = []
        self.init_info: dict[str, Any] | None = None
        self.session = False
        self.paused = False
        self.weight_version = "default"
        self.previous_version = "default"
        self.meta: tuple[list[str], list[str], list[list[int]]] | None = None
        self.session_tensors: dict[int, dict[str, dict[str, Any]]] = {}
        self.versions: dict[str, dict[int, dict[str, dict[str, Any]]]] = {}
        self.broadcasts: dict[int, list[list[tuple[str, int]]]] = {}
        self.leaked_groups = 0
        self.initializing = False  # an init is joining its workers (the group is not formed yet)
        self.requests: list[dict[str, Any]] = []
        self.stopping = threading.Event()
        self.configured = True  # --weight-transfer-config given
        self.print_checksums = False
        self.session_bytes: dict[int, dict[str, tuple[torch.dtype, tuple[int, ...], bytes]]] = {}

    # --------------------------------------------------------------------------------------- workers
    def _on_workers(self, work: Callable[[Worker], None], workers: list[Worker] | None = None) -> None:
        errors: list[str] = []

        def run(worker: Worker) -> None:
            try:
                work(worker)
            except BaseException as err:
                errors.append(f"rank {worker.rank}: {type(err).__name__}: {err}")

        threads = [threading.Thread(target=run, args=(w,), daemon=True) for w in workers or self.workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise WorkerError("Worker failed with error " + "; ".join(sorted(errors)))

    def init(self, info: dict[str, Any]) -> None:
        unknown = sorted(set(info) - set(INIT_FIELDS))
        missing = [f for f in ("rank_offset", "world_size") if f not in info]
        if unknown or missing:
            raise WorkerError(f"Invalid init_info: unexpected keyword arguments {unknown}, missing {missing}")
        tcp = [info.get("master_address"), info.get("master_port")]
        uid = info.get("nccl_unique_id_b64")
        if (uid is not None) == any(v is not None for v in tcp) or (uid is None and None in tcp):
            raise WorkerError("ValueError: exactly one of nccl_unique_id_b64 or (master_address, master_port)")
        unique_id = None
        if uid is not None:
            try:
                unique_id = base64.b64decode(uid, validate=True)
            except (binascii.Error, ValueError) as err:
                raise WorkerError(f"ValueError: nccl_unique_id_b64 is not base64: {err}") from None
            if len(unique_id) != 128:
                raise WorkerError(f"ValueError: nccl_unique_id_b64 decodes to {len(unique_id)} bytes, not 128")
        if self.workers:  # re-init without shutdown overwrites the group and never destroys it
            self.leaked_groups += 1
        offset, world = int(info["rank_offset"]), int(info["world_size"])
        self.workers = []
        joining = [Worker(offset + k, torch.device(self.devices[k]) if self.devices else torch.device("cpu"))
                   for k in range(self.k)]
        self.meta = None
        self.init_info = None
        self.initializing = True

        def join(worker: Worker) -> None:
            if unique_id is not None:
                worker.join_nccl(unique_id, world, self.timeout)
            elif self.comm == "nccl":
                store = dist.TCPStore(info["master_address"], info["master_port"], world, False,
                                      timedelta(seconds=self.timeout))
                worker.join_nccl(unique_id_from_pickle(store.get(UNIQUE_ID_KEY)), world, self.timeout)
            else:
                worker.join_gloo(info, self.timeout)
            worker.warm_up()

        try:
            self._on_workers(join, joining)
        except WorkerError:
            for w in joining:
                w.close()
            raise
        finally:
            self.initializing = False
        self.workers = joining
        self.init_info = {"packed": False, "packed_buffer_size_bytes": 1 << 30, "packed_num_buffers": 2, **info}

    def shutdown(self) -> None:
        if self.session:
            raise WorkerError("RuntimeError: cannot shut the weight transfer engine down while a weight update "
                              "session is active")
        for w in self.workers:
            w.close()
        self.workers = []
        self.init_info = None
        self.meta = None

    def start(self) -> None:
        if self.session:
            raise WorkerError("RuntimeError: a weight update session is already active")
        self.session = True
        self.session_tensors = {}
        self.session_bytes = {}

    def update(self, update_info: Any) -> None:
        if not self.session:
            raise WorkerError("RuntimeError: update_weights without start_weight_update")
        try:
            infos = update_info if isinstance(update_info, list) else [update_info] * self.k
            if len(infos) != self.k or not all(isinstance(i, dict) for i in infos):
                raise WorkerError("ValueError: update_info as a list needs one object per worker")
            for i in infos:
                unknown = sorted(set(i) - set(UPDATE_FIELDS))
                if unknown:
                    raise WorkerError(f"ValueError: Invalid update_info: unexpected keyword arguments {unknown}")
            meta = [(list(i.get("names", [])), list(i.get("dtype_names", [])), [list(s) for s in i.get("shapes", [])])
                    for i in infos]
            for names, dtypes, shapes in meta:
                if not len(names) == len(dtypes) == len(shapes):
                    raise WorkerError("ValueError: names, dtype_names and shapes have different lengths")
            if not self.workers or self.init_info is None:
                raise WorkerError("RuntimeError: the weight transfer engine is not initialised")
            if not meta[0][0]:
                if self.meta is None:
                    return  # nothing to reuse: a no-op round
                chosen = [self.meta] * self.k
            else:
                chosen = meta
            packed = bool(self.init_info["packed"])
            limit = int(self.init_info["packed_buffer_size_bytes"])
            for w in self.workers:
                self.broadcasts.setdefault(w.rank, []).append([])
            by_rank = {w.rank: chosen[k] for k, w in enumerate(self.workers)}
            self._on_workers(lambda w: self._receive(w, by_rank[w.rank], packed, limit))
            self.meta = chosen[0]
        except BaseException:
            self.session = False  # vLLM clears the flag (and finalizes nothing)
            raise

    def _receive(self, w: Worker, meta: tuple[list[str], list[str], list[list[int]]], packed: bool,
                 limit: int) -> None:
        names, dtype_names, shapes = meta
        got = self.session_tensors.setdefault(w.rank, {})
        sent = self.broadcasts[w.rank][-1]

        def keep(name: str, dtype_name: str, t: torch.Tensor) -> None:
            got[name] = {"dtype": dtype_name, "shape": list(t.shape), "sha256": sha256_of(t)}
            if self.print_checksums:
                flat = t.detach().cpu().contiguous()
                raw = ctypes.string_at(flat.data_ptr(), flat.numel() * flat.element_size()) if flat.numel() else b""
                self.session_bytes.setdefault(w.rank, {})[name] = (t.dtype, tuple(t.shape), raw)

        if not packed:
            for name, dtype_name, shape in zip(names, dtype_names, shapes, strict=True):
                dtype = getattr(torch, dtype_name)
                if dtype not in RECEIVABLE:
                    raise ValueError(f"unsupported dtype {dtype} for NCCL")
                t = torch.empty(shape, dtype=dtype, device=w.device)
                sent.append((dtype_name, t.numel()))
                w.receive(t)
                keep(name, dtype_name, t)
            return
        pending: list[tuple[str, str, torch.dtype, list[int], int]] = []
        total = 0

        def flush() -> None:
            chunk = torch.empty(sum(p[4] for p in pending), dtype=torch.uint8, device=w.device)
            sent.append(("uint8", chunk.numel()))
            w.receive(chunk)
            for part, (name, dtype_name, dtype, shape, _) in zip(chunk.split([p[4] for p in pending]), pending,
                                                                   strict=True):
                keep(name, dtype_name, part.contiguous().view(dtype).view(shape))

        for name, dtype_name, shape in zip(names, dtype_names, shapes, strict=True):
            dtype = getattr(torch, dtype_name)  # lazily, as the consumer reaches it
            size = math.prod(shape) * dtype.itemsize
            pending.append((name, dtype_name, dtype, shape, size))
            total += size
            if total > limit:
                flush()
                pending, total = [], 0
        if pending:
            flush()

    def finish(self, weight_version: str | None) -> None:
        if not self.session:
            raise WorkerError("RuntimeError: finish_weight_update without start_weight_update")
        self.session = False
        if weight_version is not None:
            self.previous_version, self.weight_version = self.weight_version, weight_version
            self.versions[weight_version] = self.session_tensors
            if self.print_checksums:
                for k, w in enumerate(self.workers):
                    held = self.session_bytes.get(w.rank, {})
                    digest = hashlib.sha256()
                    for name in sorted(held):
                        dtype, shape, raw = held[name]
                        digest.update(f"{name}|{dtype}|{shape}|".encode())
                        digest.update(raw)
                    print(f"loaded v={weight_version} worker={k} tensors={len(held)} "
                          f"checksum={digest.hexdigest()[:16]}", flush=True)

    def reported_version(self) -> str:
        return self.previous_version if self.faults.stale_version else self.weight_version


def _bool(value: str) -> bool:
    if value.lower() in ("true", "1", "yes", "on"):
        return True
    if value.lower() in ("false", "0", "no", "off"):
        return False
    raise BadRequest(f"{value!r} is not a boolean")


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def _answer(self, status: int, doc: Any) -> None:
        data = b"" if doc is None else json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str) -> None:
        engine = self.server.engine
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body: Any = None
        malformed = False
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                malformed = True
        path = parts.path
        if not path.startswith("/debug/"):
            entry = {"method": method, "path": path, "query": query, "body": body, "at": time.time()}
            with self.server.log_lock:
                engine.requests.append(entry)
                if self.server.log_file is not None:
                    self.server.log_file.write(json.dumps(entry) + "\n")
                    self.server.log_file.flush()
        try:
            if malformed:
                raise BadRequest("the body is not JSON")
            status, doc = self._route(method, path, query, body)
        except BadRequest as err:
            status, doc = 400, {"error": {"message": str(err), "type": "BadRequestError", "code": 400}}
        except WorkerError as err:
            status, doc = 500, {"error": {"message": f"Call to collective_rpc method failed: {err}",
                                          "type": "InternalServerError", "code": 500}}
        except _Stall:
            engine.stopping.wait(engine.faults.stall_seconds)
            self.close_connection = True
            return
        except Exception as err:  # a bug of the stand-in itself: say so
            status, doc = 500, {"error": {"message": f"stand-in error: {err}\n{traceback.format_exc()}",
                                          "type": "InternalServerError", "code": 500}}
        self._answer(status, doc)

    def _route(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        engine = self.server.engine
        if path.startswith("/debug/"):
            return self._debug(method, path, query, body)
        if (method, path) == ("GET", "/health"):
            return 200, None
        routes = {("GET", "/get_world_size"), ("POST", "/pause"), ("POST", "/resume"), ("GET", "/is_paused"),
                  ("POST", "/init_weight_transfer_engine"), ("POST", "/shutdown_weight_transfer_engine"),
                  ("POST", "/start_weight_update"), ("POST", "/update_weights"), ("POST", "/finish_weight_update"),
                  ("POST", "/update_weight_version"), ("GET", "/weight_info")}
        if (method, path) not in routes or not self.server.dev_mode:
            return 404, {"detail": "Not Found"}
        step = path.strip("/")
        transfer = {"init_weight_transfer_engine", "shutdown_weight_transfer_engine", "start_weight_update",
                    "update_weights", "finish_weight_update"}
        if step in transfer and not engine.configured:
            raise WorkerError("RuntimeError: Weight transfer not configured. Start the server with "
                              "--weight-transfer-config")
        with self.server.fault_lock:
            fault = engine.faults.hit(step)
        if fault == "stall":
            raise _Stall
        if fault == "fail":
            if step == "update_weights":
                engine.session = False
            raise WorkerError(f"injected failure at {step}")
        if step == "get_world_size":
            include_dp = _bool(query.get("include_dp", "true"))
            del include_dp  # one data-parallel rank: the same either way
            size = engine.faults.world_size if engine.faults.world_size is not None else engine.k
            return 200, {"world_size": size}
        if step == "is_paused":
            return 200, {"is_paused": engine.paused}
        with engine.lock:
            return self._engine_call(engine, step, query, body)

    def _engine_call(self, engine: Engine, step: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        if step == "pause":
            mode = query.get("mode", "abort")
            if "clear_cache" in query:
                _bool(query["clear_cache"])
            if mode not in PAUSE_MODES:
                return 400, {"error": f"Invalid mode {mode!r}; expected one of {PAUSE_MODES}"}
            engine.paused = True
            return 200, {"status": "paused"}
        if step == "resume":
            engine.paused = False
            return 200, {"status": "resumed"}
        if step == "init_weight_transfer_engine":
            if not isinstance(body, dict) or not isinstance(body.get("init_info"), dict):
                raise BadRequest("body.init_info: Field required (an object)")
            engine.init(body["init_info"])
            return 200, {"message": "Weight transfer initialized"}
        if step == "shutdown_weight_transfer_engine":
            engine.shutdown()
            return 200, {"message": "Weight transfer shut down"}
        if step == "start_weight_update":
            engine.start()  # no body is read
            return 200, {"message": "Weight update started"}
        if step == "update_weights":
            if not isinstance(body, dict) or not isinstance(body.get("update_info"), dict | list):
                raise BadRequest("body.update_info: Field required (an object or a list)")
            engine.update(body["update_info"])
            return 200, {"message": "Weights updated"}
        if step == "finish_weight_update":
            version = body.get("weight_version") if isinstance(body, dict) else None
            if version is not None and not isinstance(version, str):
                raise BadRequest("body.weight_version: Input should be a valid string")
            engine.finish(version)
            return 200, {"message": "Weight update finished"}
        if step == "update_weight_version":
            if not isinstance(body, dict) or not isinstance(body.get("new_version"), str):
                raise BadRequest("body.new_version: Field required (a string)")
            engine.previous_version, engine.weight_version = engine.weight_version, body["new_version"]
            return 200, {"success": True, "new_version": engine.weight_version}
        assert step == "weight_info"
        return 200, {"weight_version": engine.reported_version()}

    def _debug(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        engine = self.server.engine
        if path == "/debug/requests":
            with self.server.log_lock:
                return 200, list(engine.requests)
        if path == "/debug/tensors":
            return 200, engine.versions.get(query.get("version", ""), {})
        if path == "/debug/broadcasts":
            return 200, engine.broadcasts
        if path == "/debug/state":
            return 200, {"initialized": bool(engine.workers), "initializing": engine.initializing,
                         "session": engine.session, "paused": engine.paused,
                         "weight_version": engine.weight_version, "leaked_groups": engine.leaked_groups,
                         "ranks": [w.rank for w in engine.workers], "init_info": engine.init_info}
        if path == "/debug/faults" and method == "POST":
            with self.server.fault_lock:
                engine.faults = Faults.from_doc(body or {})
            return 200, {"status": "ok"}
        if path == "/debug/clear" and method == "POST":
            with self.server.log_lock:
                engine.requests.clear()
            engine.broadcasts.clear()
            return 200, {"status": "ok"}
        return 404, {"detail": "Not Found"}


class _Stall(Exception):
    pass


def dev_mode() -> bool:
    """VLLM_SERVER_DEV_MODE as vLLM reads it: bool(int(value)); a value that is no integer raises."""
    return bool(int(os.environ.get("VLLM_SERVER_DEV_MODE", "0")))


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], engine: Engine, log_path: str | None) -> None:
        super().__init__(address, Handler)
        self.engine = engine
        self.dev_mode = dev_mode()
        self.log_lock = threading.Lock()
        self.fault_lock = threading.Lock()
        self.log_file = open(log_path, "a") if log_path else None  # noqa: SIM115


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    parser.add_argument("--workers", type=int, default=1, help="worker ranks (TP x PP) behind this server")
    parser.add_argument("--timeout", type=float, default=30.0, help="bound on the workers' group waits")
    parser.add_argument("--comm", choices=("gloo", "nccl"), default="gloo",
                        help="the TCP form's group: gloo on CPU, or NCCL from the pickled id (GPUs)")
    parser.add_argument("--devices", default="", help="comma-separated CUDA devices of the workers (NCCL)")
    parser.add_argument("--log", default=None, help="append every request to this JSONL file")
    parser.add_argument("--fail-at", action="append", default=[], metavar="STEP[:N]")
    parser.add_argument("--stall-at", action="append", default=[], metavar="STEP[:N]")
    parser.add_argument("--stall-seconds", type=float, default=None, help="default: until the server stops")
    parser.add_argument("--world-size", type=int, default=None, help="report this instead of --workers")
    parser.add_argument("--stale-version", action="store_true")
    parser.add_argument("--weight-transfer-config", default=None, metavar="JSON",
                        help='as vllm serve: {"backend": "nccl"}; without it weight-transfer calls fail')
    parser.add_argument("--print-checksums", action="store_true",
                        help="print each worker's checksum of every version it finished")
    args = parser.parse_args(argv)
    try:
        dev_mode()
    except ValueError as err:
        parser.error(f"VLLM_SERVER_DEV_MODE: {err}")
    if args.weight_transfer_config is not None:
        config = json.loads(args.weight_transfer_config)
        if not isinstance(config, dict) or config.get("backend", "nccl") != "nccl":
            parser.error(f"--weight-transfer-config {args.weight_transfer_config}: this stand-in has backend nccl only")
    devices = [d for d in args.devices.split(",") if d]
    if devices and len(devices) != args.workers:
        parser.error("--devices needs one device per worker")
    faults = Faults(args.fail_at, args.stall_at, args.stall_seconds, args.world_size, args.stale_version)
    engine = Engine(args.workers, faults, args.timeout, args.comm, devices)
    engine.configured = args.weight_transfer_config is not None
    engine.print_checksums = args.print_checksums
    server = Server((args.host, args.port), engine, args.log)
    print(f"LISTENING {server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    except KeyboardInterrupt:
        pass
    finally:
        engine.stopping.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
