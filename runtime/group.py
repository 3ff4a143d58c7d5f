"""The sync group of one member: it forms, re-forms and hands out rounds; handshake.py says what a round does.

A group lives for one formation. Formations are numbered inside an epoch:
- the operator bumps the epoch (a pod annotation, projected into a file) when a member pod fails or the
  membership changes; members notice at their next send or receive, or while they wait, and form again at
  formation 0 of the new epoch;
- inside an epoch the members heal by themselves: when a sync fails while every process lives on (a member
  was stopped past the threshold, too busy to take part, briefly cut off), the trainer announces the next
  formation at once and every member re-joins it at its next send or receive, without restarting anything.

Every value is sealed (sealing.py) on an authenticated store (store.py) that the trainer hosts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any, Self

import torch
from weightsync.runtime.comm import Communicator, GlooCommunicator, member_device
from weightsync.runtime.errors import (
    ConfigMismatchError,
    PeerLostError,
    RendezvousError,
    TamperedValueError,
    TransportError,
    WeightSyncError,
)
from weightsync.runtime.handshake import (
    FORMATION,
    Check,
    FormationKeys,
    ReceiverRound,
    TrainerRound,
    alive_key,
)
from weightsync.runtime.keystore import KeyStore, group_prefix
from weightsync.runtime.liveness import Liveness
from weightsync.runtime.manifest import TransferConfig
from weightsync.runtime.sealing import Sealer
from weightsync.runtime.settings import RuntimeSettings
from weightsync.runtime.store import StoreAuthError, StoreClient, StoreUnreachable
from weightsync.runtime.store_process import StoreProcess
from weightsync.runtime.transfer import Buffers

from weightsync.contract import TRAINER_RANK, MemberEnv

log = logging.getLogger("weightsync.runtime")

_CHECK_EVERY = 0.1  # seconds between liveness look-ups while a wait polls


class _Moved(Exception):
    """The epoch or the formation moved on while this member formed or waited: form again."""


class SyncGroup:
    def __init__(self, env: MemberEnv, local_rank: int = 0, device: torch.device | str | None = None,
                 settings: RuntimeSettings | None = None) -> None:
        if not 0 <= local_rank < env.local_world_size:
            raise ValueError(f"local_rank {local_rank} is outside this pod's "
                             f"WEIGHTSYNC_LOCAL_WORLD_SIZE={env.local_world_size}")
        if env.protocol != "weightsync":
            raise ValueError(f"SyncGroup forms groups of the weightsync protocol; WEIGHTSYNC_PROTOCOL="
                             f"{env.protocol!r} is driven by WeightSender (runtime/vllm_sender.py)")
        self.env = env
        self.settings = settings or RuntimeSettings()
        self.rank = env.rank_offset + local_rank
        self.local_rank = local_rank
        self.is_trainer = self.rank == TRAINER_RANK
        self.timeout = env.timeout_seconds
        self.dead_after = self.settings.dead_after_for(self.timeout)
        self.transfer = TransferConfig(env.protocol, env.packed, env.buffer_bytes, env.num_buffers, env.checksums)
        self.device = member_device(device, env.backend, lambda: self.local_rank % torch.cuda.device_count())
        self._sealer = Sealer(env.token)
        self._root = group_prefix(env.namespace, env.name, env.token)
        self.epoch: int | None = None
        self.formation = 0
        self.world_size = env.world_size  # as published by the operator at the current epoch
        self.broken: tuple[int, int] | None = None  # (epoch, formation) that failed here
        #: An abort this member could not post yet: (epoch prefix, key, value).
        self._abort_pending: tuple[str, str, dict[str, Any]] | None = None
        self.comm: Communicator | None = None
        self.keys: KeyStore | None = None
        self.fkeys = FormationKeys(0)
        self.liveness: Liveness | None = None
        self.members: dict[int, dict[str, Any]] = {}
        #: every member's record as last seen in any formation (for naming members that did not arrive)
        self._last_seen: dict[int, dict[str, Any]] = {}
        self.seq = 0
        self._server: StoreProcess | None = None
        self._client: StoreClient | None = None
        self._beat_client: StoreClient | None = None
        self._last_check = 0.0
        #: Seconds the last send/receive spent forming the group (0 when it was formed already).
        self.formation_seconds = 0.0

    # ----------------------------------------------------------------------------------------- set-up
    def describe(self, rank: int) -> str:
        # A member missing from this formation is described as it was last seen: the trainer's own
        # local world size says nothing about an inference pod's workers.
        info = self.members.get(rank) or self._last_seen.get(rank, {})
        if rank == TRAINER_RANK:
            where = "trainer"
        elif "local_world_size" in info or not self.is_trainer:
            lws = int(info.get("local_world_size", self.env.local_world_size))
            where = f"inference replica {(rank - 1) // lws} worker {(rank - 1) % lws}"
        else:
            where = "inference"
        pod = info.get("pod")
        return f"rank {rank} ({where}{', pod ' + str(pod) if pod else ''})"

    def _describe_many(self, ranks: tuple[int, ...] | list[int]) -> str:
        return ", ".join(self.describe(r) for r in ranks)

    def current_epoch(self) -> int:
        return self.env.current_epoch()

    def _connect(self, deadline: float) -> StoreClient:
        """The store connections of this process, made once and again only after the store went away."""
        env = self.env
        # A connection a request failed on (the store went away) is not kept: each attempt would fail at once
        # on it (a receiver's next receive()s used to burn all their attempts in a millisecond); connect afresh.
        if (self._client is not None and self._beat_client is not None and self._client.usable
                and self._beat_client.usable):
            return self._client
        self._drop_connections()
        op_timeout = self.dead_after + 1.0
        if self.is_trainer:
            if self._server is not None and not self._server.alive():
                log.warning("the rendezvous store process ended (%s); starting it again", self._server.ended())
                self._server.close()
                self._server = None
            if self._server is None:
                try:
                    self._server = StoreProcess(env.master_port, env.token)
                except OSError as err:
                    raise RendezvousError(f"cannot host the rendezvous store on port {env.master_port}: {err}") \
                        from err
            host = "127.0.0.1"
        else:
            host = env.master_addr
        try:
            remaining = max(deadline - time.monotonic(), 1.0)
            self._client = StoreClient.connect(host, env.master_port, env.token, remaining, op_timeout=op_timeout)
            self._beat_client = StoreClient.connect(host, env.master_port, env.token, remaining,
                                                    op_timeout=op_timeout)
        except StoreAuthError as err:
            self._drop_connections()
            raise RendezvousError(f"the rendezvous store at {host}:{env.master_port} refused this member: {err} "
                                  "(a WEIGHTSYNC_TOKEN of another group, or not a weightsync store)",
                                  missing_ranks=(TRAINER_RANK,)) from err
        except StoreUnreachable as err:
            self._drop_connections()
            raise RendezvousError(f"rank 0 (the trainer) is unreachable: no rendezvous store at "
                                  f"{host}:{env.master_port} after {self.timeout:.0f}s ({err})",
                                  missing_ranks=(TRAINER_RANK,)) from err
        return self._client

    def ensure_store(self, deadline: float) -> None:
        """The trainer: its store is up (started, or started again after it died) before the group forms,
        for the other ranks of the trainer's own job, which meet on it too (trainer_job.py)."""
        if self._server is not None and not self._server.alive():
            self._drop_connections()  # _connect starts it again
        self._connect(deadline)

    def _drop_connections(self) -> None:
        for client in (self._client, self._beat_client):
            if client is not None:
                client.close()
        self._client = self._beat_client = None

    # ------------------------------------------------------------------------------------- formation
    def ensure_formed(self, deadline: float | None = None, idle: Check | None = None) -> None:
        """Form the group, or re-form it when the epoch or the formation moved on or the last sync failed.

        `deadline` bounds forming (default: the timeout from now). `idle`, for a receiver waiting for the
        next sync, makes the wait for the trainer's next formation last as long as `idle` does not raise.
        """
        given = deadline
        self.formation_seconds = 0.0
        try:
            while True:
                # Each formation gets the whole timeout: a member that follows the trainer into its next
                # formation (the last one moved on) must not give up on the new one with the old one's clock.
                deadline = given if given is not None else time.monotonic() + self.timeout
                try:
                    target = self._formation_wanted(deadline, idle)
                    if target is None:
                        return
                    self._form(*target, deadline)
                    return
                except _Moved:
                    continue
        except StoreUnreachable as err:
            self._drop_connections()
            raise RendezvousError(f"{self.describe(TRAINER_RANK)} is unreachable: {err}",
                                  missing_ranks=(TRAINER_RANK,)) from err

    def _formation_wanted(self, deadline: float, idle: Check | None) -> tuple[int, int] | None:
        """(epoch, formation) to form now, or None when the group stands as it is."""
        epoch, _ = self.env.membership()
        if self.is_trainer:
            if self.comm is not None and epoch == self.epoch and self.broken is None:
                assert self.keys is not None
                try:
                    abort = self._read(self.keys, self.fkeys.abort)
                except WeightSyncError as err:  # the store process went away: a new one, a new formation
                    log.warning("re-forming: %s", err)
                    self._drop_connections()
                    abort = {}
                if abort is None:
                    return None
                if abort and abort.get("leaving") and epoch == self.epoch:
                    # A member left while the group was idle (its pod is going): this send fails naming it,
                    # as it would had the member died; the next one re-forms (at the operator's new epoch).
                    self.broken = (epoch, self.formation)
                    self._teardown_formation()
                    by = int(abort.get("by", -1))
                    raise PeerLostError(f"{self.describe(by)} left the group: {abort.get('reason', '')}",
                                        ranks=(by,))
                if abort:
                    log.warning("re-forming: %s", self._abort_message(abort, "the last sync"))
            self._teardown_formation()
            if epoch != self.epoch:
                return epoch, 0
            return epoch, self.formation + 1
        # A receiver follows the trainer's formation record.
        client = self._connect(deadline)
        keys = KeyStore(client, self._sealer, self._epoch_prefix(epoch))
        if self.comm is not None and epoch == self.epoch and self.broken is None:
            record = self._read(keys, FORMATION)
            if record is not None and int(record["formation"]) == self.formation:
                return None
        self._teardown_formation()
        self._post_pending_abort()
        while True:
            record = self._read(keys, FORMATION)
            # Join only a formation the trainer has opened (it is waiting for the joins right then), and
            # never one that broke here.
            wanted = record is not None and bool(record.get("open")) and (
                self.broken is None or (epoch, int(record["formation"])) > self.broken)
            if wanted:
                assert record is not None
                return epoch, int(record["formation"])
            if idle is not None:
                idle()
            elif time.monotonic() >= deadline:
                if self.broken is not None:
                    raise WeightSyncError(
                        f"the sync group broke at epoch {self.broken[0]} (formation {self.broken[1]}) and the "
                        f"trainer did not re-form it within {self.timeout:.0f}s")
                raise RendezvousError(f"{self.describe(TRAINER_RANK)} did not open epoch {epoch} of the group "
                                      f"within {self.timeout:.0f}s", missing_ranks=(TRAINER_RANK,))
            time.sleep(0.05)
            new_epoch, _ = self.env.membership()
            if new_epoch != epoch:
                raise _Moved

    def _read(self, keys: KeyStore, key: str) -> Any:
        """A value that fails authentication is never acted on: logged by name, and treated as absent."""
        try:
            return keys.get(key)
        except TamperedValueError as err:
            log.warning("%s", err)
            return None

    def _epoch_prefix(self, epoch: int) -> str:
        return f"{self._root}e{epoch}/"

    def _form(self, epoch: int, formation: int, deadline: float) -> None:
        env = self.env
        started = time.monotonic()
        _, self.world_size = env.membership()
        if self.rank >= self.world_size:
            raise WeightSyncError(f"rank {self.rank} is outside the group of world size {self.world_size} at epoch "
                                  f"{epoch}: this pod was scaled away and should be gone soon")
        client = self._connect(deadline)
        keys = KeyStore(client, self._sealer, self._epoch_prefix(epoch))
        fkeys = FormationKeys(formation)
        if self.is_trainer:
            if self.epoch is not None and self.epoch != epoch:
                keys.client.delete_prefix(self._epoch_prefix(self.epoch))
            elif formation > 0:
                keys.delete_prefix(FormationKeys(formation - 1).prefix)
            keys.delete_prefix(fkeys.prefix)  # nobody joined yet: it opens now
        self._start_liveness(epoch, keys)
        self.keys, self.fkeys, self.epoch, self.formation, self.seq = keys, fkeys, epoch, formation, 0
        self.broken, self.members = None, {}
        if self.is_trainer:
            keys.put(FORMATION, {"formation": formation, "open": True})
        nonce = secrets.token_hex(16)
        me = {"rank": self.rank, "pod": socket.gethostname(), "pid": os.getpid(),
              "local_world_size": env.local_world_size, "world_size": self.world_size, "nonce": nonce}
        keys.put(fkeys.join(self.rank), me)
        self.members[self.rank] = me
        try:
            nccl_id = self._trainer_forms(deadline) if self.is_trainer else self._receiver_joins(deadline, nonce)
            self.comm = self._make_comm(nccl_id, deadline)
        except _Moved:
            self._teardown_formation()
            raise
        except BaseException as err:
            named = self.name_the_lost(err, "forming the group")
            self._fail(named)
            if named is err:
                raise
            raise named from err
        self.formation_seconds = time.monotonic() - started
        log.info("rank %d joined the sync group at epoch %d formation %d (world size %d, %s) in %.2fs", self.rank,
                 epoch, formation, self.world_size, self.comm.transport, self.formation_seconds)

    def _start_liveness(self, epoch: int, keys: KeyStore) -> None:
        """Heartbeats for the epoch (not a formation: a member is alive between formations too), on the
        heartbeat connection of the moment."""
        assert self._beat_client is not None
        live = self.liveness
        if live is not None and live.epoch == epoch and live.beats.client is self._beat_client:
            live.looks = keys
            return
        if live is not None:
            live.stop()
        self.liveness = Liveness(KeyStore(self._beat_client, self._sealer, keys.prefix), keys, self.rank,
                                 self.settings.heartbeat_interval, self.dead_after, epoch)
        self.liveness.start()

    def _moved_check(self, epoch: int) -> Check:
        """While forming: the epoch moved (the operator re-forms the group), or the formation did."""

        def check() -> None:
            now = time.monotonic()
            if now - self._last_check < _CHECK_EVERY:
                return
            self._last_check = now
            if self.env.membership()[0] != epoch:
                raise _Moved
            assert self.keys is not None
            abort = self._read(self.keys, self.fkeys.abort)
            if abort is not None:
                self.saw_abort()
                raise PeerLostError(self._abort_message(abort, "forming the group"),
                                    ranks=tuple(abort.get("ranks", ())))
            if not self.is_trainer:
                record = self._read(self.keys, FORMATION)
                if record is not None and int(record["formation"]) != self.formation:
                    raise _Moved
                assert self.liveness is not None
                self.liveness.raise_if_lost([TRAINER_RANK], "forming the group", self.describe)

        return check

    def _trainer_forms(self, deadline: float) -> str:
        keys, fkeys, epoch = self.keys, self.fkeys, self.epoch
        assert keys is not None and epoch is not None
        others = list(range(1, self.world_size))
        try:
            joins = keys.wait([fkeys.join(r) for r in others], deadline, self._moved_check(epoch))
        except TimeoutError:
            present = keys.has([fkeys.join(r) for r in others])
            missing = tuple(r for r, there in zip(others, present, strict=True) if not there)
            raise RendezvousError(
                f"{len(missing)} of {self.world_size - 1} members never arrived within {self.timeout:.0f}s at "
                f"epoch {epoch} (formation {self.formation}): {self._describe_many(missing)}",
                missing_ranks=missing) from None
        for r, joined in zip(others, joins, strict=True):
            self.members[r] = joined
        self._last_seen.update(self.members)
        sizes = {r: m["world_size"] for r, m in self.members.items() if m["world_size"] != self.world_size}
        nccl_id = ""
        if self.env.backend == "nccl":
            from weightsync.runtime.nccl import new_unique_id
            nccl_id = new_unique_id().hex()
        errors = [f"{self.describe(r)} has world size {s} (WEIGHTSYNC_WORLD_SIZE or the world-size annotation), "
                  f"the trainer {self.world_size}" for r, s in sizes.items()]
        keys.put(fkeys.group, {"world_size": self.world_size, "backend": self.env.backend, "nccl_id": nccl_id,
                               "members": {str(r): m for r, m in self.members.items()}, "errors": errors})
        if errors:
            raise ConfigMismatchError("; ".join(errors))
        return nccl_id

    def _receiver_joins(self, deadline: float, nonce: str) -> str:
        keys, fkeys, epoch = self.keys, self.fkeys, self.epoch
        assert keys is not None and epoch is not None
        # The trainer knows who is missing and says so: give it a moment past the common deadline.
        try:
            group = keys.wait([fkeys.group], deadline + 2.0, self._moved_check(epoch))[0]
        except TimeoutError:
            raise RendezvousError(
                f"{self.describe(TRAINER_RANK)} did not form the group within {self.timeout:.0f}s at epoch {epoch} "
                f"(formation {self.formation}); some other member is missing or the trainer is stuck",
                missing_ranks=(TRAINER_RANK,)) from None
        members = {int(r): m for r, m in group["members"].items()}
        if members.get(self.rank, {}).get("nonce") != nonce:
            raise RendezvousError(f"the group record of epoch {epoch} formation {self.formation} does not answer "
                                  "this member's join (stale, or a member of the same rank joined twice)",
                                  missing_ranks=(TRAINER_RANK,))
        self.members.update(members)
        self._last_seen.update(members)
        if group["errors"]:
            raise ConfigMismatchError("; ".join(group["errors"]))
        return str(group["nccl_id"])

    def _make_comm(self, nccl_id: str, deadline: float) -> Communicator:
        assert self.keys is not None and self._client is not None
        if self.env.backend == "gloo":
            import torch.distributed as dist
            store = dist.PrefixStore(self.keys.full_name(self.fkeys.gloo), self._client.c10d())
            try:
                return GlooCommunicator(store, self.rank, self.world_size, self.timeout)
            except RuntimeError as err:  # gloo's own rendezvous timed out or a peer's socket failed
                raise TransportError(f"gloo could not connect the group at epoch {self.epoch} formation "
                                     f"{self.formation}: {str(err).splitlines()[0]}") from err
        from weightsync.runtime.nccl import NcclCommunicator
        return NcclCommunicator(bytes.fromhex(nccl_id), self.rank, self.world_size, self.device,
                                self.checker("NCCL communicator set-up", deadline), self.settings.nccl)

    # ---------------------------------------------------------------------------------------- rounds
    def trainer_round(self, version: int, deadline: float) -> TrainerRound:
        assert self.keys is not None
        seq, self.seq = self.seq, self.seq + 1
        return TrainerRound(self.keys, self.fkeys, seq, f"v{version}", deadline, self.checker(f"sync v{version}"),
                            self.checker(f"sync v{version}", deadline), self.describe, self._silence, self.timeout)

    def receiver_round(self, seq: int, version: int, deadline: float) -> ReceiverRound:
        """A receiver's waits on the trainer end a moment after the trainer's own deadline: when some member
        is missing, the trainer names it in an abort, which beats a receiver's guess that the trainer is."""
        assert self.keys is not None
        deadline += min(2.0, self.timeout / 2)
        self.seq = seq + 1
        sync = ReceiverRound(self.keys, self.fkeys, seq, f"v{version}", deadline, self.checker(f"sync v{version}"),
                             self.checker(f"sync v{version}", deadline), self.describe, self._silence,
                             self.timeout)
        sync.rank = self.rank
        return sync

    def _silence(self, rank: int) -> str:
        return self.liveness.silence(rank) if self.liveness is not None else "no liveness information"

    # ---------------------------------------------------------------------------------------- checks
    def checker(self, what: str, deadline: float | None = None) -> Check:
        """A check for waits: raises if a peer is lost, another member aborted, the group moved on, or the
        deadline passed."""

        def check() -> None:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise self._timed_out(what)
            if now - self._last_check < _CHECK_EVERY:
                return
            self._last_check = now
            keys, liveness = self.keys, self.liveness
            assert keys is not None and liveness is not None
            abort = self._read(keys, self.fkeys.abort)
            if abort is not None:
                self.saw_abort()
                raise PeerLostError(self._abort_message(abort, what), ranks=tuple(abort.get("ranks", ())))
            if not self.is_trainer:
                record = self._read(keys, FORMATION)
                if record is not None and int(record["formation"]) != self.formation:
                    after = record.get("after") or {}
                    cause = f" after: {self._abort_message(after, what)}" if after else ""
                    raise PeerLostError(f"{what} was abandoned: the trainer re-formed the group (formation "
                                        f"{record['formation']}){cause}",
                                        ranks=tuple(int(r) for r in after.get("ranks", ())), reformed=True)
            liveness.raise_if_lost(range(self.world_size) if self.is_trainer else [TRAINER_RANK], what,
                                   self.describe)

        return check

    def _timed_out(self, what: str) -> PeerLostError:
        """A deadline passed with every member alive and beating: name whom this member was waiting on."""
        waited_on = tuple(range(1, self.world_size)) if self.is_trainer else (TRAINER_RANK,)
        return PeerLostError(f"{what} at epoch {self.epoch} timed out after {self.timeout:.0f}s waiting for "
                             f"{self._describe_many(list(waited_on)) if self.is_trainer else self.describe(0)}",
                             ranks=waited_on)

    def saw_abort(self) -> None:
        """Tell a trainer that is about to exit that this member learnt why the group broke."""
        if self.keys is not None and not self.is_trainer:
            with contextlib.suppress(WeightSyncError):
                self.keys.put(self.fkeys.seen(self.rank), {"rank": self.rank})

    def _linger_for_abort_readers(self) -> None:
        """The trainer hosts the store: before it goes (its process is exiting after a failure), keep the store
        up, briefly, until every member still connected has read the abort, so that they learn who failed
        and why instead of only seeing the store vanish."""
        if not self.is_trainer or self.broken is None or self.keys is None or self._client is None:
            return
        fkeys = FormationKeys(self.broken[1])
        receivers = [r for r in range(1, self.world_size)]
        give_up = time.monotonic() + min(3.0, self.timeout)
        with contextlib.suppress(WeightSyncError):
            while time.monotonic() < give_up:
                if self.keys.get(fkeys.abort) is None:
                    return
                flags = self.keys.has([alive_key(r) for r in receivers] + [fkeys.seen(r) for r in receivers])
                alive, seen = flags[:len(receivers)], flags[len(receivers):]
                if all(s or not a for a, s in zip(alive, seen, strict=True)):
                    return
                time.sleep(0.02)

    def _abort_message(self, abort: dict[str, Any], what: str) -> str:
        by = int(abort.get("by", -1))
        blamed = [int(r) for r in abort.get("ranks", ())]
        text = f"{what} aborted by {self.describe(by)}: {abort.get('reason', '')}"
        if self.rank in blamed and by != self.rank:
            text += " (this member was declared lost: it stopped or stalled past the threshold)"
        return text

    def name_the_lost(self, err: BaseException, what: str) -> BaseException:
        """Turn a transport error (a gloo socket reset, a collective timing out) into a PeerLostError naming
        whoever is at fault: a member that is lost, or the cause another member posted in its abort. A
        communicator's own timeout can end this member's wait a moment before the member that knows the
        cause (the trainer, finding one of its own ranks stalled) has said so: it is given that moment."""
        if (isinstance(err, WeightSyncError) and not isinstance(err, TransportError)) or self.liveness is None:
            return err
        posted = self.checker(what)
        give_up = time.monotonic() + max(2.0, min(5.0, self.timeout / 2))
        while time.monotonic() < give_up:
            try:
                if self.keys is not None:
                    posted()  # another member's abort, the group re-formed, the trainer lost
                lost = self.liveness.lost(range(self.world_size))
            except PeerLostError as named:
                named.args = (f"{named.args[0]} (here: {err})", *named.args[1:])
                return named
            except WeightSyncError as store_err:
                return store_err
            gone = [r for r, why in lost if "connection" in why] or [r for r, _ in lost]
            if gone:
                return PeerLostError(f"{self._describe_many(gone)} died during {what} at epoch {self.epoch} "
                                     f"({err})", ranks=tuple(gone))
            time.sleep(0.05)
        return err

    # --------------------------------------------------------------------------------------- failure
    def _fail(self, err: BaseException) -> None:
        """Mark this formation broken, tell the others, and (the trainer) announce the next formation."""
        if self.epoch is not None:
            self.broken = (self.epoch, self.formation)
        store_gone = isinstance(err, StoreUnreachable) or getattr(err, "store_lost", False)
        if self.keys is not None and not getattr(err, "reformed", False):  # (that one is known to all)
            ranks = list(getattr(err, "ranks", ()) or getattr(err, "missing_ranks", ()))
            reason = ("it is shutting down" if isinstance(err, (SystemExit, KeyboardInterrupt))
                      else str(err) or type(err).__name__)
            # Unknown culprit: say so (an empty list) rather than blame this member.
            self._abort_pending = (self.keys.prefix, self.fkeys.abort, {
                "by": self.rank, "reason": reason, "ranks": ranks,
                "leaving": isinstance(err, (SystemExit, KeyboardInterrupt))})
            abort = None if store_gone else self._post_pending_abort()  # a store not answering is told later
            if self.is_trainer and not store_gone:
                with contextlib.suppress(WeightSyncError):  # members that missed the abort learn why here
                    self.keys.put(FORMATION, {"formation": self.formation + 1, "open": False, "after": abort})
        if store_gone:
            self._drop_connections()  # connect afresh next time (the trainer restarts its store if it died)
        if self.comm is not None:
            self.comm.abort()
        self._teardown_formation()

    def _post_pending_abort(self) -> dict[str, Any] | None:
        """Post this member's abort into the formation it failed in, unless another member's is there. Best
        effort: a store that is gone or stopped is told later, when it answers again (on the connection of
        the moment). Returns the abort the store holds, if known."""
        if self._abort_pending is None or self._client is None:
            return None
        prefix, key, abort = self._abort_pending
        keys = KeyStore(self._client, self._sealer, prefix)
        try:
            there = self._read(keys, key)
            if there is None:
                keys.put(key, abort)
            self._abort_pending = None
            return dict(there) if there is not None else abort
        except WeightSyncError:
            return abort

    def run_guarded(self, what: str, body: Callable[[], Any],
                    passthrough: tuple[type[BaseException], ...] = ()) -> Any:
        """Run one sync's body; any failure breaks the formation and names the lost.

        A config mismatch and the `passthrough` exceptions leave the group as it is."""
        try:
            return body()
        except (KeyboardInterrupt, SystemExit) as err:
            self._fail(err)  # the process is leaving (a pod's SIGTERM): tell the others, then let it go
            raise
        except BaseException as err:
            if isinstance(err, (ConfigMismatchError, *passthrough)):
                raise
            named = self.name_the_lost(err, what)
            self._fail(named)
            if named is err:
                raise
            raise named from err

    def leave_formation(self) -> None:
        """Stop taking part in the current formation (it moved on, or broke while this member was idle)."""
        self._teardown_formation()

    def _teardown_formation(self) -> None:
        """The communicator goes; the heartbeat stays (the member is alive), until the epoch changes."""
        if self.comm is not None:
            self.comm.close()
        self.comm = None

    def close(self) -> None:
        self._linger_for_abort_readers()
        self._teardown_formation()
        if self.liveness is not None:
            self.liveness.stop()
            self.liveness = None
        self._drop_connections()
        if self._server is not None:
            self._server.close()
            self._server = None


class GroupMember:
    """What the sender and the receiver share: one group, its packing buffers, and leaving both."""

    group: SyncGroup
    buffers: Buffers

    def close(self) -> None:
        """Leave the group and free the packing buffers."""
        self.group.close()
        self.buffers = Buffers()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
