"""The trainer's side: `WeightSender.send(named_tensors, version)`."""

from __future__ import annotations

import hashlib
import json
import logging
import operator
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import torch
from weightsync.runtime.errors import InvalidTensorsError, TrainerJobError, WeightSyncError
from weightsync.runtime.group import GroupMember, SyncGroup
from weightsync.runtime.manifest import Manifest, build_manifest
from weightsync.runtime.packing import PackingPlan, TensorSpec
from weightsync.runtime.report import PodAnnotator, SyncReport
from weightsync.runtime.settings import RuntimeSettings
from weightsync.runtime.source import SourceTensor, WeightSource, as_source, pair_problem, sharded_source
from weightsync.runtime.trainer_job import Gathers, TrainerJob, job_ranks, outcome_result
from weightsync.runtime.transfer import (
    Buffers,
    checksum,
    gc_paused,
    send_chunks,
    send_chunks_lazy,
    spec_of,
)

from weightsync.contract import MemberEnv

log = logging.getLogger("weightsync.runtime")

_FIRST = operator.itemgetter(0)
#: What the tensor-list check compares, read from each tensor in one pass.
_METADATA = operator.attrgetter("shape", "dtype", "layout", "__class__")


class EngineSender(Protocol):
    """The trainer's side of an engine protocol (`vllm`): it drives stock inference servers itself."""

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> SyncReport: ...
    def close(self) -> None: ...


