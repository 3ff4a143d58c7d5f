"""The trainer's store runs in a process of its own: it serves, reports a port it cannot bind, and ends
with the process that started it, however that one ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from weightsync.runtime.store import StoreClient, StoreUnreachable
from weightsync.runtime.store_process import StoreProcess

TOKEN = "a" * 32


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # a zombie of ours counts as gone
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        time.sleep(0.05)
    return False


def test_it_serves_and_its_clients_see_it_close() -> None:
    server = StoreProcess(0, TOKEN)
    client = StoreClient.connect("127.0.0.1", server.port, TOKEN, 10)
    client.set("k", b"v")
    assert client.get("k") == b"v"
    server.close()
    with pytest.raises(StoreUnreachable):
        client.get("k")


def test_a_port_in_use_is_an_error_naming_it() -> None:
    server = StoreProcess(0, TOKEN)
    try:
        with pytest.raises(OSError, match=str(server.port)):
            StoreProcess(server.port, TOKEN)
    finally:
        server.close()


def test_it_ends_when_the_process_that_started_it_is_killed() -> None:
    starter = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom weightsync.runtime.store_process import StoreProcess\n"
         f"s = StoreProcess(0, {TOKEN!r})\nprint(s.port, s._proc.pid, flush=True)\ntime.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    assert starter.stdout is not None
    port, child = (int(x) for x in starter.stdout.readline().split())
    StoreClient.connect("127.0.0.1", port, TOKEN, 10).close()
    os.kill(starter.pid, signal.SIGKILL)
    starter.wait(timeout=10)
    assert _gone(child, within=10), "the store process outlived the trainer"
