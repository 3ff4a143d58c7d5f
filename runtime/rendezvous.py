"""Rendezvous through a TCPStore that the trainer hosts, independent of any torch.distributed group.

Keys live under a prefix derived from the group's secret token and the epoch, so a stale member of an
older epoch or of another group cannot collide with this one. Values are JSON or plain integers: nothing
read from the store is ever unpickled. Every wait is bounded, and liveness is tracked with heartbeat
counters so that a member that died is named instead of being waited for.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from weightsync.runtime.errors import PeerLostError, RendezvousError

from weightsync.contract import TRAINER_RANK

log = logging.getLogger("weightsync.runtime")

_POLL_SECONDS = 0.05


def key_prefix(token: str, epoch: int, name: str = "") -> str:
    digest = hashlib.sha256(f"{name}\0{token}\0{epoch}".encode()).hexdigest()[:20]
    return f"weightsync/{digest}/"


def connect_store(host: str, port: int, is_host: bool, timeout: float) -> dist.TCPStore:
    """Host the store (the trainer) or connect to it, retrying until `timeout`.

    A resolvable DNS name is not yet a listening port: the trainer pod may still be starting, so joiners
    keep retrying until their deadline and then name the address they could not reach.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        remaining = deadline - time.monotonic()
        try:
            return dist.TCPStore(
                # Short attempts, so that the last one cannot overrun the deadline by much.
                host, port, is_master=is_host, timeout=timedelta(seconds=min(max(remaining, 0.5), 2.0)),
                wait_for_workers=False, use_libuv=True,
            )
        except (RuntimeError, OSError, ValueError) as err:  # refused, unresolvable, timed out
            if is_host:
                raise RendezvousError(f"cannot host the rendezvous store on port {port}: {err}") from err
            last_error = err
        if time.monotonic() >= deadline:
            raise RendezvousError(
                f"rank 0 (the trainer) is unreachable: no rendezvous store at {host}:{port} "
                f"after {timeout:.0f}s ({last_error})",
                missing_ranks=(TRAINER_RANK,),
            )
        time.sleep(min(0.5, max(deadline - time.monotonic(), 0.0)))


def _reaching_trainer(call: Callable[[], Any]) -> Any:
    """Run a store operation; a store that stops answering means its host, the trainer, is gone."""
    try:
        return call()
    except (RuntimeError, OSError) as err:  # c10d's DistNetworkError and friends
        raise PeerLostError(f"rank {TRAINER_RANK} (trainer) is unreachable: the rendezvous store it hosts "
                            f"stopped answering ({str(err).splitlines()[0]})", ranks=(TRAINER_RANK,)) from err


class KeyStore:
    """A prefixed view of the store with JSON values and bounded waits."""

    def __init__(self, store: dist.Store, prefix: str) -> None:
        self.raw = store
        self.store = dist.PrefixStore(prefix, store)
        self.prefix = prefix

    def put(self, key: str, value: Any) -> None:
        _reaching_trainer(lambda: self.store.set(key, json.dumps(value)))

    def put_raw(self, key: str, value: bytes) -> None:
        _reaching_trainer(lambda: self.store.set(key, value.decode()))

    def get(self, key: str) -> Any:
        return json.loads(_reaching_trainer(lambda: self.store.get(key)))

    def get_raw(self, key: str) -> bytes:
        return bytes(_reaching_trainer(lambda: self.store.get(key)))

    def has(self, key: str) -> bool:
        return bool(_reaching_trainer(lambda: self.store.check([key])))

    def add(self, key: str, amount: int) -> int:
        return int(_reaching_trainer(lambda: self.store.add(key, amount)))

    def full_name(self, key: str) -> str:
        """The key as the unprefixed store sees it (c10d's PrefixStore joins with a slash)."""
        return f"{self.prefix}/{key}"

    def put_many(self, keys: list[str], value: Any) -> None:
        """The same value under every key, in one round trip."""
        encoded = json.dumps(value)
        _reaching_trainer(lambda: self.store.multi_set(keys, [encoded] * len(keys)))  # type: ignore[attr-defined]

    def wait_for(self, keys: list[str], deadline: float, on_poll: Callable[[], None]) -> None:
        """Wait until every key exists; `on_poll` runs between waits and may raise.

        For waits inside a sync, where the keys are due within milliseconds: they block in the store (woken
        the moment the keys appear) in slices of at most a second, checking liveness in between. An idle
        wait of unknown length (a receiver waiting for the next sync) uses a `BellWaiter` instead.
        """
        pending = list(keys)
        while pending:
            pending = [k for k in pending if not self.has(k)]
            if not pending:
                return
            on_poll()
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(", ".join(pending))
            # A slice that runs out, or a store that is gone, raises here: the next has() tells which.
            with contextlib.suppress(RuntimeError, OSError):
                self.store.wait(pending, timedelta(seconds=max(min(deadline - now, 1.0), 0.01)))