class WeightSender(GroupMember):
    """Rank 0 of a sync group: broadcasts named tensors to every inference worker.

    With `WEIGHTSYNC_PROTOCOL=vllm` the inference members are stock vLLM servers, which this sender drives
    through their HTTP control plane and wire (runtime/vllm_sender.py); `send` is the same call.

    `settings`: this process's own choices (RuntimeSettings: liveness threshold, direct tensors, copy kernel,
    NCCL tuning); `report_to_pod`: post each report onto the trainer's pod (default: when running in one).

    Every rank of the trainer's own torch.distributed job creates one and calls `send` with the same tensors
    (`trainer_world_size`: by default WEIGHTSYNC_TRAINER_PODS x WEIGHTSYNC_TRAINER_RANKS_PER_POD, 1 unless
    set; `trainer_rank`: by default the default process group's rank, else torchrun's `RANK`): its rank 0 is
    the group's sender; the others join the gathers of sharded tensors
    (DTensors: FSDP2, tensor parallel) and return the same report, or raise the same error
    (runtime/trainer_job.py).
    """

    def __init__(self, env: MemberEnv, *, device: torch.device | str | None = None,
                 settings: RuntimeSettings | None = None, report_to_pod: bool | None = None,
                 trainer_rank: int | None = None, trainer_world_size: int | None = None) -> None:
        if env.role != "trainer":
            raise ValueError(f"WeightSender runs in the trainer; WEIGHTSYNC_ROLE is {env.role!r}")
        self.settings = settings or RuntimeSettings()
        self.env = env
        self._engine: EngineSender | None = None
        self.trainer_rank, self.trainer_world_size = job_ranks(env, trainer_rank, trainer_world_size)
        #: The side channel with the other ranks of the trainer's job (None in a job of one).
        self.job = (TrainerJob(env, self.trainer_rank, self.trainer_world_size, self.settings)
                    if self.trainer_world_size > 1 else None)
        self._source_cache: tuple[tuple[SourceTensor, ...], tuple[TensorSpec, ...], str] | None = None
        self.buffers = Buffers(self.settings.copy_programs)
        self.last_report: SyncReport | None = None
        #: Where the time of the last sync went: time to first byte, host enqueue time (seconds).
        self.last_timings: dict[str, float] = {}
        #: The last plain tensor list: its names, every tensor's (shape, dtype, layout, class), its specs.
        self._layout_cache: tuple[list[str], list[tuple[Any, ...]], tuple[TensorSpec, ...]] | None = None
        if self.trainer_rank != 0:  # joins the gathers only: no group, no engines, no report of its own
            self._annotator = None
            return
        if env.protocol == "vllm":
            if self.job is not None:
                raise ValueError("protocol vllm takes a trainer job of one rank for now; with "
                                 f"{self.trainer_world_size} ranks use protocol weightsync")
            from weightsync.runtime.vllm_sender import VllmSender

            self._engine = VllmSender(env, device=device, settings=self.settings)
        else:
            self.group = SyncGroup(env, 0, device, self.settings)
        threshold = self.settings.direct_threshold
        self.direct_threshold = threshold if threshold is not None else env.buffer_bytes
        self._cached: tuple[tuple[TensorSpec, ...], Manifest, PackingPlan] | None = None
        if report_to_pod is None:
            report_to_pod = PodAnnotator.available()
        self._annotator = PodAnnotator(env.namespace, f"{env.name}-trainer-0") if report_to_pod else None
        self._announced: tuple[int | None, int, str] | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **kwargs: Any) -> WeightSender:
        return cls(MemberEnv.from_env(environ), **kwargs)

    def _manifest(self, specs: tuple[TensorSpec, ...], version: int,
                  sums: tuple[int, ...]) -> tuple[Manifest, PackingPlan]:
        if self._cached is not None and self._cached[0] is specs:
            _, cached, plan = self._cached
            return cached.with_version(version, sums), plan
        manifest, plan = build_manifest(version, self.group.transfer, list(specs), self.direct_threshold, sums)
        self._cached = (specs, manifest, plan)
        return manifest, plan

    def _plain_or_sharded(self, named_tensors: object
                          ) -> tuple[WeightSource | None, tuple[TensorSpec, ...], list[torch.Tensor]]:
        """(None, specs, tensors) for plain tensors; (the source, (), []) for a WeightSource or pairs holding
        DTensors."""
        source, items, tensors = as_source(named_tensors)
        if source is not None:
            return source, (), []
        specs = self._cached_specs(items, tensors)
        if specs is not None:
            return None, specs, tensors
        sharded = sharded_source(items, tensors)
        if sharded is not None:
            return sharded, (), []
        return None, self._new_specs(items, tensors), tensors

    def _cached_specs(self, items: list[tuple[str, torch.Tensor]], tensors: list[torch.Tensor]
                      ) -> tuple[TensorSpec, ...] | None:
        """The last sync's specs if `items` are the same tensor list: the same names, and every tensor of the
        same shape, dtype, layout and class (so still dense, and not a DTensor).

        With tens of thousands of tensors this is most of the trainer's Python work before the first byte,
        all of it reading torch attributes, so it runs as C-level map over flat lists, with one pass reading
        all four from each tensor: between syncs the tensors fall out of the CPU's caches, and a pass over
        them costs a cache miss a tensor (bench/README.md)."""
        cached = self._layout_cache
        if cached is None:
            return None
        try:
            if list(map(_FIRST, items)) == cached[0] and list(map(_METADATA, tensors)) == cached[1]:
                return cached[2]
        except (TypeError, AttributeError, IndexError):
            pass  # not pairs of tensors: the full check names the item
        return None

    def _new_specs(self, items: list[tuple[str, torch.Tensor]], tensors: list[torch.Tensor]
                   ) -> tuple[TensorSpec, ...]:
        """A tensor list not sent before, checked in full: pairs, unique names, dense materialised tensors."""
        problem = pair_problem(items)
        if problem is not None:
            raise InvalidTensorsError(problem)
        names = list(map(_FIRST, items))
        if len(set(names)) != len(names):
            seen: set[str] = set()
            duplicate = next(n for n in names if n in seen or seen.add(n))  # type: ignore[func-returns-value]
            raise InvalidTensorsError(f"tensor name {duplicate!r} appears twice in one sync")
        for name, tensor in items:
            if tensor.layout is not torch.strided:
                raise InvalidTensorsError(f"tensor {name!r} is {tensor.layout} on {tensor.device}; only dense, "
                                          "materialised tensors can be sent")
            if tensor.device.type == "meta":
                raise InvalidTensorsError(f"tensor {name!r} is on the meta device (not materialised); only "
                                          "dense, materialised tensors can be sent")
        specs = tuple(spec_of(name, tensor) for name, tensor in items)
        self._layout_cache = (names, list(map(_METADATA, tensors)), specs)
        return specs

    def _source_specs(self, source: WeightSource) -> tuple[tuple[TensorSpec, ...], str]:
        """A source's specs and the trainer job's signature of them (names, dtypes, shapes, placements), the
        same objects as last time when the tensor list did not change (then no metadata travels)."""
        metas = tuple(source.tensors())
        cached = self._source_cache
        if cached is not None and cached[0] == metas:
            return cached[1], cached[2]
        names = [m.name for m in metas]
        if len(set(names)) != len(names):
            seen: set[str] = set()
            duplicate = next(n for n in names if n in seen or seen.add(n))  # type: ignore[func-returns-value]
            raise ValueError(f"tensor name {duplicate!r} appears twice in one sync")
        specs = tuple(TensorSpec(m.name, str(m.dtype).removeprefix("torch."), tuple(m.shape), m.dtype.itemsize)
                      for m in metas)
        signature = _signature(metas)
        self._source_cache = (metas, specs, signature)
        return specs, signature

    def _plain_signature(self, specs: tuple[TensorSpec, ...]) -> str:
        cached = self._source_cache
        if cached is not None and cached[1] is specs:
            return cached[2]
        signature = _signature(tuple((s.name, s.dtype, s.shape, None) for s in specs))
        self._source_cache = ((), specs, signature)
        return signature

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]] | WeightSource, version: int) -> SyncReport:
        """Broadcast every tensor to every receiver; returns once all of them acknowledged (protocol `vllm`:
        once every engine reports holding `version`).

        `named_tensors`: `(name, tensor)` pairs, where tensors may be DTensors (gathered one at a time,
        just in time), or a `WeightSource` (`LazySource`: tensors produced one at a time). Every rank of the
        trainer's job calls it with the same tensors in the same order; on ranks other than 0 it joins the
        gathers and returns rank 0's report (or raises its error)."""
        with gc_paused():
            if self.trainer_rank != 0:
                return self._follow(named_tensors, version)
            if self._engine is None:
                return self._send(named_tensors, version)
            source, items, tensors = as_source(named_tensors)
            if source is None:
                source = sharded_source(items, tensors)
            if source is not None:
                items = _materialised(source)  # protocol vllm: one rank, gathered up front (not bounded yet)
            report = self._engine.send(items, version)
        log.info(report.summary())
        self.last_report = report
        if self._annotator is not None:
            self._annotator.post(report)
        return report

    def close(self) -> None:
        """Leave the group (protocol `vllm`: shut the engines' transfer engines down) and free the buffers."""
        if self.job is not None:
            self.job.linger_for_failure_readers()
            self.job.close()
        if self.trainer_rank != 0:
            return
        if self._engine is not None:
            self._engine.close()
            return
        super().close()

    # ------------------------------------------------------------------------------- the other ranks
    def _follow(self, named_tensors: Iterable[tuple[str, torch.Tensor]] | WeightSource, version: int) -> SyncReport:
        """A rank of the trainer's job other than 0: join each gather pass rank 0 starts, then return its
        report or raise its error."""
        job = self.job
        assert job is not None
        seq, job.seq = job.seq, job.seq + 1
        what = f"sync v{version}"
        if job.lost is not None:
            raise TrainerJobError(f"{what}: the trainer job is lost since an earlier sync ({job.lost}); restart it",
                                  job.lost.trainer_ranks, job_lost=True)
        timeout = self.env.timeout_seconds
        job.connect(self.env.master_addr, time.monotonic() + timeout)
        try:
            source, specs, _ = self._plain_or_sharded(named_tensors)
            if source is not None:
                count = len(source.tensors())
                _, signature = self._source_specs(source)
            else:
                count, signature = 0, self._plain_signature(specs)
        except BaseException as err:
            job.post_ready(seq, version, "", error=f"{type(err).__name__}: {err}")
            raise
        job.post_ready(seq, version, signature)
        # Rank 0 forms the group and hears every receiver before the data pass: each of those steps has the
        # timeout, and rank 0 ends the sync itself when one runs out.
        step_deadline = time.monotonic() + 3 * timeout + 5.0
        k = 0
        while True:
            outcome = job.next_step(seq, k, version, step_deadline)
            if outcome is not None:
                report = outcome_result(outcome, what)
                self.last_report = report
                return report
            if source is not None and count:
                gathers = Gathers(source.iter_full(gather_only=True), count, lambda i: "")
                check = job.checker(seq, f"{what} (gathers)", time.monotonic() + timeout + 2.0)
                try:
                    while not gathers.done:
                        gathers.fetch(check)
                except BaseException as err:
                    gathers.abandon()
                    named = job.name_failure(seq, f"{what} (gathers)", err)
                    if named is err:
                        raise
                    raise named from err
            k += 1

    # --------------------------------------------------------------------------------------- rank 0
    def _send(self, named_tensors: Iterable[tuple[str, torch.Tensor]] | WeightSource, version: int) -> SyncReport:
        job = self.job
        seq = 0
        if job is not None:
            seq, job.seq = job.seq, job.seq + 1
        started = time.perf_counter()
        timeout = self.env.timeout_seconds
        what = f"sync v{version}"
        gathers: Gathers | None = None
        job_check = (job.checker(seq, what, time.monotonic() + 3 * timeout + 5.0) if job is not None
                     else _never)
        try:
            if job is not None:
                if job.lost is not None:
                    raise TrainerJobError(f"{what}: the trainer job is lost since an earlier sync ({job.lost}); "
                                          "restart it", job.lost.trainer_ranks, job_lost=True)
                deadline = time.monotonic() + timeout
                self.group.ensure_store(deadline)
                job.connect("127.0.0.1", deadline)
            source, specs, sources = self._plain_or_sharded(named_tensors)
            if source is not None:
                specs, signature = self._source_specs(source)
            else:
                signature = self._plain_signature(specs) if job is not None else ""
            if job is not None:
                job.await_ready(seq, version, signature, time.monotonic() + timeout)
            laid_out = time.perf_counter()
            passes = 0
            sums: tuple[int, ...] = ()
            if self.env.checksums:
                with torch.no_grad():
                    if source is None:
                        sums = tuple(int(checksum(t).item()) for t in sources)
                    else:  # a pass of gathers of its own: the checksums go ahead of the data in the manifest
                        if job is not None:
                            job.go(seq, passes)
                        passes += 1
                        gathers = Gathers(source.iter_full(), len(specs), lambda i: specs[i].name)
                        sums = tuple(int(checksum(self._fetch(gathers, job, seq, what, job_check)).item())
                                     for _ in specs)
            group = self.group
            group.ensure_formed()
            if group.formation_seconds:  # a sync's seconds do not include forming the group: reported on their own
                shift = time.perf_counter() - laid_out
                started, laid_out = started + shift, laid_out + shift
            manifest, plan = self._manifest(specs, version, sums)
            views = self.buffers.prepare(plan, specs, manifest.signature, self.env.num_buffers, group.device)
            # The tensor list travels once per tensor set and formation (a re-formed group may hold new members).
            announced = self._announced == (group.epoch, group.formation, manifest.signature)
            self._announced = (group.epoch, group.formation, manifest.signature)
            receivers = list(range(1, group.world_size))
            sync = group.trainer_round(version, time.monotonic() + group.timeout)

            def body() -> SyncReport:
                nonlocal gathers
                sync.announce(manifest.to_doc(include_tensors=not announced), receivers)
                announced_at = time.perf_counter()
                sync.collect_verdicts()
                go_at = time.perf_counter()
                assert group.comm is not None
                with torch.no_grad():
                    if source is None:
                        first, enqueued = send_chunks(group.comm, plan, sources, views, self.buffers,
                                                      sync.data_check, self.settings.timeline)
                    else:
                        if job is not None:
                            job.go(seq, passes)
                        gathers = Gathers(source.iter_full(), len(specs), lambda i: specs[i].name)
                        data_check, round_check, deadline = sync.data_check, sync.check, sync.deadline

                        def check() -> None:
                            data_check()
                            job_check()

                        def gather_check() -> None:
                            # Waiting on the trainer's own gathers: when the round's deadline passes here,
                            # the trainer job holds the sync up, not the receivers.
                            job_check()
                            round_check()
                            if time.monotonic() >= deadline:
                                raise (job.overdue(f"{what} (gathers)") if job is not None else TrainerJobError(
                                    f"{what}: the tensor source did not produce {pending.name(pending.fetched)!r} "
                                    f"within {timeout:g}s", (0,)))

                        pending = gathers
                        first, enqueued = send_chunks_lazy(
                            group.comm, plan, specs, lambda: self._fetch(pending, job, seq, what, gather_check),
                            views, self.buffers, check)
                sync.collect_acks()
                assert group.epoch is not None
                self.last_timings = {"layout_seconds": laid_out - started,
                                     "manifest_out_seconds": announced_at - started,
                                     "go_seconds": go_at - started,
                                     "first_byte_seconds": first - started, "enqueue_seconds": enqueued - started,
                                     "buffer_bytes_allocated": self.buffers.nbytes}
                return SyncReport.make(version, len(specs), plan.total_bytes, time.perf_counter() - started,
                                       tuple(receivers), group.comm.transport, group.epoch,
                                       group.formation_seconds)

            report: SyncReport = group.run_guarded(what, body)
        except BaseException as err:
            raised = self._after_failure(err, gathers, seq, what)
            if job is not None:
                job.post_outcome(seq, None, raised)
            if raised is err:
                raise
            raise raised from err
        if job is not None:
            job.post_outcome(seq, report, None)
        log.info(report.summary())
        self.last_report = report
        if self._annotator is not None:
            self._annotator.post(report)
        return report

    def _fetch(self, gathers: Gathers, job: TrainerJob | None, seq: int, what: str,
               check: Callable[[], None]) -> torch.Tensor:
        """The next full tensor of rank 0's pass; a gather that failed is named (which trainer rank is at
        fault) before the sync group hears of it."""
        index = gathers.fetched
        try:
            tensor = gathers.fetch(check)
        except TrainerJobError as err:
            gathers.abandon()
            raise (job.name_failure(seq, what, err) if job is not None else err) from None
        except WeightSyncError:
            raise  # the sync group's own failure (a receiver lost): the pass is completed afterwards
        except BaseException as err:
            gathers.abandon()
            where = f"{what}: materialising {gathers.name(index)!r} (tensor {index + 1} of {gathers.count})"
            if job is None:
                raise TrainerJobError(f"{where} failed: {type(err).__name__}: {err}", (0,)) from err
            raise job.name_failure(seq, where, err) from err
        assert tensor is not None
        return tensor

    def _after_failure(self, err: BaseException, gathers: Gathers | None, seq: int, what: str) -> BaseException:
        """Leave the trainer job's collectives in step: a pass of gathers that a failure elsewhere (a receiver,
        the group) interrupted is completed, the tensors dropped; one that a trainer rank broke is abandoned."""
        job = self.job
        if gathers is None or gathers.done:
            return err
        if isinstance(err, TrainerJobError) or gathers.failed is not None or job is None:
            gathers.abandon()
            if job is not None and isinstance(err, TrainerJobError):
                job.name_failure(seq, what, err)
            return err
        try:
            gathers.drain(job.checker(seq, f"{what} (completing the gathers after: {err})",
                                      time.monotonic() + self.env.timeout_seconds))
        except BaseException as drain_err:
            gathers.abandon()
            return job.name_failure(seq, what, drain_err)
        return err



def _never() -> None:
    return None


def _signature(metas: tuple[SourceTensor, ...] | tuple[tuple[str, str, tuple[int, ...], None], ...]) -> str:
    """The trainer job's digest of a tensor list: every rank must hold the same one, in the same order."""
    rows = [[m.name, str(m.dtype), list(m.shape), None if m.placement is None else
             [list(m.placement.mesh_ranks), list(m.placement.mesh_shape), list(m.placement.placements)]]
            if isinstance(m, SourceTensor) else [m[0], f"torch.{m[1]}", list(m[2]), None] for m in metas]
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()[:16]


def _materialised(source: WeightSource) -> list[tuple[str, torch.Tensor]]:
    out = []
    for meta, tensor in zip(source.tensors(), source.iter_full(), strict=True):
        assert tensor is not None
        out.append((meta.name, tensor))
    return out
