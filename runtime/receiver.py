"""An inference worker's side: `WeightReceiver.receive(loader=... | into=...)`."""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Mapping
from typing import Any

import torch
from weightsync.runtime.comm import Check
from weightsync.runtime.errors import ChecksumError, ConfigMismatchError, WeightSyncError
from weightsync.runtime.group import GroupMember, SyncGroup
from weightsync.runtime.manifest import Manifest
from weightsync.runtime.plan import Plan, TensorSpec
from weightsync.runtime.rendezvous import BellWaiter, KeyStore
from weightsync.runtime.report import SyncReport
from weightsync.runtime.transfer import (
    Buffers,
    ChecksumAccumulator,
    Loader,
    destinations_by_chunk,
    gc_paused,
    receive_chunks,
    spec_of,
)

from weightsync.contract import MemberEnv

log = logging.getLogger("weightsync.runtime")



#: What a validation of destinations covered: the tensor set, the mapping, and its tensors' ids, shapes, dtypes.
_Identity = tuple[str, int, list[int], list[torch.Size], list[torch.dtype]]


def _destination_identity(into: Mapping[str, torch.Tensor] | None) -> tuple[list[int], list[torch.Size],
                                                                          list[torch.dtype]]:
    if into is None:
        return [], [], []
    tensors = list(into.values())
    return (list(map(id, tensors)), list(map(operator.attrgetter("shape"), tensors)),
            list(map(operator.attrgetter("dtype"), tensors)))


class _EpochMoved(Exception):
    """The operator published a new epoch while this receiver waited: form the group again."""


