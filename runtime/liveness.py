"""Who is still there: a member that died, and a member that stopped answering, told apart and named.

Two signals per member, both written on a store connection of its own (so a long wait on the main
connection never delays them):
- `alive/<rank>`, an ephemeral key the store deletes the moment the member's connection closes: a process
  that exits or is killed is known to be gone at once;
- `beat/<rank>`, a sealed counter rewritten every `interval`: a process that is stopped (SIGSTOP), wedged or
  cut off from the network keeps its connection but stops counting, and is declared stalled after
  `dead_after` seconds, a threshold that follows the configured timeout.

An observer that was itself not running (stopped, or starved) for a while cannot tell whether the others
stalled: it restarts its clocks instead of blaming them.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from weightsync.runtime.errors import PeerLostError, WeightSyncError
from weightsync.runtime.handshake import Describe, alive_key, beat_key
from weightsync.runtime.keystore import KeyStore


@dataclass
class Liveness:
    beats: KeyStore  # on the member's own heartbeat connection
    looks: KeyStore  # on the main connection, for reading the others
    rank: int
    interval: float
    dead_after: float
    epoch: int
    _count: int = 0
    _seen: dict[int, tuple[int, float]] = field(default_factory=dict)
    _last_look: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self.beats.put_ephemeral(alive_key(self.rank), {"rank": self.rank})
        self._beat()
        self._thread = threading.Thread(target=self._run, name=f"weightsync-heartbeat-{self.rank}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval + 1)

    def _beat(self) -> None:
        self._count += 1
        self.beats.put(beat_key(self.rank), {"n": self._count})

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(WeightSyncError):  # the store's host is gone: the main thread names it
                self._beat()

    def lost(self, ranks: Sequence[int]) -> list[tuple[int, str]]:
        """Members among `ranks` that are gone or stalled, each with the reason."""
        others = [r for r in ranks if r != self.rank]
        if not others:
            return []
        values = self.looks.get_many([alive_key(r) for r in others] + [beat_key(r) for r in others])
        alive, beats = values[:len(others)], values[len(others):]
        now = time.monotonic()
        if now - self._last_look > max(self.dead_after / 2, 4 * self.interval):
            self._seen.clear()  # this observer was away: its clocks say nothing about the others
        self._last_look = now
        out = []
        for r, there, beat in zip(others, alive, beats, strict=True):
            count = int(beat["n"]) if isinstance(beat, dict) else -1
            if there is None:
                out.append((r, "its connection to the rendezvous store closed (the process exited)"))
                continue
            last = self._seen.get(r)
            if last is None or last[0] != count:
                self._seen[r] = (count, now)
            elif now - last[1] >= self.dead_after:
                out.append((r, f"no heartbeat for {now - last[1]:.1f}s (stopped, wedged or cut off; "
                               f"the threshold follows the timeout: {self.dead_after:.0f}s)"))
        return out

    def quiet_for(self, rank: int) -> float | None:
        """Seconds since `rank`'s heartbeat last moved, as this observer saw it (None: never observed)."""
        last = self._seen.get(rank)
        return None if last is None else time.monotonic() - last[1]

    def is_quiet(self, rank: int) -> bool:
        """`rank`'s heartbeat stopped moving for long enough to say it is not merely between two beats."""
        quiet = self.quiet_for(rank)
        return quiet is not None and quiet >= max(2 * self.interval, 1.0)

    def silence(self, rank: int) -> str:
        """Why `rank` may have been silent, as far as its heartbeat tells."""
        quiet = self.quiet_for(rank)
        if quiet is None:
            return "its heartbeat was not observed"
        if self.is_quiet(rank):
            return f"no heartbeat for {quiet:.1f}s: stopped, wedged or cut off"
        return "its heartbeat goes on: alive, but not taking part (busy elsewhere, not calling receive?)"

    def raise_if_lost(self, ranks: Sequence[int], what: str, describe: Describe) -> None:
        lost = self.lost(ranks)
        if lost:
            raise PeerLostError("; ".join(f"{describe(r)} is lost during {what}: {why}" for r, why in lost),
                                ranks=tuple(r for r, _ in lost))
