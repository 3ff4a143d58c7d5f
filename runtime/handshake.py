"""The store protocol of a sync group: every key name, and each side's steps of one sync.

Keys live under the epoch's prefix (keystore.py); inside an epoch, each formation of the group (the first,
and one more after every failure the members heal from) has its own keys, and inside a formation each sync
("round") has its own:

    formation                    the trainer: which formation is current, and whether it is open to joins
                                 ({"formation": n, "open": bool, "after": the abort that closed the last})
    alive/<rank>                 ephemeral: deleted by the store when the member's connection closes
    beat/<rank>                  heartbeat counter, rewritten every interval (both for the whole epoch)
    f<n>/join/<rank>             a member arrived ({rank, pod, pid, local_world_size, world_size, nonce})
    f<n>/group                   the trainer: members, the communicator's id, errors, the joiners' nonces
    f<n>/abort                   the first member to fail says who and why; everyone stops
    f<n>/seen/<rank>             a member read the abort (a trainer that exits waits, briefly, for these)
    f<n>/r/<seq>/manifest        the trainer announces a sync
    f<n>/r/<seq>/verdict/<rank>  each receiver: the problems it found (none: ready)
    f<n>/r/<seq>/go              the trainer: everyone's problems (none: data follows)
    f<n>/r/<seq>/ack/<rank>      each receiver: all data arrived (checksum errors, if any)
    f<n>/r/<seq>/done            the sync's outcome, claimed once (compare-and-set): the trainer's "every
                                 receiver has it" (problems elsewhere, if any), or a receiver's "abandoned"
                                 when it gave up waiting for that word; whichever came first stands for all

Clean-up: the trainer deletes sync seq-1's keys once every receiver answered sync seq (they are past it),
a formation's keys when the next one forms, and an epoch's keys when the group forms at a newer epoch.
So the store holds at most two syncs' keys per group, however long the run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from weightsync.runtime.errors import ChecksumError, ConfigMismatchError, PeerLostError, WeightSyncError
from weightsync.runtime.keystore import KeyStore

#: Raises to stop a wait: a peer died, another member aborted, the deadline passed.
Check = Callable[[], None]
Describe = Callable[[int], str]
#: Why a member that did not answer in time was silent (its heartbeat stopped, or it is busy elsewhere).
Silence = Callable[[int], str]

FORMATION = "formation"


def alive_key(rank: int) -> str:
    """Liveness lasts for the epoch, not a formation: a member is alive between formations too."""
    return f"alive/{rank}"


def beat_key(rank: int) -> str:
    return f"beat/{rank}"


@dataclass(frozen=True)
class FormationKeys:
    """The key names of one formation."""

    formation: int

    def _k(self, rest: str) -> str:
        return f"f{self.formation}/{rest}"

    @property
    def prefix(self) -> str:
        return self._k("")

    def join(self, rank: int) -> str:
        return self._k(f"join/{rank}")

    @property
    def group(self) -> str:
        return self._k("group")

    @property
    def abort(self) -> str:
        return self._k("abort")

    def seen(self, rank: int) -> str:
        return self._k(f"seen/{rank}")

    @property
    def gloo(self) -> str:
        """Where gloo's own rendezvous keys go (written by torch through the store's c10d adapter)."""
        return self._k("gloo/")

    def round(self, seq: int) -> str:
        return self._k(f"r/{seq}/")


@dataclass
class Round:
    """One sync's handshake as one member sees it."""

    keys: KeyStore
    formation: FormationKeys
    seq: int
    version_hint: str  # "v7" once known, for messages
    deadline: float
    check: Check  # for the handshake's waits, which name whoever did not answer at the deadline
    data_check: Check  # for the data path: the same, and the deadline too
    describe: Describe
    silence: Silence
    timeout: float

    def _k(self, rest: str) -> str:
        return self.formation.round(self.seq) + rest

    def _wait(self, keys: list[str], what: str, ranks: list[int]) -> list[Any]:
        return self._waited(lambda: self.keys.wait(keys, self.deadline, self.check), keys, what, ranks)

    def _waited(self, values: Callable[[], list[Any]], keys: list[str], what: str, ranks: list[int]) -> list[Any]:
        """The values of `keys` a wait brings back; a wait that ran out names the members that did not answer."""
        try:
            return values()
        except TimeoutError:
            missing = [r for r, there in zip(ranks, self.keys.has(keys), strict=True) if not there]
            raise PeerLostError("; ".join(f"{self.describe(r)} did not answer {what} within {self.timeout:.0f}s "
                                          f"({self.silence(r)})" for r in missing), ranks=tuple(missing)) from None


