"""One sync's outcome is decided once, in the store: the trainer's confirmation or a receiver's abandonment,
whichever came first, for every member. A real store server on 127.0.0.1, real clients.

The case it guards against, seen in the soak: the trainer was stopped (SIGSTOP) mid-sync for longer than the
heartbeat threshold; every receiver had acknowledged the data, gave up waiting for the trainer's word and
abandoned the version; the trainer, resumed, found every acknowledgement and reported the version synced.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import pytest
from weightsync.runtime.errors import PeerLostError
from weightsync.runtime.handshake import FormationKeys, ReceiverRound, TrainerRound
from weightsync.runtime.keystore import KeyStore
from weightsync.runtime.sealing import Sealer
from weightsync.runtime.store import StoreClient, StoreServer

TOKEN = "test-" + secrets.token_hex(16)


@pytest.fixture
def stores() -> Iterator[tuple[KeyStore, KeyStore]]:
    """The trainer's and one receiver's view of one epoch's keys, on two connections."""
    server = StoreServer(0, TOKEN, host="127.0.0.1")
    clients = [StoreClient.connect("127.0.0.1", server.port, TOKEN, 20.0) for _ in range(2)]
    sealer = Sealer(TOKEN)
    yield KeyStore(clients[0], sealer, "g/e0/"), KeyStore(clients[1], sealer, "g/e0/")
    for c in clients:
        c.close()
    server.close()


def _rounds(trainer: KeyStore, receiver: KeyStore, wait: float) -> tuple[TrainerRound, ReceiverRound]:
    common = dict(formation=FormationKeys(0), seq=0, version_hint="v7", deadline=time.monotonic() + wait,
                  check=lambda: None, data_check=lambda: None, describe=lambda r: f"rank {r}",
                  silence=lambda r: "its heartbeat stopped", timeout=wait)
    t = TrainerRound(keys=trainer, **common)  # type: ignore[arg-type]
    r = ReceiverRound(keys=receiver, **common)  # type: ignore[arg-type]
    t.receivers, r.rank = [1], 1
    return t, r


def test_a_receiver_that_gave_up_after_its_ack_makes_the_trainers_late_confirmation_fail(
        stores: tuple[KeyStore, KeyStore]) -> None:
    trainer, receiver = stores
    t, r = _rounds(trainer, receiver, wait=0.3)
    r.acknowledge([])
    with pytest.raises(PeerLostError, match="did not answer the trainer's confirmation of v7"):
        r.await_done()  # the trainer is "stopped": no word within the wait
    with pytest.raises(PeerLostError, match="sync v7 was abandoned by rank 1 before the trainer confirmed it"):
        t.collect_acks()  # resumed: every ack is there, but the receiver's claim stands


def test_a_confirmation_that_came_first_stands_for_a_receiver_that_gives_up_later(
        stores: tuple[KeyStore, KeyStore]) -> None:
    trainer, receiver = stores
    t, r = _rounds(trainer, receiver, wait=5.0)
    r.acknowledge([])
    t.collect_acks()
    r.check = lambda: (_ for _ in ()).throw(PeerLostError("rank 0 is lost: no heartbeat", ranks=(0,)))
    r.await_done()  # the word is there: the sync stands, whatever the receiver's checks say now


def test_every_receiver_sees_the_first_abandonment(stores: tuple[KeyStore, KeyStore]) -> None:
    trainer, receiver = stores
    _, first = _rounds(trainer, receiver, wait=0.2)
    first.acknowledge([])
    with pytest.raises(PeerLostError):
        first.await_done()
    _, second = _rounds(trainer, trainer, wait=5.0)
    second.rank = 2
    with pytest.raises(PeerLostError, match="abandoned by rank 1") as err:
        second.await_done()
    assert err.value.ranks == (0,)  # rank 1 gave up on the trainer (silent): the trainer is at fault