class BellWaiter:
    """Waits for one key on a store connection and a thread of its own, with no time-out at all.

    An idle receiver may wait minutes for the next sync, yet should start within a fraction of a
    millisecond of it. Polling is either slow or busy, and blocking store waits in bounded slices log a
    c10d warning for every slice that runs out. So the blocking wait runs on a dedicated connection in a
    thread, while the caller checks liveness between short waits on an event. A wait that is given up
    (the epoch moved on, the group closes) is released by ringing its key from the caller's connection;
    a wait cut short by the caller's own time-out stays pending and is resumed by the next wait for the
    same key.
    """

    def __init__(self, store: dist.Store, ring: dist.Store) -> None:
        self._store = store  # dedicated to the waiting thread
        self._ring = ring  # the caller's connection, to release a wait given up
        self._key: str | None = None
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._error: BaseException | None = None

    def wait(self, key: str, deadline: float, on_poll: Callable[[], None]) -> None:
        """Return once `key` (a full key name, prefix included) exists; `on_poll` runs every few ms."""
        if self._key != key:
            self.release()
            self._key, self._error = key, None
            self._done.clear()
            self._thread = threading.Thread(target=self._run, args=(key,), name="weightsync-bell", daemon=True)
            self._thread.start()
        while not self._done.wait(min(_POLL_SECONDS, max(deadline - time.monotonic(), 0.0))):
            on_poll()
            if time.monotonic() >= deadline:
                raise TimeoutError(key)
        self._key = None
        error = self._error
        if error is not None:
            _reaching_trainer(lambda: _reraise(error))

    def _run(self, key: str) -> None:
        try:
            self._store.wait([key], timedelta(days=365))
        except BaseException as err:  # the store's host is gone: the caller names it
            self._error = err
        self._done.set()

    def release(self) -> None:
        """Ring a pending wait's key so its thread ends (best effort: a store that is gone ends it too)."""
        if self._key is None or self._thread is None:
            return
        with contextlib.suppress(Exception):
            self._ring.set(self._key, "released")
        self._thread.join(timeout=1.0)
        self._key = None


def _reraise(err: BaseException) -> None:
    raise err


@dataclass
class Liveness:
    """Heartbeats: every member bumps its counter; a counter that stops moving marks a dead member.

    Heartbeats use a store connection of their own, so a long blocking wait on the main connection never
    delays them, and a store that stops answering (the trainer hosts it) marks rank 0 as dead.
    """

    store: KeyStore
    rank: int
    world_size: int
    interval: float
    dead_after: float
    _seen: dict[int, tuple[int, float]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _store_failed_at: float | None = None

    def start(self) -> None:
        self._beat()
        self._thread = threading.Thread(target=self._run, name=f"weightsync-heartbeat-{self.rank}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval + 1)

    def _beat(self) -> None:
        self.store.add(f"hb/{self.rank}", 1)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
                self._store_failed_at = None
            except Exception:  # the store's host is gone: dead_ranks() reports rank 0
                if self._store_failed_at is None:
                    self._store_failed_at = time.monotonic()

    def dead_ranks(self, ranks: Iterable[int] | None = None) -> tuple[int, ...]:
        """Members whose heartbeat has not moved for `dead_after` seconds."""
        now = time.monotonic()
        if self._store_failed_at is not None and now - self._store_failed_at >= min(self.dead_after, 1.0):
            return (TRAINER_RANK,)
        dead = []
        for r in range(self.world_size) if ranks is None else ranks:
            if r == self.rank:
                continue
            try:
                count = self.store.add(f"hb/{r}", 0)
            except Exception:
                return (TRAINER_RANK,)
            last = self._seen.get(r)
            if last is None or last[0] != count:
                self._seen[r] = (count, now)
            elif now - last[1] >= self.dead_after:
                dead.append(r)
        return tuple(dead)

    def raise_if_dead(self, what: str, describe: Callable[[int], str], ranks: Iterable[int] | None = None) -> None:
        dead = self.dead_ranks(ranks)
        if dead and self._store_failed_at is not None:
            raise PeerLostError(f"{describe(TRAINER_RANK)} is unreachable during {what}: the rendezvous store "
                                "it hosts stopped answering", ranks=(TRAINER_RANK,))
        if dead:
            names = ", ".join(describe(r) for r in dead)
            raise PeerLostError(f"{names} stopped responding during {what} "
                                f"(no heartbeat for {self.dead_after:.1f}s)", ranks=dead)
