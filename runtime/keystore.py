"""The runtime's view of the rendezvous store: one epoch's keys, sealed JSON values, bounded waits.

Values are JSON (nothing read from the store is unpickled), sealed with the group's key and bound to their
full key name (sealing.py). A value over `PART_BYTES` (a large MoE's tensor list) is split into parts, each
sealed under its own name, and a small head written last; readers that wait for the head find every part
there. A store that stops answering means its host, the trainer, is gone: every operation turns that into a
PeerLostError naming rank 0.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from weightsync.runtime.errors import PeerLostError, TamperedValueError
from weightsync.runtime.sealing import Sealer
from weightsync.runtime.store import StoreClient, StoreUnreachable

from weightsync.contract import TRAINER_RANK

#: Values larger than this travel as several parts (each a store value of its own).
PART_BYTES = 4 << 20
#: How long one blocking wait in the store lasts before the caller's checks run again.
WAIT_SLICE_SECONDS = 0.1

_PLAIN = b"v"
_SPLIT = b"p"


def group_prefix(namespace: str, name: str, token: str) -> str:
    """The store prefix of one WeightSync's keys; the token makes it differ between two incarnations of one
    name (a deleted and re-created object gets a new Secret)."""
    digest = hashlib.sha256(f"{namespace}/{name}\0{token}".encode()).hexdigest()[:16]
    return f"weightsync/{digest}/"


def trainer_unreachable(err: BaseException) -> PeerLostError:
    first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
    return PeerLostError(f"rank {TRAINER_RANK} (trainer) is unreachable: the rendezvous store it hosts "
                         f"stopped answering ({first_line})", ranks=(TRAINER_RANK,), store_lost=True)


class KeyStore:
    """Keys under one prefix (a group's epoch), with sealed JSON values."""

    def __init__(self, client: StoreClient, sealer: Sealer, prefix: str) -> None:
        self.client = client
        self.sealer = sealer
        self.prefix = prefix

    def full_name(self, key: str) -> str:
        return self.prefix + key

    # --------------------------------------------------------------------------------------- writing
    def _sealed(self, key: str, value: Any) -> list[tuple[str, bytes]]:
        """The store entries that carry `value` under `key`: one, or its parts and then the head."""
        full = self.full_name(key)
        data = json.dumps(value, separators=(",", ":")).encode()
        if len(data) <= PART_BYTES:
            return [(full, self.sealer.seal(full, _PLAIN + data))]
        entries = []
        for i, start in enumerate(range(0, len(data), PART_BYTES)):
            part = f"{full}/part/{i}"
            entries.append((part, self.sealer.seal(part, data[start:start + PART_BYTES])))
        head = {"parts": len(entries), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        entries.append((full, self.sealer.seal(full, _SPLIT + json.dumps(head).encode())))
        return entries

    def put(self, key: str, value: Any) -> None:
        self.put_many({key: value})

    def put_many(self, values: dict[str, Any]) -> None:
        """Every value in one round trip (parts before heads, in order)."""
        entries = [e for key, value in values.items() for e in self._sealed(key, value)]
        try:
            self.client.multi_set(entries)
        except StoreUnreachable as err:
            raise trainer_unreachable(err) from err

    def put_many_later(self, values: dict[str, Any]) -> Callable[[], None]:
        """`put_many`, sent now; the returned function reads the store's answer (raising as `put_many` would)
        and must be called before this store is used for anything that depends on the values being there."""
        entries = [e for key, value in values.items() for e in self._sealed(key, value)]
        try:
            done = self.client.multi_set_later(entries)
        except StoreUnreachable as err:
            raise trainer_unreachable(err) from err

        def stored() -> None:
            try:
                done()
            except StoreUnreachable as err:
                raise trainer_unreachable(err) from err
        return stored

    def put_ephemeral(self, key: str, value: Any) -> None:
        """A value the store deletes when this client's connection closes: the process died."""
        full = self.full_name(key)
        try:
            self.client.set_ephemeral(full, self.sealer.seal(full, _PLAIN + json.dumps(value).encode()))
        except StoreUnreachable as err:
            raise trainer_unreachable(err) from err

    def claim(self, key: str, value: Any) -> Any:
        """Write `value` under `key` unless a value is there already; returns the value that stands (this one,
        or the one written first). One compare-and-set in the store: members racing to decide one thing (the
        trainer confirming a sync, a receiver abandoning it) all see the same winner."""
        full = self.full_name(key)
        data = json.dumps(value, separators=(",", ":")).encode()
        if len(data) > PART_BYTES:
            raise ValueError(f"a claim on {key!r} must fit one store value ({len(data)} bytes)")
        try:
            stored = self.client.compare_set(full, b"", self.sealer.seal(full, _PLAIN + data))
        except StoreUnreachable as err:
            raise trainer_unreachable(err) from err
        return self._open(full, stored)

    # --------------------------------------------------------------------------------------- reading
    def _open(self, full: str, sealed: bytes) -> Any:
        plain = self.sealer.open(full, sealed)
        if plain[:1] == _PLAIN:
            return json.loads(plain[1:])
        if plain[:1] != _SPLIT:
            raise TamperedValueError(full, "unknown value kind")
        head = json.loads(plain[1:])
        names = [f"{full}/part/{i}" for i in range(int(head["parts"]))]
        raw = self._multi_get(names)
        missing = [n for n, r in zip(names, raw, strict=True) if r is None]
        if missing:
            raise TamperedValueError(full, f"{len(missing)} of its {len(names)} parts are missing")
        data = b"".join(self.sealer.open(n, r) for n, r in zip(names, raw, strict=True) if r is not None)
        if len(data) != head["bytes"] or hashlib.sha256(data).hexdigest() != head["sha256"]:
            raise TamperedValueError(full, "its parts do not add up to the value the head describes")
        return json.loads(data)

    def _multi_get(self, full_names: Sequence[str]) -> list[bytes | None]:
        try:
            return self.client.multi_get(list(full_names))
        except StoreUnreachable as err:
            raise trainer_unreachable(err) from err

    def get_many(self, keys: Sequence[str]) -> list[Any]:
        """The values of `keys` (None where a key is absent); a value that fails authentication raises
        TamperedValueError naming its key."""
        full = [self.full_name(k) for k in keys]
        return [None if raw is None else self._open(f, raw) for f, raw in zip(full, self._multi_get(full),
                                                                                strict=True)]

    def get(self, key: str) -> Any:
        return self.get_many([key])[0]

    def has(self, keys: Sequence[str]) -> list[bool]:
        return [raw is not None for raw in self._multi_get([self.full_name(k) for k in keys])]

    # --------------------------------------------------------------------------------------- waiting
    def wait(self, keys: Sequence[str], deadline: float, on_poll: Callable[[], None]) -> list[Any]:
        """Return the values of `keys` once every one exists; `on_poll` runs between slices of the wait and
        may raise.

        Raises TimeoutError listing the keys still missing at `deadline`. The wait blocks in the store, so it
        ends the moment the last key is written, and brings the values back in the same round trip."""
        full = [self.full_name(k) for k in keys]
        while True:
            now = time.monotonic()
            try:
                raw = self.client.wait_get(full, max(min(deadline - now, WAIT_SLICE_SECONDS), 0.0))
            except StoreUnreachable as err:
                raise trainer_unreachable(err) from err
            if raw is not None:
                return [self._open(f, r) for f, r in zip(full, raw, strict=True)]
            on_poll()
            if time.monotonic() >= deadline:
                present = self.has(keys)
                missing = [k for k, there in zip(keys, present, strict=True) if not there]
                if not missing:
                    return self.get_many(keys)
                raise TimeoutError(", ".join(missing))

    def wait_later(self, keys: Sequence[str], deadline: float, on_poll: Callable[[], None]) -> Callable[[], list[Any]]:
        """`wait`, with its first slice sent to the store now: the returned function brings the values back
        (waiting on, as `wait` does, if they were not all there within that slice)."""
        full = [self.full_name(k) for k in keys]
        try:
            first = self.client.wait_get_later(full, max(min(deadline - time.monotonic(), WAIT_SLICE_SECONDS), 0.0))
        except StoreUnreachable as err:
            raise trainer_unreachable(err) from err

        def values() -> list[Any]:
            try:
                raw = first()
            except StoreUnreachable as err:
                raise trainer_unreachable(err) from err
            if raw is not None:
                return [self._open(f, r) for f, r in zip(full, raw, strict=True)]
            on_poll()
            return self.wait(keys, deadline, on_poll)
        return values

    # ------------------------------------------------------------------------------------- clean-up
    def delete(self, keys: Sequence[str]) -> None:
        """Delete keys (not the parts of split values: those go with their prefix, `delete_prefix`)."""
        try:
            self.client.delete([self.full_name(k) for k in keys])
        except StoreUnreachable as err:
            raise trainer_unreachable(err) from err

    def delete_prefix(self, sub: str = "") -> None:
        try:
            self.client.delete_prefix(self.full_name(sub))
        except StoreUnreachable as err:
            raise trainer_unreachable(err) from err
