"""The trainer's own torch.distributed job: every one of its ranks calls `WeightSender.send`; rank 0 sends.

The other ranks only join the gathers (a DTensor's `full_tensor()`) and learn the outcome. They meet on the
rendezvous store that trainer rank 0 hosts (authenticated, sealed, like every other key), under the group's
prefix and `tj/`, never in the inference members' keys:

    tj/alive/<r>, tj/beat/<r>     liveness of trainer rank r (ephemeral key, heartbeat), as for members
    tj/join/<r>                   rank r arrived: {rank, pod, pid}
    tj/s<n>/ready/<r>             rank r is in its n-th send: {version, signature} (or the error it hit)
    tj/s<n>/go/<k>                rank 0: gather pass k starts now (the checksum pass, then the data pass)
    tj/s<n>/fail/<r>              rank r failed in a gather pass: {reason, culprits}
    tj/s<n>/outcome               rank 0: the report, or the error every rank raises

Gathers run on a worker thread of each rank and the rank waits for each one with a bound, checking the
others meanwhile: a rank that dies (its connection closes), stalls (no heartbeat past the threshold) or
fails (its `fail` key) ends every other rank's wait at once with a `TrainerJobError` naming it, even where
the collective itself would wait for ever (a rank that raised before joining it, NCCL). Those gathers are
abandoned: the job's collectives are out of step, so the job is lost and every later send says so.
A failure elsewhere (a receiver lost) never leaves a gather behind: rank 0 completes the pass (gathering
and dropping the rest) so the job's collectives stay in step, then every rank raises the same error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from weightsync.runtime import errors
from weightsync.runtime.errors import ConfigMismatchError, TrainerJobError, WeightSyncError
from weightsync.runtime.handshake import alive_key
from weightsync.runtime.keystore import KeyStore, group_prefix
from weightsync.runtime.liveness import Liveness
from weightsync.runtime.report import SyncReport
from weightsync.runtime.sealing import Sealer
from weightsync.runtime.settings import RuntimeSettings
from weightsync.runtime.store import StoreClient, StoreUnreachable

from weightsync.contract import MemberEnv

log = logging.getLogger("weightsync.runtime")

Check = Callable[[], None]
_CHECK_EVERY = 0.1


def job_ranks(env: MemberEnv, rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """This process's rank in the trainer job and the job's size.

    The size: `world_size`, else the contract's `WEIGHTSYNC_TRAINER_PODS` x `WEIGHTSYNC_TRAINER_RANKS_PER_POD`
    (1 x 1 unless the WeightSync's trainer says otherwise: then only one process sends, as before, whatever
    torch.distributed job it belongs to). The rank: `rank`, else the default torch.distributed group's once
    initialised, else torchrun's RANK. A job of more than one rank must agree with torch.distributed's."""
    import torch.distributed as dist

    if world_size is None:
        world_size = int(getattr(env, "trainer_pods", 1)) * int(getattr(env, "trainer_ranks_per_pod", 1))
    if world_size == 1:
        if rank not in (None, 0):
            raise ValueError(f"trainer_rank {rank} is outside a trainer job of one rank")
        return 0, 1
    initialised = dist.is_available() and dist.is_initialized()
    if rank is None:
        try:
            rank = dist.get_rank() if initialised else int(os.environ.get("RANK", "0"))
        except ValueError as err:
            raise ValueError(f"RANK of the trainer job is not an integer: {err}") from None
    if initialised and dist.get_world_size() != world_size:
        raise ValueError(f"the trainer job has {world_size} ranks (WEIGHTSYNC_TRAINER_PODS x "
                         f"WEIGHTSYNC_TRAINER_RANKS_PER_POD, or trainer_world_size) but its default "
                         f"torch.distributed group has {dist.get_world_size()}")
    if not 0 <= rank < world_size:
        raise ValueError(f"trainer rank {rank} is outside the trainer job's {world_size} ranks")
    return rank, world_size


class Gathers:
    """One pass over a source's full tensors, on a worker thread: `fetch()` asks for the next one and waits,
    bounded by `check`, so that a collective that never completes never holds the caller."""

    def __init__(self, tensors: Iterator[torch.Tensor | None], count: int, name: Callable[[int], str]) -> None:
        self.count = count
        self.name = name
        self.fetched = 0
        self._want = threading.Semaphore(0)
        self._results: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._outstanding = False
        self._stop = False
        self.failed: BaseException | None = None
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
        device = torch.cuda.current_device() if cuda else None
        self._thread = threading.Thread(target=self._run, args=(tensors, device), daemon=True,
                                        name="weightsync-gathers")
        self._thread.start()

    def _run(self, tensors: Iterator[torch.Tensor | None], device: int | None) -> None:
        if device is not None:
            torch.cuda.set_device(device)
        with torch.no_grad():
            for _ in range(self.count):
                self._want.acquire()
                if self._stop:
                    return
                try:
                    t = next(tensors)
                    event = None
                    if t is not None and t.is_cuda:
                        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                        event.record()
                    self._results.put(("ok", t, event))
                except BaseException as err:  # handed to the waiting thread, which raises it
                    self._results.put(("error", err, None))
                    return
                del t

    @property
    def done(self) -> bool:
        return self.fetched >= self.count

    def fetch(self, check: Check) -> torch.Tensor | None:
        """The next full tensor (None where a rank that does not send has nothing to keep)."""
        if self.failed is not None:
            raise self.failed
        if not self._outstanding:
            self._outstanding = True
            self._want.release()
        pause = 0.0005
        while True:
            try:
                kind, value, event = self._results.get(timeout=pause)
                break
            except queue.Empty:
                check()
                pause = min(pause * 2, 0.02)
        self._outstanding = False
        if kind == "error":
            self.failed = value
            raise value
        self.fetched += 1
        if event is not None:
            torch.cuda.current_stream().wait_event(event)
        return value  # type: ignore[no-any-return]

    def drain(self, check: Check) -> None:
        """Gather (and drop) every tensor not fetched yet: the other ranks are in those collectives too."""
        while not self.done and self.failed is None:
            self.fetch(check)

    def abandon(self) -> None:
        """Stop after the gather in progress, if it ever ends (the thread is a daemon: it never holds up exit)."""
        self._stop = True
        self._want.release()


class TrainerJob:
    """The side channel of one trainer rank with the others, on the store trainer rank 0 hosts."""

    def __init__(self, env: MemberEnv, rank: int, world_size: int, settings: RuntimeSettings) -> None:
        self.env = env
        self.rank = rank
        self.world_size = world_size
        self.timeout = env.timeout_seconds
        self.settings = settings
        self.dead_after = settings.dead_after_for(self.timeout)
        self._sealer = Sealer(env.token)
        self._prefix = group_prefix(env.namespace, env.name, env.token) + "tj/"
        self.keys: KeyStore | None = None
        self._beat_client: StoreClient | None = None
        self._client: StoreClient | None = None
        self.liveness: Liveness | None = None
        self.joined: dict[int, dict[str, Any]] = {}
        self.seq = 0
        #: Why the job is lost (gathers abandoned mid-way); every later send raises it.
        self.lost: TrainerJobError | None = None
        self.lost_seq: int | None = None  # the sync it was lost in
        self._last_check = 0.0

    @property
    def others(self) -> list[int]:
        return [r for r in range(self.world_size) if r != self.rank]

    def describe(self, rank: int) -> str:
        info = self.joined.get(rank, {})
        where = ", ".join(f"{k} {info[k]}" for k in ("pod", "pid") if k in info)
        return f"trainer rank {rank} of {self.world_size}{f' ({where})' if where else ''}"

    # ----------------------------------------------------------------------------------------- set-up
    def connect(self, host: str, deadline: float) -> KeyStore:
        """Connected, heart beating and joined; again after the store went away."""
        if self.keys is not None:
            return self.keys
        self.close()
        remaining = max(deadline - time.monotonic(), 1.0)
        op_timeout = self.dead_after + 1.0
        try:
            self._client = StoreClient.connect(host, self.env.master_port, self.env.token, remaining,
                                               op_timeout=op_timeout)
            self._beat_client = StoreClient.connect(host, self.env.master_port, self.env.token, remaining,
                                                    op_timeout=op_timeout)
        except StoreUnreachable as err:
            self.close()
            raise TrainerJobError(f"trainer rank {self.rank} cannot reach the rendezvous store trainer rank 0 "
                                  f"hosts at {host}:{self.env.master_port}: {err}", (0,)) from err
        keys = KeyStore(self._client, self._sealer, self._prefix)
        self.liveness = Liveness(KeyStore(self._beat_client, self._sealer, self._prefix), keys, self.rank,
                                 self.settings.heartbeat_interval, self.dead_after, 0)
        self.liveness.start()
        me = {"rank": self.rank, "pod": socket.gethostname(), "pid": os.getpid()}
        keys.put(f"join/{self.rank}", me)
        self.joined[self.rank] = me
        self.keys = keys
        return keys

    def linger_for_failure_readers(self) -> None:
        """Rank 0 hosts the store: when its process leaves after the job was lost in a sync, keep the store
        up, briefly, until every other rank still connected has seen why (it posted its own failure of that
        sync), so that they name the rank at fault instead of only seeing the store vanish."""
        if self.rank != 0 or self.lost is None or self.lost_seq is None or self.keys is None or not self.others:
            return
        seq, others, n = self.lost_seq, self.others, len(self.others)
        give_up = time.monotonic() + min(3.0, self.timeout)
        with contextlib.suppress(WeightSyncError):
            while time.monotonic() < give_up:
                flags = self.keys.has([alive_key(r) for r in others] + [f"s{seq}/fail/{r}" for r in others]
                                      + [f"s{seq}/seen/{r}" for r in others])
                alive, failed, seen = flags[:n], flags[n:2 * n], flags[2 * n:]
                if all(f or s or not a for a, f, s in zip(alive, failed, seen, strict=True)):
                    return
                time.sleep(0.02)

    def _post_seen(self, seq: int) -> None:
        """This rank learnt how sync `seq` failed (rank 0 may let its store go)."""
        if self.keys is not None:
            with contextlib.suppress(WeightSyncError):
                self.keys.put(f"s{seq}/seen/{self.rank}", {})

    def close(self) -> None:
        if self.liveness is not None:
            self.liveness.stop()
            self.liveness = None
        for client in (self._client, self._beat_client):
            if client is not None:
                client.close()
        self._client = self._beat_client = None
        self.keys = None

    def _store_gone(self, err: BaseException) -> TrainerJobError:
        self.close()
        return TrainerJobError(f"{self.describe(0)}, which hosts the rendezvous store, is gone or not answering "
                               f"({str(err).splitlines()[0] if str(err) else type(err).__name__})", (0,))

    # ------------------------------------------------------------------------------------------ checks
    def _refresh_joined(self) -> None:
        assert self.keys is not None
        missing = [r for r in range(self.world_size) if r not in self.joined]
        if missing:
            for r, info in zip(missing, self.keys.get_many([f"join/{r}" for r in missing]), strict=True):
                if isinstance(info, dict):
                    self.joined[r] = info

    def lost_ranks(self) -> list[tuple[int, str]]:
        """Ranks that joined and are now gone or stalled, with the reason."""
        assert self.liveness is not None
        self._refresh_joined()
        return self.liveness.lost([r for r in self.others if r in self.joined])

    def failures(self, seq: int) -> dict[int, dict[str, Any]]:
        assert self.keys is not None
        others = self.others
        values = self.keys.get_many([f"s{seq}/fail/{r}" for r in others])
        return {r: v for r, v in zip(others, values, strict=True) if isinstance(v, dict)}

    def checker(self, seq: int, what: str, deadline: float, extra: Check | None = None) -> Check:
        """Raises TrainerJobError when another rank failed, died or stalled, or the deadline passed."""

        def check() -> None:
            if extra is not None:
                extra()
            now = time.monotonic()
            if now >= deadline:
                raise self.overdue(what)
            if now - self._last_check < _CHECK_EVERY:
                return
            self._last_check = now
            self.raise_if_failed(seq, what)

        return check

    def overdue(self, what: str) -> TrainerJobError:
        """A deadline passed inside the job's collectives: name the ranks whose heartbeat went quiet, which
        hold the gathers up (a rank stopped a moment before the deadline is not yet past the dead-peer
        threshold, and must not pass for a receiver's or this rank's fault); else this rank's own wait."""
        quiet = [r for r in self.others if r in self.joined and self.liveness is not None
                 and self.liveness.is_quiet(r)]
        if quiet:
            assert self.liveness is not None
            return TrainerJobError(f"{what} did not complete within {self.timeout:g}s: "
                                   + "; ".join(f"{self.describe(r)}: {self.liveness.silence(r)}" for r in quiet),
                                   tuple(quiet), job_lost=True)
        return TrainerJobError(f"{what} timed out after {self.timeout:g}s on {self.describe(self.rank)}, every "
                               "other trainer rank beating", (self.rank,), job_lost=True)

    def raise_if_failed(self, seq: int, what: str) -> None:
        try:
            failed = self.failures(seq)
            if failed:
                r, info = min(failed.items())
                culprits = tuple(int(c) for c in info.get("culprits", [r]))
                raise TrainerJobError(f"{what} failed: {info.get('reason', '')}", culprits, job_lost=True)
            lost = self.lost_ranks()
        except WeightSyncError as err:
            if isinstance(err, TrainerJobError):
                raise
            raise self._store_gone(err) from err
        if lost:
            raise TrainerJobError("; ".join(f"{self.describe(r)} is lost during {what}: {why}" for r, why in lost),
                                  tuple(r for r, _ in lost), job_lost=True)

    def name_failure(self, seq: int, what: str, err: BaseException) -> TrainerJobError:
        """This rank's gather (or producer) failed: blame whoever the others' state shows at fault (a rank
        that died makes every other rank's collective fail), else this rank; tell the others."""
        named: TrainerJobError | None = err if isinstance(err, TrainerJobError) else None
        if named is None:
            give_up = time.monotonic() + 2.0
            while named is None and time.monotonic() < give_up and self.keys is not None:
                try:
                    self.raise_if_failed(seq, what)
                except TrainerJobError as found:
                    named = TrainerJobError(f"{found} (here: {type(err).__name__}: {err})", found.trainer_ranks,
                                            job_lost=True)
                    break
                time.sleep(0.05)
        if named is None:
            named = TrainerJobError(f"{what} failed on {self.describe(self.rank)}: {type(err).__name__}: {err}",
                                    (self.rank,), job_lost=True)
        if self.keys is not None:
            with contextlib.suppress(WeightSyncError):
                self.keys.put(f"s{seq}/fail/{self.rank}", {"reason": str(named),
                                                           "culprits": list(named.trainer_ranks)})
        self.lost, self.lost_seq = named, seq
        return named

    # ------------------------------------------------------------------------------------ rank 0's side
    def await_ready(self, seq: int, version: int, signature: str, deadline: float) -> None:
        """Every rank is in this send, for the same version and tensor list (rank 0)."""
        assert self.keys is not None
        what = f"sync v{version}"
        others = self.others
        keys = [f"s{seq}/ready/{r}" for r in others]
        try:
            readies = self.keys.wait(keys, deadline, lambda: self.raise_if_failed(seq, what))
        except TimeoutError:
            present = self.keys.has(keys)
            missing = [r for r, there in zip(others, present, strict=True) if not there]
            raise TrainerJobError(f"{what}: {', '.join(self.describe(r) for r in missing)} did not call send() "
                                  f"within {self.timeout:g}s (every trainer rank calls it, in step)",
                                  tuple(missing)) from None
        self._refresh_joined()
        problems = []
        for r, ready in zip(others, readies, strict=True):
            if ready.get("error"):
                problems.append((r, f"{self.describe(r)}: {ready['error']}"))
            elif ready.get("version") != version:
                problems.append((r, f"{self.describe(r)} sends version {ready.get('version')}, rank 0 {version}"))
            elif ready.get("signature") != signature:
                problems.append((r, f"{self.describe(r)} has another tensor list (names, shapes, dtypes or "
                                    "placements differ from rank 0's)"))
        if problems:
            raise ConfigMismatchError(f"{what} refused before any gather: " + "; ".join(p for _, p in problems))
        if seq > 0:
            with contextlib.suppress(WeightSyncError):
                self.keys.delete_prefix(f"s{seq - 1}/")

    def go(self, seq: int, k: int) -> None:
        assert self.keys is not None
        self.keys.put(f"s{seq}/go/{k}", {})

    def post_outcome(self, seq: int, report: SyncReport | None, err: BaseException | None) -> None:
        """Tell every other rank how the sync ended (best effort: a store that is gone tells them itself)."""
        if self.keys is None:
            return
        if report is not None:
            doc: dict[str, Any] = {"ok": True, "report": json.loads(report.to_json())}
        else:
            doc = {"ok": False, "error": type(err).__name__, "message": str(err) or type(err).__name__,
                   "ranks": list(getattr(err, "ranks", ()) or ()),
                   "trainer_ranks": list(getattr(err, "trainer_ranks", ()) or ()),
                   "job_lost": bool(getattr(err, "job_lost", False))}
        with contextlib.suppress(WeightSyncError):
            self.keys.put(f"s{seq}/outcome", doc)

    # ---------------------------------------------------------------------------------- the others' side
    def post_ready(self, seq: int, version: int, signature: str, error: str | None = None) -> None:
        assert self.keys is not None
        self.keys.put(f"s{seq}/ready/{self.rank}", {"version": version, "signature": signature, "error": error})

    def next_step(self, seq: int, k: int, version: int, deadline: float) -> dict[str, Any] | None:
        """None when gather pass k starts; else the outcome (a rank that does not send)."""
        assert self.keys is not None
        what = f"sync v{version}"
        go, outcome = f"s{seq}/go/{k}", f"s{seq}/outcome"

        def poll() -> None:
            if self.keys is not None and self.keys.has([outcome])[0]:
                raise _Outcome
            self.raise_if_failed(seq, what)

        try:
            self.keys.wait([go], deadline, poll)
            return None
        except _Outcome:
            value = self.keys.get(outcome)
            if not isinstance(value, dict) or not value.get("ok"):
                self._post_seen(seq)
            return value if isinstance(value, dict) else {"ok": False, "error": "WeightSyncError",
                                                          "message": f"{what}: no readable outcome"}
        except TrainerJobError:
            self._post_seen(seq)
            raise
        except TimeoutError:
            raise TrainerJobError(f"{what}: {self.describe(0)} neither started the gathers nor ended the sync "
                                  f"within the bound", (0,)) from None
        except WeightSyncError as err:
            if isinstance(err, TrainerJobError):
                raise
            raise self._store_gone(err) from err

    def alive_ranks(self) -> list[bool]:
        assert self.keys is not None
        return self.keys.has([alive_key(r) for r in range(self.world_size)])


