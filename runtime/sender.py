"""The trainer's side: `WeightSender.send(named_tensors, version)`."""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import torch
from weightsync.runtime.group import GroupMember, SyncGroup
from weightsync.runtime.manifest import Manifest, build_manifest
from weightsync.runtime.packing import PackingPlan, TensorSpec
from weightsync.runtime.report import PodAnnotator, SyncReport
from weightsync.runtime.settings import RuntimeSettings
from weightsync.runtime.transfer import Buffers, checksum, gc_paused, send_chunks, spec_of

from weightsync.contract import MemberEnv

log = logging.getLogger("weightsync.runtime")

_SHAPE = operator.attrgetter("shape")
_DTYPE = operator.attrgetter("dtype")
_LAYOUT = operator.attrgetter("layout")
_DENSE = {torch.strided}


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
    """

    def __init__(self, env: MemberEnv, *, device: torch.device | str | None = None,
                 settings: RuntimeSettings | None = None, report_to_pod: bool | None = None) -> None:
        if env.role != "trainer":
            raise ValueError(f"WeightSender runs in the trainer; WEIGHTSYNC_ROLE is {env.role!r}")
        self.settings = settings or RuntimeSettings()
        self.env = env
        self._engine: EngineSender | None = None
        if env.protocol == "vllm":
            from weightsync.runtime.vllm_sender import VllmSender

            self._engine = VllmSender(env, device=device, settings=self.settings)
        else:
            self.group = SyncGroup(env, 0, device, self.settings)
        threshold = self.settings.direct_threshold
        self.direct_threshold = threshold if threshold is not None else env.buffer_bytes
        self.buffers = Buffers(self.settings.copy_programs)
        self._cached: tuple[tuple[TensorSpec, ...], Manifest, PackingPlan] | None = None
        if report_to_pod is None:
            report_to_pod = PodAnnotator.available()
        self._annotator = PodAnnotator(env.namespace, f"{env.name}-trainer-0") if report_to_pod else None
        self.last_report: SyncReport | None = None
        #: Where the time of the last sync went: time to first byte, host enqueue time (seconds).
        self.last_timings: dict[str, float] = {}
        self._announced: tuple[int | None, int, str] | None = None
        self._layout_cache: tuple[tuple[str, ...], list[torch.Size], list[torch.dtype], tuple[TensorSpec, ...]] | None \
            = None

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

    def _layout(self, items: list[tuple[str, torch.Tensor]]) -> tuple[tuple[TensorSpec, ...], tuple[torch.Tensor, ...]]:
        """The specs and the tensors of `items`; specs are rebuilt only when names, dtypes or shapes changed
        since the last sync. With tens of thousands of tensors this check is most of the trainer's Python
        work before the first byte (0.3-0.7 us a tensor, mostly reading shapes: bench/README.md), so it runs
        as C-level zip and map over flat lists."""
        names, tensors = zip(*items, strict=True) if items else ((), ())
        shapes = list(map(_SHAPE, tensors))
        dtypes = list(map(_DTYPE, tensors))
        cached = self._layout_cache
        # Layouts too (a sparse tensor under a known name and shape), at C speed; a meta tensor under a known
        # name fails in the data path with torch's own error, on this rank.
        if (cached is not None and cached[0] == names and cached[1] == shapes and cached[2] == dtypes
                and set(map(_LAYOUT, tensors)) <= _DENSE):
            return cached[3], tensors
        if len(set(names)) != len(names):
            seen: set[str] = set()
            duplicate = next(n for n in names if n in seen or seen.add(n))  # type: ignore[func-returns-value]
            raise ValueError(f"tensor name {duplicate!r} appears twice in one sync")
        for name, tensor in items:
            if tensor.is_sparse or tensor.device.type == "meta":
                raise ValueError(f"tensor {name!r} is {tensor.layout}/{tensor.device.type}; only dense, "
                                 "materialised tensors can be sent")
        specs = tuple(spec_of(name, tensor) for name, tensor in items)
        self._layout_cache = (names, shapes, dtypes, specs)
        return specs, tensors

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> SyncReport:
        """Broadcast every tensor to every receiver; returns once all of them acknowledged (protocol `vllm`:
        once every engine reports holding `version`)."""
        with gc_paused():
            if self._engine is None:
                return self._send(named_tensors, version)
            report = self._engine.send(named_tensors, version)
        log.info(report.summary())
        self.last_report = report
        if self._annotator is not None:
            self._annotator.post(report)
        return report

    def close(self) -> None:
        """Leave the group (protocol `vllm`: shut the engines' transfer engines down) and free the buffers."""
        if self._engine is not None:
            self._engine.close()
            return
        super().close()

    def _send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> SyncReport:
        started = time.perf_counter()
        items = list(named_tensors)
        specs, sources = self._layout(items)
        laid_out = time.perf_counter()
        group = self.group
        group.ensure_formed()
        if group.formation_seconds:  # a sync's seconds do not include forming the group: reported on their own
            shift = time.perf_counter() - laid_out
            started, laid_out = started + shift, laid_out + shift
        with torch.no_grad():
            sums = tuple(int(checksum(t).item()) for t in sources) if self.env.checksums else ()
        manifest, plan = self._manifest(specs, version, sums)
        views = self.buffers.prepare(plan, specs, manifest.signature, self.env.num_buffers, group.device)
        # The tensor list travels once per tensor set and formation (a re-formed group may hold new members).
        announced = self._announced == (group.epoch, group.formation, manifest.signature)
        self._announced = (group.epoch, group.formation, manifest.signature)
        receivers = list(range(1, group.world_size))
        sync = group.trainer_round(version, time.monotonic() + group.timeout)

        def body() -> SyncReport:
            sync.announce(manifest.to_doc(include_tensors=not announced), receivers)
            announced_at = time.perf_counter()
            sync.collect_verdicts()
            assert group.comm is not None
            with torch.no_grad():
                first, enqueued = send_chunks(group.comm, plan, sources, views, self.buffers, sync.data_check,
                                              self.settings.timeline)
            sync.collect_acks()
            assert group.epoch is not None
            self.last_timings = {"layout_seconds": laid_out - started, "manifest_out_seconds": announced_at - started,
                                 "first_byte_seconds": first - started, "enqueue_seconds": enqueued - started,
                                 "buffer_bytes_allocated": self.buffers.nbytes}
            return SyncReport.make(version, len(specs), plan.total_bytes, time.perf_counter() - started,
                                   tuple(receivers), group.comm.transport, group.epoch, group.formation_seconds)

        report: SyncReport = group.run_guarded(f"sync v{version}", body)
        log.info(report.summary())
        self.last_report = report
        if self._annotator is not None:
            self._annotator.post(report)
        return report
