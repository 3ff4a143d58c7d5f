"""An inference worker's side: `WeightReceiver.receive(loader=... | into=...)`."""

from __future__ import annotations

import functools
import logging
import operator
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from weightsync.runtime.errors import ChecksumError, PeerLostError, WeightSyncError
from weightsync.runtime.group import GroupMember, SyncGroup
from weightsync.runtime.handshake import FORMATION, manifest_key
from weightsync.runtime.manifest import Manifest
from weightsync.runtime.packing import PackingPlan, TensorSpec
from weightsync.runtime.report import SyncReport
from weightsync.runtime.settings import RuntimeSettings
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

#: What a validation of destinations covered: the tensor set, the mapping, and its names and tensors' ids,
#: shapes, dtypes (a mapping re-keyed in place, or a tensor swapped for another, is checked again).
_Destinations = tuple[list[str], list[int], list[torch.Size], list[torch.dtype]]
_Identity = tuple[str, int, list[str], list[int], list[torch.Size], list[torch.dtype]]


def _destination_identity(into: Mapping[str, torch.Tensor] | None) -> _Destinations:
    if into is None:
        return [], [], [], []
    tensors = list(into.values())
    return (list(into), list(map(id, tensors)), list(map(operator.attrgetter("shape"), tensors)),
            list(map(operator.attrgetter("dtype"), tensors)))


class _Moved(Exception):
    """The epoch or the formation moved on while this receiver waited: form again."""


class _NoSync(Exception):
    """The caller's `timeout` for the next sync ran out."""


#: Told when a version that was being handed over will not be completed: (version, the error).
Abandoned = Callable[[int, WeightSyncError], None]


