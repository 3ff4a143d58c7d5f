"""The sync group of one member: rendezvous, communicator, epochs and the per-sync handshakes.

A group lives for one epoch. The operator bumps the epoch (a pod annotation, projected into a file) when a
member fails or the membership changes; members notice the change at their next send or receive and form
the group again at the new epoch, under a fresh key prefix, without restarting the process.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any, Self

import torch
import torch.distributed as dist
from weightsync.runtime.comm import Check, Communicator, GlooCommunicator
from weightsync.runtime.errors import (
    ConfigMismatchError,
    PeerLostError,
    RendezvousError,
    WeightSyncError,
)
from weightsync.runtime.manifest import TransferConfig
from weightsync.runtime.rendezvous import BellWaiter, KeyStore, Liveness, connect_store, key_prefix
from weightsync.runtime.transfer import Buffers

from weightsync.contract import TRAINER_RANK, MemberEnv

log = logging.getLogger("weightsync.runtime")

_CHECK_EVERY = 0.1  # seconds between liveness look-ups while a wait polls


class SyncGroup:
    def __init__(self, env: MemberEnv, local_rank: int = 0, device: torch.device | str | None = None,
                 heartbeat_interval: float = 0.5, dead_after: float | None = None) -> None:
        if not 0 <= local_rank < env.local_world_size:
            raise ValueError(f"local_rank {local_rank} is outside this pod's "
                             f"WEIGHTSYNC_LOCAL_WORLD_SIZE={env.local_world_size}")
        if env.protocol != "weightsync":
            raise ValueError(f"WEIGHTSYNC_PROTOCOL={env.protocol!r} is not implemented by this runtime yet; "
                             "use 'weightsync'")
        self.env = env
        self.rank = env.rank_offset + local_rank
        self.local_rank = local_rank
        self.is_trainer = self.rank == TRAINER_RANK
        self.timeout = env.timeout_seconds
        self.heartbeat_interval = heartbeat_interval
        self.dead_after = dead_after if dead_after is not None else min(max(10 * heartbeat_interval, 3.0),
                                                                         env.timeout_seconds)
        self.transfer = TransferConfig(env.protocol, env.packed, env.buffer_bytes, env.num_buffers, env.checksums)
        self.device = self._pick_device(device)
        self.epoch: int | None = None
        self.world_size = env.world_size  # as published by the operator at the current epoch
        self.broken_epoch: int | None = None
        self.comm: Communicator | None = None
        self.keys: KeyStore | None = None
        self.liveness: Liveness | None = None
        self.bell: BellWaiter | None = None  # receivers: the idle wait for the next sync
        self.members: dict[int, dict[str, Any]] = {}
        self.seq = 0
        self._host_store: dist.TCPStore | None = None
        self._last_check = 0.0

    # ----------------------------------------------------------------------------------------- set-up
    def _pick_device(self, device: torch.device | str | None) -> torch.device:
        if device is not None:
            return torch.device(device)
        if self.env.backend == "gloo":
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise WeightSyncError("WEIGHTSYNC_BACKEND=nccl needs a CUDA GPU and none is visible; "
                              "use the gloo backend on CPU")
        return torch.device("cuda", self.local_rank % torch.cuda.device_count())

    def describe(self, rank: int) -> str:
        info = self.members.get(rank, {})
        if rank == TRAINER_RANK:
            where = "trainer"
        else:
            lws = int(info.get("local_world_size", self.env.local_world_size if not self.is_trainer else 1))
            where = f"inference replica {(rank - 1) // lws} worker {(rank - 1) % lws}"
        pod = info.get("pod")
        return f"rank {rank} ({where}{', pod ' + pod if pod else ''})"

    def _describe_many(self, ranks: tuple[int, ...] | list[int]) -> str:
        return ", ".join(self.describe(r) for r in ranks)

    def current_epoch(self) -> int:
        return self.env.current_epoch()

    # ------------------------------------------------------------------------------------- formation
    def ensure_formed(self) -> None:
        """Form the group at the current epoch, or re-form it when the epoch moved on."""
        epoch = self.current_epoch()
        if self.comm is not None and epoch == self.epoch:
            return
        if self.comm is not None:
            log.info("epoch %s -> %s: re-forming the sync group", self.epoch, epoch)
            self.teardown()
        if self.broken_epoch is not None and epoch <= self.broken_epoch:
            self._wait_for_new_epoch()
        epoch, self.world_size = self.env.membership()
        if self.rank >= self.world_size:
            raise WeightSyncError(f"rank {self.rank} is outside the group of world size {self.world_size} at epoch "
                                  f"{epoch}: this pod was scaled away and should be gone soon")
        self._form(epoch)

    def _wait_for_new_epoch(self) -> None:
        assert self.broken_epoch is not None
        deadline = time.monotonic() + self.timeout
        while self.current_epoch() <= self.broken_epoch:
            if time.monotonic() >= deadline:
                raise WeightSyncError(
                    f"the sync group broke at epoch {self.broken_epoch} and no new epoch arrived within "
                    f"{self.timeout:.0f}s (the operator bumps it in {self.env.annotations_file})")
            time.sleep(0.1)

    def _form(self, epoch: int) -> None:
        env = self.env
        started = time.monotonic()
        deadline = started + self.timeout
        prefix = key_prefix(env.token, epoch, f"{env.namespace}/{env.name}")
        if self.is_trainer:
            if self._host_store is None:
                self._host_store = connect_store(env.master_addr, env.master_port, True, self.timeout)
            store: dist.TCPStore = self._host_store
            beat_store = connect_store("127.0.0.1", env.master_port, False, self.timeout)
        else:
            store = connect_store(env.master_addr, env.master_port, False, self.timeout)
            beat_store = connect_store(env.master_addr, env.master_port, False, self.timeout)
            self.bell = BellWaiter(connect_store(env.master_addr, env.master_port, False, self.timeout), store)
        self.keys = keys = KeyStore(store, prefix)
        self.liveness = Liveness(KeyStore(beat_store, prefix), self.rank, self.world_size,
                                 self.heartbeat_interval, self.dead_after)
        self.liveness.start()
        self.epoch, self.seq, self.members = epoch, 0, {}
        me = {"rank": self.rank, "pod": socket.gethostname(), "pid": os.getpid(),
              "local_world_size": env.local_world_size, "world_size": self.world_size}
        keys.put(f"join/{self.rank}", me)
        self.members[self.rank] = me
        try:
            if self.is_trainer:
                others = [f"join/{r}" for r in range(1, self.world_size)]
                try:
                    keys.wait_for(others, deadline, on_poll=lambda: None)
                except TimeoutError:
                    missing = tuple(r for r in range(1, self.world_size) if not keys.has(f"join/{r}"))
                    raise RendezvousError(
                        f"{len(missing)} of {self.world_size - 1} members never arrived within "
                        f"{self.timeout:.0f}s at epoch {epoch}: {self._describe_many(missing)}",
                        missing_ranks=missing) from None
                for r in range(1, self.world_size):
                    self.members[r] = keys.get(f"join/{r}")
                sizes = {r: m["world_size"] for r, m in self.members.items() if m["world_size"] != self.world_size}
                nccl_id = ""
                if env.backend == "nccl":
                    from weightsync.runtime.nccl import new_unique_id
                    nccl_id = new_unique_id().hex()
                keys.put("group", {"world_size": self.world_size, "backend": env.backend, "nccl_id": nccl_id,
                                   "epoch": epoch, "members": {str(r): m for r, m in self.members.items()},
                                   "errors": [f"{self.describe(r)} has WEIGHTSYNC_WORLD_SIZE={s}, the trainer "
                                              f"{self.world_size}" for r, s in sizes.items()]})
                if sizes:
                    raise ConfigMismatchError("; ".join(keys.get("group")["errors"]))
            else:
                # The trainer knows who is missing and says so through the store: give it a moment
                # past the common deadline before concluding that it is the trainer that failed.
                grace = self.dead_after + 2 * self.heartbeat_interval
                try:
                    keys.wait_for(["group"], deadline + grace,
                                  on_poll=self._check_peers(None, "rendezvous", ranks=(TRAINER_RANK,)))
                except TimeoutError:
                    raise RendezvousError(
                        f"{self.describe(TRAINER_RANK)} did not form the group within {self.timeout:.0f}s at "
                        f"epoch {epoch}; some other member is missing or the trainer is stuck",
                        missing_ranks=(TRAINER_RANK,)) from None
                group = keys.get("group")
                self.members.update({int(r): m for r, m in group["members"].items()})
                if group["errors"]:
                    raise ConfigMismatchError("; ".join(group["errors"]))
                nccl_id = group["nccl_id"]
            self.comm = self._make_comm(nccl_id, deadline)
        except BaseException as err:
            self._fail(err)
            raise
        log.info("rank %d joined the sync group at epoch %d (world size %d, %s) in %.2fs", self.rank, epoch,
                 self.world_size, self.comm.transport, time.monotonic() - started)

    def _make_comm(self, nccl_id: str, deadline: float) -> Communicator:
        assert self.keys is not None
        if self.env.backend == "gloo":
            store = dist.PrefixStore("gloo/", self.keys.store)
            return GlooCommunicator(store, self.rank, self.world_size, self.timeout)
        from weightsync.runtime.nccl import NcclCommunicator
        return NcclCommunicator(bytes.fromhex(nccl_id), self.rank, self.world_size, self.device,
                                self._check_peers(deadline, "NCCL communicator set-up"))

    # ---------------------------------------------------------------------------------------- checks
    def _check_peers(self, deadline: float | None, what: str,
                     ranks: tuple[int, ...] | None = None) -> Check:
        """A check for waits: raises if a peer died, another member aborted, or the deadline passed."""

        def check() -> None:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise WeightSyncError(f"{what} at epoch {self.epoch} timed out after {self.timeout:.0f}s")
            if now - self._last_check < _CHECK_EVERY:
                return
            self._last_check = now
            assert self.liveness is not None and self.keys is not None
            self.liveness.raise_if_dead(what, self.describe, ranks)
            if self.keys.has("abort"):
                abort = self.keys.get("abort")
                self.keys.add("abort/seen", 1)
                raise PeerLostError(f"{what} aborted by {self.describe(abort['by'])}: {abort['reason']}",
                                    ranks=tuple(abort["ranks"]))

        return check

    def checker(self, what: str, deadline: float | None = None) -> Check:
        return self._check_peers(deadline, what)

    def name_the_dead(self, err: BaseException, what: str) -> BaseException:
        """Turn a transport error into a PeerLostError naming the member(s) whose heartbeat stopped."""
        if isinstance(err, PeerLostError) or self.liveness is None:
            return err
        give_up = time.monotonic() + self.dead_after + 2 * self.heartbeat_interval
        while time.monotonic() < give_up:
            dead = self.liveness.dead_ranks()
            if dead:
                return PeerLostError(f"{self._describe_many(dead)} died during {what} at epoch {self.epoch} "
                                     f"({err})", ranks=dead)
            time.sleep(self.heartbeat_interval / 2)
        return err

    # ------------------------------------------------------------------------------------- handshakes
    def put(self, key: str, value: Any) -> None:
        assert self.keys is not None
        self.keys.put(key, value)

    def wait_all(self, keys: list[str], deadline: float | None, what: str) -> None:
        assert self.keys is not None
        try:
            self.keys.wait_for(keys, deadline if deadline is not None else float("inf"),
                               on_poll=self._check_peers(deadline, what))
        except TimeoutError:
            missing = [k for k in keys if not self.keys.has(k)]
            ranks = tuple(int(k.rsplit("/", 1)[1]) for k in missing)
            raise PeerLostError(f"{self._describe_many(ranks)} did not answer {what} within "
                                f"{self.timeout:.0f}s", ranks=ranks) from None

    @staticmethod
    def bell_key(seq: int, rank: int) -> str:
        """Rung by the trainer once sync `seq`'s manifest is out: what an idle receiver waits for."""
        return f"sync/{seq}/bell/{rank}"

    def put_raw(self, key: str, value: bytes) -> None:
        assert self.keys is not None
        self.keys.put_raw(key, value)

    def get(self, key: str) -> Any:
        assert self.keys is not None
        return self.keys.get(key)

    def _fail(self, err: BaseException) -> None:
        """Mark the group broken, tell the others (best effort) and release the communicator."""
        if self.epoch is not None:
            self.broken_epoch = self.epoch
        if self.keys is not None and not isinstance(err, ConfigMismatchError):
            ranks = list(getattr(err, "ranks", ()) or getattr(err, "missing_ranks", ()))
            try:
                if not self.keys.has("abort"):
                    reason = ("it is shutting down" if isinstance(err, (SystemExit, KeyboardInterrupt))
                              else str(err) or type(err).__name__)
                    self.put("abort", {"by": self.rank, "reason": reason, "ranks": ranks or [self.rank]})
                    if self.is_trainer:
                        self._linger_for_abort_readers(ranks)
            except Exception:
                pass  # the store's host is gone; the others find out by themselves
        if self.comm is not None:
            self.comm.abort()
        self.teardown()

    def _linger_for_abort_readers(self, culprits: list[int]) -> None:
        """The trainer hosts the store: keep it up (briefly, bounded) until the live members read the abort,
        so that they learn who failed instead of only seeing the store vanish when the trainer exits."""
        assert self.keys is not None
        readers = [r for r in range(1, self.world_size) if r not in culprits and self.keys.has(f"join/{r}")]
        deadline = time.monotonic() + self.dead_after + 2 * self.heartbeat_interval
        while self.keys.add("abort/seen", 0) < len(readers) and time.monotonic() < deadline:
            time.sleep(0.02)

    def run_guarded(self, what: str, body: Callable[[], Any],
                    passthrough: tuple[type[BaseException], ...] = ()) -> Any:
        """Run one sync's body; any failure breaks the group (until the next epoch) and names the dead.

        A config mismatch and the `passthrough` exceptions leave the group as it is."""
        try:
            return body()
        except (KeyboardInterrupt, SystemExit) as err:
            self._fail(err)  # the process is leaving (a pod's SIGTERM): tell the others, then let it go
            raise
        except BaseException as err:
            if isinstance(err, (ConfigMismatchError, *passthrough)):
                raise
            named = self.name_the_dead(err, what)
            self._fail(named)
            if named is err:
                raise
            raise named from err

    def teardown(self) -> None:
        if self.bell is not None:
            self.bell.release()
            self.bell = None
        if self.liveness is not None:
            self.liveness.stop()
        if self.comm is not None:
            self.comm.close()
        self.comm, self.keys, self.liveness = None, None, None

    def close(self) -> None:
        self.teardown()
        self._host_store = None


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
