"""free_port: ports a later listener can bind, never ones an outgoing connection can take meanwhile."""

from __future__ import annotations

import socket

from weightsync.ports import free_port


def test_free_ports_lie_below_the_ephemeral_range_and_can_be_bound() -> None:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_start = int(f.read().split()[0])
    for _ in range(20):
        port = free_port()
        assert port < ephemeral_start, (port, ephemeral_start)
        with socket.socket() as s:
            s.bind(("0.0.0.0", port))
            s.listen()


def test_a_port_in_use_is_never_chosen() -> None:
    held = []
    try:
        for _ in range(50):
            s = socket.socket()
            port = free_port()
            s.bind(("0.0.0.0", port))  # would raise if free_port handed out a port that is held
            held.append(s)
    finally:
        for s in held:
            s.close()
