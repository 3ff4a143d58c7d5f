"""Free TCP ports for processes started later: outside the kernel's ephemeral range.

A port that the kernel hands out (bind to port 0) is in its ephemeral range (Linux: 32768-60999), where every
outgoing connection also takes its local port. Between picking a port and the process that listens on it
binding it, the kube clients, gloo and NCCL open many such connections: one can take it, and the listener
fails with "Address already in use". A port below that range is never taken by an outgoing connection.
"""

from __future__ import annotations

import random
import socket

_LOW, _HIGH = 20000, 32000


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port that nothing is bound to now (on any address), below the ephemeral range."""
    high = min(_HIGH, _ephemeral_start())
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(_LOW, high) if high > _LOW + 100 else 0
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            chosen: int = s.getsockname()[1]
            return chosen
    raise RuntimeError(f"no free port between {_LOW} and {high}")