class _Outcome(Exception):
    """The outcome arrived while a rank waited for the next gather pass."""


def outcome_result(outcome: dict[str, Any], what: str) -> SyncReport:
    """A rank that does not send: the report of a sync that succeeded, else the error rank 0 raised."""
    if outcome.get("ok"):
        doc = dict(outcome["report"])
        doc["acked"] = tuple(doc.get("acked", ()))
        return SyncReport(**doc)
    name, message = str(outcome.get("error", "WeightSyncError")), str(outcome.get("message", ""))
    cls = getattr(errors, name, None)
    text = f"{what} failed on trainer rank 0: {name}: {message}"
    trainer_ranks = tuple(int(r) for r in outcome.get("trainer_ranks", ()))
    if name == "TrainerJobError" or trainer_ranks:
        raise TrainerJobError(text, trainer_ranks, job_lost=bool(outcome.get("job_lost")))
    if isinstance(cls, type) and issubclass(cls, errors.PeerLostError):
        raise errors.PeerLostError(text, ranks=tuple(int(r) for r in outcome.get("ranks", ())))
    if isinstance(cls, type) and issubclass(cls, errors.ConfigMismatchError):
        raise ConfigMismatchError(text)
    if isinstance(cls, type) and issubclass(cls, errors.RendezvousError):
        raise errors.RendezvousError(text, tuple(int(r) for r in outcome.get("ranks", ())))
    raise WeightSyncError(text)
