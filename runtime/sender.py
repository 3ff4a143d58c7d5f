"""The trainer's side: `WeightSender.send(named_tensors, version)`."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from weightsync.runtime.errors import ChecksumError, ConfigMismatchError
from weightsync.runtime.group import SyncGroup
from weightsync.runtime.manifest import Manifest, build_manifest
from weightsync.runtime.plan import Plan, TensorSpec
from weightsync.runtime.report import PodAnnotator, SyncReport
from weightsync.runtime.transfer import Buffers, checksum, send_chunks, spec_of

from weightsync.contract import MemberEnv

log = logging.getLogger("weightsync.runtime")


class WeightSender:
    """Rank 0 of a sync group: broadcasts named tensors to every inference worker.

    `direct_threshold`: tensors of at least this many bytes skip the packing buffers and go straight from
    the source (default: only those larger than a buffer).
    """

    def __init__(self, env: MemberEnv, *, device: torch.device | str | None = None,
                 direct_threshold: int | None = None, report_to_pod: bool | None = None,
                 heartbeat_interval: float = 0.5, dead_after: float | None = None) -> None:
        if env.role != "trainer":
            raise ValueError(f"WeightSender runs in the trainer; WEIGHTSYNC_ROLE is {env.role!r}")
        self.group = SyncGroup(env, 0, device, heartbeat_interval, dead_after)
        self.env = env
        self.direct_threshold = direct_threshold if direct_threshold is not None else env.buffer_bytes
        self.buffers = Buffers()
        self._cached: tuple[tuple[TensorSpec, ...], Manifest, Plan] | None = None
        if report_to_pod is None:
            report_to_pod = PodAnnotator.available()
        self._annotator = PodAnnotator(env.namespace, f"{env.name}-trainer-0") if report_to_pod else None
        self.last_report: SyncReport | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **kwargs: Any) -> WeightSender:
        return cls(MemberEnv.from_env(environ), **kwargs)

    def _manifest(self, specs: tuple[TensorSpec, ...], version: int, sums: tuple[int, ...]) -> tuple[Manifest, Plan]:
        if self._cached is not None and self._cached[0] == specs:
            _, cached, plan = self._cached
            manifest = Manifest(version, cached.config, cached.tensors, cached.direct_threshold,
                                cached.plan_digest, sums)
            return manifest, plan
        manifest, plan = build_manifest(version, self.group.transfer, list(specs), self.direct_threshold, sums)
        self._cached = (specs, manifest, plan)
        return manifest, plan

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> SyncReport:
        """Broadcast every tensor to every receiver; returns once all of them acknowledged."""
        names: set[str] = set()
        sources: list[torch.Tensor] = []
        specs: list[TensorSpec] = []
        for name, tensor in named_tensors:
            if name in names:
                raise ValueError(f"tensor name {name!r} appears twice in one sync")
            if tensor.is_sparse or tensor.device.type == "meta":
                raise ValueError(f"tensor {name!r} is {tensor.layout}/{tensor.device.type}; only dense, "
                                 "materialised tensors can be sent")
            names.add(name)
            sources.append(tensor.detach())
            specs.append(spec_of(name, tensor))
        group = self.group
        group.ensure_formed()
        sums = tuple(int(checksum(t).item()) for t in sources) if self.env.checksums else ()
        manifest, plan = self._manifest(tuple(specs), version, sums)
        views = self.buffers.prepare(plan, specs, manifest.signature(), self.env.num_buffers, group.device)
        seq = group.seq
        group.seq += 1
        receivers = list(range(1, group.world_size))
        started = time.perf_counter()
        deadline = time.monotonic() + group.timeout

        def body() -> SyncReport:
            group.put_raw(f"sync/{seq}/manifest", manifest.to_json())
            group.wait_all([f"sync/{seq}/verdict/{r}" for r in receivers], deadline, f"the manifest of v{version}")
            problems = [f"{group.describe(r)}: {p}" for r in receivers
                        for p in group.get(f"sync/{seq}/verdict/{r}")["problems"]]
            group.put(f"sync/{seq}/go", {"problems": problems})
            if problems:
                raise ConfigMismatchError(f"sync v{version} refused before any data moved: " + "; ".join(problems))
            assert group.comm is not None
            send_chunks(group.comm, plan, sources, views, self.buffers.buffers,
                        group.checker(f"sync v{version}", deadline))
            group.wait_all([f"sync/{seq}/ack/{r}" for r in receivers], deadline, f"the end of sync v{version}")
            bad = [f"{group.describe(r)}: {e}" for r in receivers for e in group.get(f"sync/{seq}/ack/{r}")["errors"]]
            group.put(f"sync/{seq}/done", {"problems": bad})
            if bad:
                raise ChecksumError(f"sync v{version} arrived corrupted: " + "; ".join(bad))
            assert group.comm is not None and group.epoch is not None
            return SyncReport.make(version, len(specs), plan.total_bytes, time.perf_counter() - started,
                                   tuple(receivers), group.comm.transport, group.epoch)

        report: SyncReport = group.run_guarded(f"sync v{version}", body)
        log.info(report.summary())
        self.last_report = report
        if self._annotator is not None:
            self._annotator.post(report)
        return report

    def close(self) -> None:
        self.group.close()

    def __enter__(self) -> WeightSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