class WeightReceiver(GroupMember):
    """One inference worker (rank = the pod's rank offset + `local_rank`).

    Consistency: a version counts as received only when every member has it (the trainer's confirmation).
    A sync that fails after its data began to arrive is abandoned: the error carries `abandoned_version`,
    a loader's `on_abandon` is told, and `into=` destinations that were partly overwritten are marked
    incomplete (`incomplete`, `holds_version` None) until the next complete sync.
    """

    def __init__(self, env: MemberEnv, *, local_rank: int = 0, device: torch.device | str | None = None,
                 settings: RuntimeSettings | None = None) -> None:
        if env.role != "inference":
            raise ValueError(f"WeightReceiver runs in inference pods; WEIGHTSYNC_ROLE is {env.role!r}")
        if env.protocol != "weightsync":
            raise ValueError(f"WeightReceiver speaks the weightsync protocol; with WEIGHTSYNC_PROTOCOL="
                             f"{env.protocol!r} the inference pods run stock {env.protocol} servers, which the "
                             "trainer's WeightSender drives over HTTP: there is no weightsync receiver there")
        self.env = env
        self.settings = settings or RuntimeSettings()
        self.group = SyncGroup(env, local_rank, device, self.settings)
        self.buffers = Buffers(self.settings.copy_programs)
        self._plans: dict[str, PackingPlan] = {}
        self._manifests: dict[str, Manifest] = {}  # by signature: later syncs of a set send only that
        self._validated: _Identity | None = None
        self._targets: tuple[_Identity, list[list[torch.Tensor]]] | None = None
        self._previous: dict[str, TensorSpec] = {}
        self.last_report: SyncReport | None = None
        #: Where the time of the last sync went, from the manifest's arrival: its first receive enqueued.
        self.last_timings: dict[str, float] = {}
        #: The version `into=` destinations hold entirely (None before the first sync, or while incomplete).
        self.holds_version: int | None = None
        #: True while `into=` destinations hold a mix of versions (a sync failed half-way through them).
        self.incomplete = False
        self._busy = threading.Lock()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **kwargs: Any) -> WeightReceiver:
        return cls(MemberEnv.from_env(environ), **kwargs)

    @property
    def rank(self) -> int:
        return self.group.rank

    def _problems(self, manifest: Manifest, into: Mapping[str, torch.Tensor] | None,
                  destinations: _Destinations, same_destinations: bool) -> list[str]:
        """`destinations`: _destination_identity(into), taken while the receiver still waited for the sync;
        `same_destinations`: whether they are the ones validated last time (compared then too)."""
        problems = self.group.transfer.differences(manifest.config)
        # The same tensor set into the same destination tensors, of the same shapes and dtypes, as last time
        # needs no second look.
        if not problems and same_destinations and self._validated is not None \
                and self._validated[0] == manifest.signature:
            return problems
        identity: _Identity = (manifest.signature, id(into), *destinations)
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

    def _idle_check(self, deadline: float | None) -> Callable[[], None]:
        """While waiting for the next sync: the caller's timeout, a new epoch or formation (re-form quietly),
        a formation another member broke meanwhile (the trainer re-forms it), a trainer that is gone."""
        group = self.group
        last = [0.0]

        def check() -> None:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise _NoSync
            if now - last[0] < 0.1:
                return
            last[0] = now
            if group.current_epoch() != group.epoch:
                raise _Moved
            if group.keys is None or group.liveness is None or not group.keys.client.usable:
                return  # no formation yet, or its store went away: forming again connects afresh
            record, abort = group.keys.get_many([FORMATION, group.fkeys.abort])
            if record is not None and int(record["formation"]) != group.formation:
                raise _Moved
            if abort is not None:
                group.saw_abort()
                group.broken = (group.epoch or 0, group.formation)
                raise _Moved
            group.liveness.raise_if_lost([0], "the wait for the next sync", group.describe)

        return check

    def _wait_for_manifest(self, timeout: float | None) -> tuple[int, Manifest]:
        """Wait for the trainer's next sync, re-forming the group whenever the epoch or formation moves on.

        With no timeout the wait lasts as long as the trainer is alive: a dead trainer is an error, a busy
        one (a long training step) is not.
        """
        group = self.group
        deadline = None if timeout is None else time.monotonic() + timeout
        idle = self._idle_check(deadline)
        while True:
            try:
                group.ensure_formed(idle=idle)
                keys = group.keys
                assert keys is not None
                seq = group.seq
                announced = manifest_key(group.fkeys, seq)
                doc = group.run_guarded("the wait for the next sync",
                                        functools.partial(keys.wait, [announced], float("inf"), idle),
                                        passthrough=(_Moved, _NoSync))[0]
            except _Moved:
                group.leave_formation()
                continue
            except _NoSync:
                raise WeightSyncError(f"no sync started within {timeout:.0f}s") from None
            try:
                return seq, Manifest.from_doc(doc, self._manifests)
            except ValueError as err:
                raise PeerLostError(f"the trainer's manifest of sync {seq} cannot be used: {err}",
                                    ranks=(0,)) from err

    def receive(self, loader: Loader | None = None, *, into: Mapping[str, torch.Tensor] | None = None,
                timeout: float | None = None, on_abandon: Abandoned | None = None) -> SyncReport:
        """Receive the next sync.

        Give either `loader`, called with batches of (name, tensor) like vLLM's `load_weights` (the tensors
        are views into reused buffers, valid during the call), or `into`, a mapping of name to destination
        tensor that is written in place (under torch.no_grad(): parameters that require grad are fine).
        `timeout` bounds the wait for the trainer to start the sync. `on_abandon(version, error)` is called
        when a sync whose batches the loader had begun to get fails before it completes.
        """
        if (loader is None) == (into is None):
            raise ValueError("pass exactly one of `loader` or `into`")
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("receive() is already running on this receiver (in another thread); one receiver "
                               "takes one sync at a time")
        try:
            with gc_paused(), torch.no_grad():
                return self._receive(loader, into, timeout, on_abandon)
        finally:
            self._busy.release()

    def _receive(self, loader: Loader | None, into: Mapping[str, torch.Tensor] | None,
                 timeout: float | None, on_abandon: Abandoned | None) -> SyncReport:
        group = self.group
        # Read before the wait, not after the manifest arrives: with tens of thousands of destinations this is
        # milliseconds, and the sync should not wait for them. They cannot change while this call blocks.
        destinations = _destination_identity(into)
        same_destinations = self._validated is not None and self._validated[1:] == (id(into), *destinations)
        seq, manifest = self._wait_for_manifest(timeout)
        if manifest.signature not in self._manifests:
            self._manifests = {manifest.signature: manifest}  # the newest set only: the trainer sends no older
        started = time.perf_counter()
        version = manifest.version
        sync = group.receiver_round(seq, version, time.monotonic() + group.timeout)
        stage = ["checking"]  # -> "receiving" once data may land, -> "received" once all of it did

        def body() -> SyncReport:
            problems = self._problems(manifest, into, destinations, same_destinations)
            sync.verdict(problems)
            sync.await_go()
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
            stage[0] = "receiving"
            first = receive_chunks(group.comm, plan, manifest.tensors, views, self.buffers,
                                   targets, loader, sums, sync.data_check, self.settings.timeline)
            self.last_timings = {"first_byte_seconds": first - started}
            got = sums.fetch(len(manifest.tensors))
            errors = [f"tensor {manifest.tensors[i].name!r} checksum {g} != trainer's {w}"
                      for i, (g, w) in enumerate(zip(got, manifest.checksums, strict=False)) if g != w]
            sync.acknowledge(errors)
            if errors:
                raise ChecksumError(f"sync v{version} arrived corrupted at rank {self.rank}: " + "; ".join(errors[:5]))
            stage[0] = "received"
            sync.await_done()
            assert group.comm is not None and group.epoch is not None
            return SyncReport.make(version, len(manifest.tensors), plan.total_bytes, time.perf_counter() - started,
                                   (self.rank,), group.comm.transport, group.epoch, group.formation_seconds)

        try:
            report: SyncReport = group.run_guarded(f"sync v{version}", body)
        except WeightSyncError as err:
            if stage[0] != "checking":
                self._abandon(err, version, into is not None, stage[0] == "received", on_abandon)
            raise
        if self._validated is None or self._validated[0] != manifest.signature or not self._previous:
            self._previous = {t.name: t for t in manifest.tensors}
        if into is not None:
            self.holds_version, self.incomplete = version, False
        log.info(report.summary())
        self.last_report = report
        return report

    def _abandon(self, err: WeightSyncError, version: int, into: bool, arrived: bool,
                 on_abandon: Abandoned | None) -> None:
        """Say on the error, on this receiver and to the loader that `version` will not be completed.

        `arrived`: every byte of it reached this receiver (the failure came while waiting for the others):
        destinations then hold it whole, though it is not a version every member has."""
        err.abandoned_version = version
        if into and arrived:
            self.incomplete, self.holds_version = False, version
            note = (f"; v{version} was abandoned: it arrived here whole (the destinations hold it), but not on "
                    "every member")
        elif into:
            self.incomplete, self.holds_version = True, None
            note = (f"; v{version} was abandoned: the destinations hold a mix of versions and stay marked "
                    "incomplete until the next complete sync")
        else:
            note = f"; v{version} was abandoned"
        err.incomplete = self.incomplete
        if err.args and isinstance(err.args[0], str):
            err.args = (err.args[0] + note, *err.args[1:])
        if on_abandon is not None:
            on_abandon(version, err)