class WeightReceiver(GroupMember):
    """One inference worker (rank = the pod's rank offset + `local_rank`)."""

    def __init__(self, env: MemberEnv, *, local_rank: int = 0, device: torch.device | str | None = None,
                 heartbeat_interval: float = 0.5, dead_after: float | None = None) -> None:
        if env.role != "inference":
            raise ValueError(f"WeightReceiver runs in inference pods; WEIGHTSYNC_ROLE is {env.role!r}")
        self.env = env
        self.group = SyncGroup(env, local_rank, device, heartbeat_interval, dead_after)
        self.buffers = Buffers()
        self._plans: dict[str, Plan] = {}
        self._manifests: dict[str, Manifest] = {}  # by signature: later syncs of a set send only that
        self._validated: _Identity | None = None
        self._targets: tuple[_Identity, list[list[torch.Tensor]]] | None = None
        self._previous: dict[str, TensorSpec] = {}
        self.last_report: SyncReport | None = None
        #: Where the time of the last sync went, from the manifest's arrival: its first receive enqueued.
        self.last_timings: dict[str, float] = {}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **kwargs: Any) -> WeightReceiver:
        return cls(MemberEnv.from_env(environ), **kwargs)

    @property
    def rank(self) -> int:
        return self.group.rank

    def _problems(self, manifest: Manifest, into: Mapping[str, torch.Tensor] | None,
                  destinations: tuple[list[int], list[torch.Size], list[torch.dtype]]) -> list[str]:
        """`destinations`: _destination_identity(into), taken while the receiver still waited for the sync."""
        problems = self.group.transfer.differences(manifest.config)
        # The same tensor set into the same destination tensors, of the same shapes and dtypes, as last time
        # needs no second look.
        identity: _Identity = (manifest.signature, id(into), *destinations)
        if not problems and self._validated == identity:
            return problems
        for spec in manifest.tensors:
            if into is not None:
                target = into.get(spec.name)
                if target is None:
                    problems.append(f"tensor {spec.name!r} has no destination here")
                    continue
                mine = spec_of(spec.name, target)
                if (mine.dtype, mine.shape) != (spec.dtype, spec.shape):
                    problems.append(f"tensor {spec.name!r}: trainer sends {spec.dtype}{list(spec.shape)}, "
                                    f"destination is {mine.dtype}{list(mine.shape)}")
            else:
                before = self._previous.get(spec.name)
                if before is not None and (before.dtype, before.shape) != (spec.dtype, spec.shape):
                    problems.append(f"tensor {spec.name!r} changed from {before.dtype}{list(before.shape)} to "
                                    f"{spec.dtype}{list(spec.shape)} since the last sync")
        self._validated = identity if not problems else None
        return problems

    def _wait_for_manifest(self, timeout: float | None) -> tuple[int, Manifest]:
        """Wait for the trainer's next sync, re-forming the group if the epoch moves on meanwhile.

        With no timeout the wait lasts as long as the trainer is alive: a dead trainer is an error, a busy
        one (a long training step) is not.
        """
        group = self.group
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            group.ensure_formed()
            seq = group.seq
            check = group.checker("the wait for the next sync")
            epoch = group.epoch
            keys, bell = group.keys, group.bell
            assert keys is not None and bell is not None

            def check_peers_and_epoch(check: Check = check, epoch: int | None = epoch) -> None:
                check()
                if group.current_epoch() != epoch:
                    raise _EpochMoved

            def wait(keys: KeyStore = keys, bell: BellWaiter = bell, seq: int = seq,
                     poll: Check = check_peers_and_epoch) -> None:
                bell.wait(keys.full_name(group.bell_key(seq, self.rank)),
                          float("inf") if deadline is None else deadline, poll)

            try:
                group.run_guarded("the wait for the next sync", wait, passthrough=(_EpochMoved, TimeoutError))
            except _EpochMoved:
                continue
            except TimeoutError:
                raise WeightSyncError(f"no sync started within {timeout:.0f}s") from None
            return seq, Manifest.from_json(keys.get_raw(f"sync/{seq}/manifest"), self._manifests)

    def receive(self, loader: Loader | None = None, *, into: Mapping[str, torch.Tensor] | None = None,
                timeout: float | None = None) -> SyncReport:
        """Receive the next sync.

        Give either `loader`, called with batches of (name, tensor) like vLLM's `load_weights` (the tensors
        are views into reused buffers, valid during the call), or `into`, a mapping of name to destination
        tensor that is written in place. `timeout` bounds the wait for the trainer to start the sync.
        """
        if (loader is None) == (into is None):
            raise ValueError("pass exactly one of `loader` or `into`")
        with gc_paused():
            return self._receive(loader, into, timeout)

    def _receive(self, loader: Loader | None, into: Mapping[str, torch.Tensor] | None,
                 timeout: float | None) -> SyncReport:
        group = self.group
        # Read before the wait, not after the manifest arrives: with tens of thousands of destinations this is
        # milliseconds, and the sync should not wait for them. They cannot change while this call blocks.
        destinations = _destination_identity(into)
        seq, manifest = self._wait_for_manifest(timeout)
        group.seq += 1
        if manifest.signature not in self._manifests:
            self._manifests = {manifest.signature: manifest}  # the newest set only: the trainer sends no older
        started = time.perf_counter()
        deadline = time.monotonic() + group.timeout
        version = manifest.version

        def body() -> SyncReport:
            problems = self._problems(manifest, into, destinations)
            group.put(f"sync/{seq}/verdict/{self.rank}", {"problems": problems})
            group.wait_all([f"sync/{seq}/go"], deadline, f"the trainer's go for v{version}")
            refused = group.get(f"sync/{seq}/go")["problems"]
            if refused:
                raise ConfigMismatchError(f"sync v{version} refused before any data moved: " + "; ".join(refused))
            plan = self._plans.get(manifest.signature)
            if plan is None:
                plan = self._plans[manifest.signature] = manifest.plan()
            views = self.buffers.prepare(plan, manifest.tensors, manifest.signature, manifest.config.num_buffers,
                                         group.device)
            targets = None
            if into is not None:
                assert self._validated is not None  # _problems() found none, so it recorded what it checked
                if self._targets is None or self._targets[0] != self._validated:
                    self._targets = (self._validated, destinations_by_chunk(plan, manifest.tensors, into))
                targets = self._targets[1]
            sums = ChecksumAccumulator(bool(manifest.checksums), {})
            assert group.comm is not None
            first = receive_chunks(group.comm, plan, manifest.tensors, views, self.buffers,
                                   targets, loader, sums, group.checker(f"sync v{version}", deadline))
            self.last_timings = {"first_byte_seconds": first - started}
            got = sums.fetch(len(manifest.tensors))
            errors = [f"tensor {manifest.tensors[i].name!r} checksum {g} != trainer's {w}"
                      for i, (g, w) in enumerate(zip(got, manifest.checksums, strict=False)) if g != w]
            group.put(f"sync/{seq}/ack/{self.rank}", {"errors": errors[:20]})
            if errors:
                raise ChecksumError(f"sync v{version} arrived corrupted at rank {self.rank}: " + "; ".join(errors[:5]))
            # A sync counts only once every member has it: wait for the trainer's word on the others.
            group.wait_all([f"sync/{seq}/done"], deadline, f"the trainer's confirmation of v{version}")
            bad = group.get(f"sync/{seq}/done")["problems"]
            if bad:
                raise ChecksumError(f"sync v{version} arrived corrupted elsewhere: " + "; ".join(bad))
            assert group.comm is not None and group.epoch is not None
            return SyncReport.make(version, len(manifest.tensors), plan.total_bytes, time.perf_counter() - started,
                                   (self.rank,), group.comm.transport, group.epoch)

        report: SyncReport = group.run_guarded(f"sync v{version}", body)
        if self._validated is None or self._validated[0] != manifest.signature or not self._previous:
            self._previous = {t.name: t for t in manifest.tensors}
        log.info(report.summary())
        self.last_report = report
        return report

