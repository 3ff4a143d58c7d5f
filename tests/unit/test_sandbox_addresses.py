"""The node agent's pod addresses: a released address is not handed straight back (peers' ARP caches)."""

from __future__ import annotations

import pytest
from weightsync.sandbox.network import AddressPool


def test_a_released_address_comes_back_only_after_the_others() -> None:
    pool = AddressPool(["10.0.0.2", "10.0.0.3", "10.0.0.4"])
    first, second = pool.take(), pool.take()
    pool.release(first)
    assert pool.take() == "10.0.0.4"  # not the one just released
    assert pool.take() == first  # once nothing else is free
    with pytest.raises(RuntimeError, match="no free pod address"):
        pool.take()
    pool.release(second)
    assert pool.take() == second


def test_held_addresses_are_never_handed_out() -> None:
    pool = AddressPool(["10.0.0.2", "10.0.0.3"])
    pool.hold("10.0.0.2")
    assert pool.take() == "10.0.0.3"
    with pytest.raises(RuntimeError):
        pool.take()