class TrainerRound(Round):
    """The trainer's steps: announce, collect verdicts, go, (data), collect acknowledgements, done."""

    receivers: list[int]
    _announced: Callable[[], None]
    _verdicts: Callable[[], list[Any]]

    def announce(self, manifest: dict[str, Any], receivers: list[int]) -> None:
        """Publish the manifest and start waiting for the verdicts in the same round trip: the store answers
        both, in order, and `collect_verdicts` reads the answers."""
        self.receivers = receivers
        self._announced = self.keys.put_many_later({manifest_key(self.formation, self.seq): manifest})
        self._verdicts = self.keys.wait_later(self._verdict_keys(), self.deadline, self.check)

    def _verdict_keys(self) -> list[str]:
        return [self._k(f"verdict/{r}") for r in self.receivers]

    def collect_verdicts(self) -> None:
        """Every receiver answers before data moves: a mismatch is refused with nothing written, and a
        receiver that died while it waited is found here, not in the middle of a broadcast."""
        self._announced()
        verdicts = self._waited(self._verdicts, self._verdict_keys(), f"the manifest of {self.version_hint}",
                                self.receivers)
        problems = [f"{self.describe(r)}: {p}" for r, v in zip(self.receivers, verdicts, strict=True)
                    for p in v["problems"]]
        self.keys.put(self._k("go"), {"problems": problems})
        if problems:
            raise ConfigMismatchError(f"sync {self.version_hint} refused before any data moved: "
                                      + "; ".join(problems))

    def collect_acks(self) -> None:
        names = [self._k(f"ack/{r}") for r in self.receivers]
        acks = self._wait(names, f"the end of sync {self.version_hint}", self.receivers)
        bad = [f"{self.describe(r)}: {e}" for r, a in zip(self.receivers, acks, strict=True) for e in a["errors"]]
        # Every receiver has the data, but one may have given up waiting for this word (the trainer was
        # stopped or starved past the threshold) and abandoned the version: then it is not synced.
        outcome = self.keys.claim(self._k("done"), {"problems": bad})
        if "problems" not in outcome:
            raise abandoned_error(outcome, self.version_hint, self.describe)
        if self.seq > 0:  # every receiver answered this sync's manifest, so all are past the previous one
            self.keys.delete_prefix(self.formation.round(self.seq - 1))
        if bad:
            raise ChecksumError(f"sync {self.version_hint} arrived corrupted: " + "; ".join(bad))


class ReceiverRound(Round):
    """A receiver's steps: (manifest), verdict, await go, (data), acknowledge, await done."""

    rank: int

    def verdict(self, problems: list[str]) -> None:
        self.keys.put(self._k(f"verdict/{self.rank}"), {"problems": problems})

    def await_go(self) -> None:
        refused = self._wait([self._k("go")], f"the trainer's go for {self.version_hint}", [0])[0]["problems"]
        if refused:
            raise ConfigMismatchError(f"sync {self.version_hint} refused before any data moved: "
                                      + "; ".join(refused))

    def acknowledge(self, errors: list[str]) -> None:
        self.keys.put(self._k(f"ack/{self.rank}"), {"errors": errors[:20]})

    def await_done(self) -> None:
        """A sync counts only once every member has it: wait for the trainer's word on the others. Giving up
        (the trainer stalled, another member aborted) is itself claimed as the sync's outcome, so that the
        trainer cannot report the version as synced afterwards; if its word came first, the sync stands."""
        try:
            outcome = self._wait([self._k("done")], f"the trainer's confirmation of {self.version_hint}", [0])[0]
        except WeightSyncError as err:
            claim = {"abandoned_by": self.rank, "ranks": list(err.members_at_fault), "reason": str(err)[:1000]}
            try:
                outcome = self.keys.claim(self._k("done"), claim)
            except WeightSyncError:
                raise err from None
            if "problems" not in outcome:
                raise
        if "problems" not in outcome:
            raise abandoned_error(outcome, self.version_hint, self.describe)
        bad = outcome["problems"]
        if bad:
            raise ChecksumError(f"sync {self.version_hint} arrived corrupted elsewhere: " + "; ".join(bad))


def abandoned_error(outcome: dict[str, Any], version_hint: str, describe: Describe) -> PeerLostError:
    """The error of a sync that a receiver abandoned (its claim on the outcome stood)."""
    by = int(outcome.get("abandoned_by", -1))
    ranks = tuple(int(r) for r in outcome.get("ranks", ()))
    return PeerLostError(f"sync {version_hint} was abandoned by {describe(by)} before the trainer confirmed it: "
                         f"{outcome.get('reason', '')}", ranks=ranks)


def manifest_key(formation: FormationKeys, seq: int) -> str:
    """What an idle receiver waits for: the announcement of sync `seq`."""
    return formation.round(seq) + "manifest"
