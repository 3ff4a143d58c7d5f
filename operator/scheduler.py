"""Runs reconciles: one at a time per object, coalescing triggers, with delayed re-triggers and a resync.

Pure asyncio (no kopf, no client): the blocking reconcile runs in a worker thread via asyncio.to_thread,
so the event loop (kopf's watches and liveness probe) never stalls.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("weightsync.operator.scheduler")

Key = tuple[str, str]  # (namespace, name)
#: First delay before retrying a reconcile that raised or whose children the API server refused; it doubles
#: with each consecutive failure of that object, up to MAX_RETRY_SECONDS.
ERROR_RETRY_SECONDS = 5.0
MAX_RETRY_SECONDS = 300.0


class RetryBackoff:
    """Consecutive failures per key -> the delay before the next retry (5 s, 10 s, 20 s ... 300 s)."""

    def __init__(self, first: float = ERROR_RETRY_SECONDS, cap: float = MAX_RETRY_SECONDS) -> None:
        self.first = first
        self.cap = cap
        self.failures: dict[Key, int] = {}

    def failed(self, key: Key) -> float:
        n = self.failures[key] = self.failures.get(key, 0) + 1
        return float(min(self.cap, self.first * 2 ** min(n - 1, 32)))

    def succeeded(self, key: Key) -> None:
        self.failures.pop(key, None)

    def count(self, key: Key) -> int:
        return self.failures.get(key, 0)


class Scheduler:
    """Serializes and coalesces reconciles per key.

    `reconcile(key)` is blocking and returns the seconds after which to run again (or None). While a
    reconcile of a key runs, further triggers of that key collapse into one re-run after it.
    """

    def __init__(self, reconcile: Callable[[Key], float | None]) -> None:
        self._reconcile = reconcile
        self._running: dict[Key, bool] = {}  # key -> triggered again while running
        self._timers: dict[Key, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.known: set[Key] = set()
        self.paused = False
        self.backoff = RetryBackoff()

    async def trigger(self, key: Key) -> None:
        self.known.add(key)
        if key in self._running:
            self._running[key] = True
            return
        self._running[key] = False
        try:
            while True:
                try:
                    delay = await asyncio.to_thread(self._reconcile, key)
                except Exception as err:
                    delay = self.backoff.failed(key)
                    if self.backoff.count(key) == 1:
                        log.exception("reconcile of %s/%s failed; retrying in %ss", *key, delay)
                    else:  # the traceback was logged once; the same failure again is one line
                        log.warning("reconcile of %s/%s failed again (%d in a row): %s; retrying in %ss", *key,
                                    self.backoff.count(key), err, delay)
                if delay is not None:
                    self.later(key, delay)
                if not self._running[key]:
                    break
                self._running[key] = False
        finally:
            del self._running[key]

    def later(self, key: Key, delay: float) -> None:
        """Trigger `key` after `delay` seconds (the earlier of this and any pending delayed trigger)."""
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        pending = self._timers.get(key)
        if pending is not None and not pending.cancelled() and pending.when() <= when:
            return
        if pending is not None:
            pending.cancel()
        self._timers[key] = loop.call_at(when, self._fire, key)

    def _fire(self, key: Key) -> None:
        self._timers.pop(key, None)
        if self.paused or key not in self.known:
            return
        task = asyncio.get_running_loop().create_task(self.trigger(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def poke(self, key: Key) -> None:
        """Trigger `key` now, from the event loop (a child of it changed); nothing while paused."""
        if self.paused:
            return
        task = asyncio.get_running_loop().create_task(self.trigger(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def forget(self, key: Key) -> None:
        self.known.discard(key)
        self.backoff.succeeded(key)
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    async def resync(self, every: float) -> None:
        """Re-trigger every known object every `every` seconds (drift of unwatched children, lost events)."""
        while True:
            await asyncio.sleep(every)
            if self.paused:
                continue
            for key in sorted(self.known):
                await self.trigger(key)
