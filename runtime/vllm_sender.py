"""Protocol `vllm`: the trainer drives stock vLLM servers (their HTTP control plane and NCCL wire, vLLM 0.33).

Forming (at the first send, after a failure, and when the epoch or the engine list changed):
`GET /get_world_size` on every server must equal its share of the group's workers, before anything else;
then `/shutdown_weight_transfer_engine` (best effort: whatever an earlier trainer left), and
`/init_weight_transfer_engine` on every server at once while the trainer joins the communicator and runs
the warm-up. Each sync: pause, start, update_weights (in flight while the trainer broadcasts), finish with
the version, resume, and every server's `weight_info` must then report that version. Any failure aborts
the trainer's communicator, closes the engines' sessions, marks their weight version incomplete, shuts their
transfer engines down and resumes them (best effort, bounded), and raises; the next send forms afresh.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from weightsync.runtime import vllm_wire as wire
from weightsync.runtime.comm import member_device
from weightsync.runtime.errors import (
    ConfigMismatchError,
    InvalidTensorsError,
    PeerLostError,
    RendezvousError,
    WeightSyncError,
)
from weightsync.runtime.packing import TensorSpec
from weightsync.runtime.report import SyncReport
from weightsync.runtime.settings import RuntimeSettings
from weightsync.runtime.source import pair_problem
from weightsync.runtime.transfer import spec_of
from weightsync.runtime.vllm_comm import EngineComm, Fence, GlooEngineComm, NcclEngineComm
from weightsync.runtime.vllm_http import EngineClient, EngineError

from weightsync.contract import MemberEnv

log = logging.getLogger("weightsync.runtime")

T = TypeVar("T")

#: gloo only (a CPU convention of this runtime, not vLLM's): the trainer writes the formation's number here
#: before it asks the engines to join, and every rank builds its gloo group under `GLOO_PREFIX<n>/` of the
#: store, so that a formation never meets the keys of an earlier one on the same store.
GLOO_FORMATION_KEY = "weightsync/vllm-gloo/formation"
GLOO_PREFIX = "weightsync/vllm-gloo/"


@dataclass(frozen=True)
class Layout:
    """One tensor set on vLLM's wire: the caller's names, shapes and dtypes (to recognise it again), and
    the specs in wire order with their packed chunks."""

    names: tuple[str, ...]
    shapes: list[torch.Size]
    dtypes: list[torch.dtype]
    order: tuple[int, ...]  # wire position -> index in the caller's list
    specs: tuple[TensorSpec, ...]  # in wire order
    chunks: tuple[tuple[int, ...], ...]  # wire positions of each packed broadcast
    chunk_bytes: tuple[int, ...]
    total_bytes: int
    update_info: dict[str, Any] = field(repr=False)


def plan_layout(items: Sequence[tuple[str, torch.Tensor]], packed: bool, buffer_bytes: int) -> Layout:
    """The wire of `items`; ConfigMismatchError for a dtype an engine cannot receive, a duplicate name, or a
    tensor that is not dense and materialised, or no tensor at all."""
    if not items:
        # vLLM reads three empty lists as "the previous update's tensors again" and waits for their bytes,
        # with no timeout of its own: an empty update would leave every engine stuck in a broadcast.
        raise ConfigMismatchError("an empty tensor list: protocol vllm sends at least one tensor (vLLM reads an "
                                  "empty update_info as the previous update's tensor list)")
    problem = pair_problem(items)
    if problem is not None:
        raise InvalidTensorsError(problem)
    names = tuple(n for n, _ in items)
    if len(set(names)) != len(names):
        seen: set[str] = set()
        duplicate = next(n for n in names if n in seen or seen.add(n))  # type: ignore[func-returns-value]
        raise InvalidTensorsError(f"tensor name {duplicate!r} appears twice in one sync")
    for name, tensor in items:
        if tensor.layout != torch.strided or tensor.device.type == "meta":
            raise InvalidTensorsError(f"tensor {name!r} is {tensor.layout}/{tensor.device.type}; only dense, "
                                      "materialised tensors can be sent")
    specs = [spec_of(n, t) for n, t in items]
    specs = [TensorSpec(s.name, wire.dtype_name(t.dtype), s.shape, s.itemsize) for s, (_, t) in zip(
        specs, items, strict=True)]
    try:
        wire.check_dtypes(specs, packed)
    except ValueError as err:
        raise ConfigMismatchError(str(err)) from None
    order = wire.wire_order(specs, buffer_bytes) if packed else list(range(len(specs)))
    ordered = tuple(specs[i] for i in order)
    sizes = [s.nbytes for s in ordered]
    chunks = tuple(tuple(c) for c in wire.chunks(sizes, buffer_bytes)) if packed else ()
    assert not packed or not wire.misaligned(ordered, buffer_bytes)
    return Layout(names, [t.shape for _, t in items], [t.dtype for _, t in items], tuple(order), ordered,
                  chunks, tuple(sum(sizes[p] for p in c) for c in chunks), sum(sizes), wire.update_info(ordered))


@dataclass
class _Progress:
    """How far one sync got on the engines: what the clean-up after a failure must undo."""

    paused: bool = False
    started: bool = False
    finished: bool = False


class VllmSender:
    """Rank 0 of a group whose other ranks are the workers of stock vLLM servers."""

    def __init__(self, env: MemberEnv, *, device: torch.device | str | None = None,
                 settings: RuntimeSettings | None = None) -> None:
        if env.protocol != "vllm":
            raise ValueError(f"VllmSender drives protocol 'vllm', not {env.protocol!r}")
        self.env = env
        self.settings = settings or RuntimeSettings()
        self.timeout = env.timeout_seconds
        self.device = member_device(device, env.backend, torch.cuda.current_device)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=128, thread_name_prefix="weightsync-vllm")
        self._store: dist.TCPStore | None = None
        self._formations = 0
        self.comm: EngineComm | None = None
        self.engines: list[EngineClient] = []
        self.epoch: int | None = None
        self.world_size = env.world_size
        self._formed_as: tuple[int, int, tuple[str, ...]] | None = None
        self._layout: Layout | None = None
        self._held: Layout | None = None  # the tensor list every engine holds from the last update
        self._ring: list[torch.Tensor] = []
        #: Seconds the last send spent forming the group (0 when it stood).
        self.formation_seconds = 0.0

    # ------------------------------------------------------------------------------------------- send
    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> SyncReport:
        started = time.perf_counter()
        items = list(named_tensors)
        layout = self._layout_of(items)  # refuses what an engine cannot receive, before any request
        laid_out = time.perf_counter()
        self._ensure_formed()
        started += time.perf_counter() - laid_out if self.formation_seconds else 0.0
        progress = _Progress()
        try:
            self._sync(layout, [t for _, t in items], version, progress)
        except BaseException as err:
            self._fail(err, progress, version)
            raise
        assert self.comm is not None and self.epoch is not None
        return SyncReport.make(version, len(items), layout.total_bytes, time.perf_counter() - started,
                               tuple(range(1, self.world_size)), f"vllm {self.comm.transport}", self.epoch,
                               self.formation_seconds)

    def _layout_of(self, items: list[tuple[str, torch.Tensor]]) -> Layout:
        cached = self._layout
        if cached is not None and len(cached.names) == len(items):
            names = tuple(n for n, _ in items)
            if (names == cached.names and [t.shape for _, t in items] == cached.shapes
                    and [t.dtype for _, t in items] == cached.dtypes
                    and all(t.layout == torch.strided for _, t in items)):
                return cached
        self._layout = plan_layout(items, self.env.packed, self.env.buffer_bytes)
        return self._layout

    def _sync(self, layout: Layout, sources: list[torch.Tensor], version: int, progress: _Progress) -> None:
        env, engines, comm = self.env, self.engines, self.comm
        assert comm is not None
        progress.paused = True  # from here on, every engine is resumed whatever happens
        self._on_all(lambda e: e.pause(env.vllm_pause_mode, version))
        progress.started = True
        self._on_all(lambda e: e.start(version))
        info = wire.same_as_last() if self._held is layout else layout.update_info
        self._held = None
        updates = [(e, self._pool.submit(e.update, info, version)) for e in engines]
        deadline = time.monotonic() + self.timeout

        def check() -> None:
            for _, future in updates:
                if future.done() and future.exception() is not None:
                    raise future.exception()  # type: ignore[misc]
            if time.monotonic() >= deadline:
                _raise_engine_failure(updates)  # an engine's own error names the culprit best
                raise PeerLostError(f"sync v{version}: the broadcasts did not complete within {self.timeout:g}s "
                                    "although every engine answered update_weights",
                                    ranks=tuple(range(1, self.world_size)))

        check()  # an update refused at once (a bad update_info): not a byte into a dead session
        with torch.no_grad():
            comm.start()
            if env.packed:
                self._send_packed(comm, layout, sources, check)
            else:
                for position in layout.order:
                    tensor = sources[position]
                    if tensor.is_contiguous() and tensor.device == comm.device:
                        comm.broadcast(tensor.detach(), None)
                    else:
                        staged = torch.empty(tensor.shape, dtype=tensor.dtype, device=comm.device)
                        fence = comm.pack([tensor], staged.view(-1).view(torch.uint8), None, check)
                        comm.broadcast(staged, fence)
            comm.finish(check)
        for _, future in updates:
            future.result()  # each bounded by the call's own timeout
        self._held = layout
        self._on_all(lambda e: e.finish(version, str(version)))
        progress.finished = True
        self._on_all(lambda e: e.resume(version))
        progress.paused = False
        held = self._on_all(lambda e: e.weight_version(version))
        stale = [(e, v) for e, v in zip(engines, held, strict=True) if v != str(version)]
        if stale:
            e, v = stale[0]
            raise EngineError(f"{e.describe()}: weight_info (GET /weight_info) failed during sync v{version}: it "
                              f"reports weight_version {v!r} after a successful finish, not {str(version)!r}"
                              + "".join(f"; also {o.url} reports {w!r}" for o, w in stale[1:]),
                              url=e.url, step="weight_info", version=version, status=200,
                              body=f'{{"weight_version": "{v}"}}', ranks=e.ranks)

    def _send_packed(self, comm: EngineComm, layout: Layout, sources: list[torch.Tensor], check: Callable[[], None]
                     ) -> None:
        by_position = [sources[i] for i in layout.order]
        direct = [len(c) == 1 and by_position[c[0]].is_contiguous() and by_position[c[0]].device == comm.device
                  for c in layout.chunks]
        needed = max((n for n, d in zip(layout.chunk_bytes, direct, strict=True) if not d), default=0)
        ring = self._ring_of(needed, comm.device)
        slot_free: list[Fence | None] = [None] * len(ring)
        k = 0
        for chunk, nbytes, straight in zip(layout.chunks, layout.chunk_bytes, direct, strict=True):
            if straight:
                comm.broadcast(by_position[chunk[0]].detach().reshape(-1).view(torch.uint8), None)
                continue
            slot = k % len(ring)
            out = ring[slot][:nbytes]
            packed = comm.pack([by_position[p] for p in chunk], out, slot_free[slot], check)
            slot_free[slot] = comm.broadcast(out, packed)
            k += 1

    def _ring_of(self, nbytes: int, device: torch.device) -> list[torch.Tensor]:
        """`num_buffers` packing buffers of at least `nbytes`, kept across syncs."""
        if nbytes == 0:
            return [torch.empty(0, dtype=torch.uint8, device=device)]
        if not self._ring or self._ring[0].numel() < nbytes or self._ring[0].device != device:
            self._ring = []  # free the old ones first
            self._ring = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(self.env.num_buffers)]
        return self._ring

    # -------------------------------------------------------------------------------------- forming
    def _ensure_formed(self) -> None:
        self.formation_seconds = 0.0
        epoch, world_size, urls = self.env.engine_membership()
        if self.comm is not None and self._formed_as == (epoch, world_size, tuple(urls)):
            return
        if self.comm is not None:
            log.info("re-forming the vLLM group: %s -> epoch %d, world size %d, engines %s",
                     f"epoch {self._formed_as[0]}" if self._formed_as else "", epoch, world_size, ", ".join(urls))
            self.comm.abort()
            self.comm = None
        started = time.perf_counter()
        self._form(epoch, world_size, tuple(urls))
        self.formation_seconds = time.perf_counter() - started
        assert self.comm is not None
        log.info("the trainer formed the vLLM group at epoch %d with %d servers x %d workers (world size %d, %s, "
                 "%s) in %.2fs", epoch, len(urls), (world_size - 1) // len(urls), world_size, self.comm.transport,
                 self._rendezvous_form(), self.formation_seconds)

    def _world_sizes(self) -> list[int]:
        """Every server's `GET /get_world_size`, waiting up to the timeout for servers that are not answering
        yet (no connection, no answer, or 503): a replaced engine pod is still starting when the operator's
        new epoch arrives, and a vLLM server listens only once its model is loaded. Servers still silent at
        the deadline are members that did not arrive (RendezvousError naming them); any other answer is final.
        """
        deadline = time.monotonic() + self.timeout
        sizes: dict[EngineClient, int] = {}
        announced = False
        while True:
            bound = max(0.1, min(self.timeout, deadline - time.monotonic()))
            futures = [(e, self._pool.submit(e.bounded(bound).get_world_size)) for e in self.engines if e not in sizes]
            silent: dict[EngineClient, EngineError] = {}  # in server order, as asked
            for engine, future in futures:
                try:
                    sizes[engine] = future.result()
                except EngineError as err:
                    if err.status not in (None, 503):
                        raise
                    silent[engine] = err
            if not silent:
                return [sizes[e] for e in self.engines]
            if time.monotonic() >= deadline:
                raise RendezvousError(
                    f"{len(silent)} of {len(self.engines)} vLLM servers did not answer GET /get_world_size within "
                    f"{self.timeout:g}s: " + "; ".join(str(err) for err in silent.values()),
                    missing_ranks=tuple(r for e in silent for r in e.ranks))
            if not announced:
                log.info("waiting up to %gs for vLLM servers to answer: %s", self.timeout,
                         ", ".join(e.describe() for e in silent))
                announced = True
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    def _rendezvous_form(self) -> str:
        return "tcp-store" if self.env.backend == "gloo" else self.env.vllm_rendezvous

    def _form(self, epoch: int, world_size: int, urls: tuple[str, ...]) -> None:
        if not urls:
            raise RendezvousError("no vLLM servers to drive: WEIGHTSYNC_ENGINE_URLS is empty and so are the "
                                  "endpoints (the weightsync.dev/endpoints annotation, WEIGHTSYNC_ENDPOINTS)")
        workers, rest = divmod(world_size - 1, len(urls))
        if rest or workers < 1:
            raise ConfigMismatchError(f"the group's {world_size - 1} workers (world size {world_size}) do not "
                                      f"divide evenly among {len(urls)} vLLM servers ({', '.join(urls)})")
        engines = [EngineClient(url, self.timeout, tuple(range(1 + r * workers, 1 + (r + 1) * workers)))
                   for r, url in enumerate(urls)]
        self.engines, self.epoch, self.world_size, self._held = engines, epoch, world_size, None
        sizes = self._world_sizes()
        wrong = [f"{e.url} reports world size {s} (GET /get_world_size)" for e, s in zip(engines, sizes, strict=True)
                 if s != workers]
        if wrong:
            raise ConfigMismatchError(
                f"vLLM servers do not have the workers the group expects ({workers} per server: world size "
                f"{world_size} = 1 + {len(urls)} servers x {workers}, workersPerReplica): {'; '.join(wrong)}; "
                "no group was formed")
        self._shutdown_all("before forming")
        self._formations += 1
        infos, connect = self._rendezvous(world_size, workers)
        inits = [(e, self._pool.submit(e.init, info)) for e, info in zip(engines, infos, strict=True)]
        comm: EngineComm | None = None
        try:
            comm = self._connect(connect, inits)
            deadline = time.monotonic() + self.timeout

            def check() -> None:
                _raise_failed(inits)
                if time.monotonic() >= deadline:
                    raise PeerLostError(f"the warm-up all-reduce did not complete within {self.timeout:g}s",
                                        ranks=tuple(range(1, world_size)))

            comm.warm_up(check)
            for _, future in inits:
                future.result()
        except BaseException as err:
            self._formed_as = None
            if comm is not None:
                comm.abort()
            self._shutdown_all("after a failed formation")
            err.add_note("the trainer shut the vLLM servers' transfer engines down; the next send forms again")
            raise
        self.comm = comm
        self._formed_as = (epoch, world_size, urls)

    def _rendezvous(self, world_size: int, workers: int) -> tuple[list[dict[str, Any]], Callable[[Callable[[], None]],
                                                                                              EngineComm]]:
        """Every server's init_info, and how the trainer joins."""
        env = self.env
        common: dict[str, Any] = {"world_size": world_size, "packed": env.packed,
                                  "packed_buffer_size_bytes": env.buffer_bytes, "packed_num_buffers": env.num_buffers}
        infos = [{"rank_offset": 1 + r * workers, **common} for r in range(len(self.engines))]
        if env.backend == "gloo":
            store = self._host_store(world_size)
            formation = self._formations
            store.set(GLOO_FORMATION_KEY, str(formation))
            prefixed = dist.PrefixStore(f"{GLOO_PREFIX}{formation}/", store)
            for info in infos:
                info.update(master_address=env.master_addr, master_port=env.master_port)
            return infos, lambda check: GlooEngineComm(prefixed, world_size, self.timeout)
        from weightsync.runtime.nccl import new_unique_id

        unique_id = new_unique_id()
        if env.vllm_rendezvous == "tcp-store":
            self._host_store(world_size).set(wire.UNIQUE_ID_KEY, wire.unique_id_pickle(unique_id))  # type: ignore[arg-type]
            for info in infos:
                info.update(master_address=env.master_addr, master_port=env.master_port)
        else:
            encoded = base64.b64encode(unique_id).decode()
            for info in infos:
                info["nccl_unique_id_b64"] = encoded
        return infos, lambda check: NcclEngineComm(unique_id, world_size, self.device, check, self.settings.nccl)

    def _host_store(self, world_size: int) -> dist.TCPStore:
        """The torch TCPStore the TCP forms meet at, hosted here on the master port for the sender's life."""
        if self._store is None:
            try:
                self._store = dist.TCPStore("127.0.0.1", self.env.master_port, None, True,
                                            timedelta(seconds=self.timeout), wait_for_workers=False)
            except (RuntimeError, OSError) as err:
                raise RendezvousError(f"cannot host the TCP store on port {self.env.master_port}: "
                                      f"{str(err).splitlines()[0]}") from err
        return self._store

    def _connect(self, connect: Callable[[Callable[[], None]], EngineComm],
                 inits: list[tuple[EngineClient, concurrent.futures.Future[None]]]) -> EngineComm:
        """Join the communicator while the engines' init requests are in flight; a failed one ends the
        wait at once (the join itself is then abandoned: it ends by its own timeout)."""
        deadline = time.monotonic() + self.timeout
        abandoned = threading.Event()
        done = threading.Event()
        outcome: list[Any] = []

        def abandon_check() -> None:
            if abandoned.is_set():
                raise WeightSyncError("joining the vLLM group was abandoned")

        def join() -> None:
            try:
                comm = connect(abandon_check)
                if abandoned.is_set():
                    comm.abort()
                outcome.append(comm)
            except BaseException as err:
                outcome.append(err)
            done.set()

        threading.Thread(target=join, name="weightsync-vllm-join", daemon=True).start()
        try:
            while not done.wait(0.01):
                _raise_failed(inits)
                if time.monotonic() >= deadline:
                    _raise_engine_failure(inits)
                    raise PeerLostError(f"the vLLM group did not form within {self.timeout:g}s although every "
                                        "engine answered init_weight_transfer_engine",
                                        ranks=tuple(range(1, self.world_size)))
        except BaseException:
            abandoned.set()
            raise
        result = outcome[0]
        if isinstance(result, BaseException):
            _raise_failed(inits)  # an engine's error says more than the join's
            raise result
        comm: EngineComm = result
        return comm

    # ---------------------------------------------------------------------------------------- calls
    def _on_all(self, call: Callable[[EngineClient], T]) -> list[T]:
        """`call` on every engine at once; the first failure, by server order, raised after all answered."""
        futures = [self._pool.submit(call, e) for e in self.engines]
        results: list[T] = []
        errors: list[BaseException] = []
        for future in futures:
            try:
                results.append(future.result())
            except Exception as err:
                errors.append(err)
        if errors:
            first = errors[0]
            for other in errors[1:]:
                first.add_note(f"also: {other}")
            raise first
        return results

    def _best_effort(self, steps: Callable[[Callable[[], EngineClient | None]], None], why: str) -> None:
        """`steps` for every engine at once, within one timeout for all of them; failures are logged. `steps`
        gets the engine through a function that bounds each call by what is left (None: nothing is)."""
        deadline = time.monotonic() + self.timeout

        def run(engine: EngineClient) -> None:
            def bounded() -> EngineClient | None:
                remaining = deadline - time.monotonic()
                return engine.bounded(min(self.timeout, remaining)) if remaining > 0.05 else None

            try:
                steps(bounded)
            except Exception as err:
                log.warning("%s (%s; best effort, carrying on)", err, why)

        for future in [self._pool.submit(run, e) for e in self.engines]:
            with contextlib.suppress(Exception):
                future.result()

    def _shutdown_all(self, why: str) -> None:
        def shutdown(bounded: Callable[[], EngineClient | None]) -> None:
            if (engine := bounded()) is not None:
                engine.shutdown(None)

        self._best_effort(shutdown, why)

    def _fail(self, err: BaseException, progress: _Progress, version: int) -> None:
        """After a failed sync: no dangling group, no dangling session, no engine left paused."""
        if self.comm is not None:
            self.comm.abort()
            self.comm = None
        self._held = None
        self._formed_as = None

        def undo(bounded: Callable[[], EngineClient | None]) -> None:
            if progress.started and not progress.finished and (engine := bounded()) is not None:
                with contextlib.suppress(EngineError):  # a failed update already closed it: 500, expected
                    engine.finish(version, None)
            if progress.started and (engine := bounded()) is not None:
                engine.set_weight_version(f"{version}-incomplete", version)
            try:
                if (engine := bounded()) is not None:
                    engine.shutdown(version)
            finally:
                if progress.paused and (engine := bounded()) is not None:
                    engine.resume(version)

        log.warning("sync v%d failed: %s; shutting the engines' transfer down", version, err)
        self._best_effort(undo, f"cleaning up after sync v{version} failed")
        err.add_note("the trainer aborted its communicator and shut the vLLM servers' transfer engines down; the "
                     "next send forms a new group")

    def close(self) -> None:
        if self.comm is not None:
            self.comm.close()
            self.comm = None
            self._shutdown_all("leaving")
        self._store = None
        self._ring = []
        self._pool.shutdown(wait=False, cancel_futures=True)


def _raise_engine_failure(futures: Sequence[tuple[EngineClient, concurrent.futures.Future[Any]]],
                          grace: float = 2.0) -> None:
    """After a deadline: the engines' calls in flight end by their own bound at about the same time. Wait
    for them (a little past it) and raise the most telling failure: an engine that gave no answer (stalled)
    before one that answered with an error (it gave up waiting for the others)."""
    concurrent.futures.wait([f for _, f in futures], timeout=grace)
    errors = [e for _, f in futures if f.done() and (e := f.exception()) is not None]
    errors.sort(key=lambda e: getattr(e, "status", None) is not None)
    if errors:
        first = errors[0]
        for other in errors[1:]:
            first.add_note(f"also: {other}")
        raise first


def _raise_failed(futures: Sequence[tuple[EngineClient, concurrent.futures.Future[Any]]]) -> None:
    for _, future in futures:
        if future.done() and future.exception() is not None:
            raise future.exception()  # type: ignore[misc]
