"""The sandbox's supervisor: a component that exits is started again with its command line, with a back-off,
and never while an up/down holds the state directory's lock."""

from __future__ import annotations

import fcntl
import os
import signal
import time
from pathlib import Path

import pytest
from weightsync.sandbox import procs, supervisor
from weightsync.sandbox.supervisor import BACKOFF_BASE_S, BACKOFF_CAP_S, STABLE_S, Supervisor


@pytest.fixture
def state(tmp_path: Path) -> Path:
    supervisor.write_components(
        tmp_path / "run",
        [("sleeper", ["sleep", "600"], {}), ("envy", ["sh", "-c", "echo $EXTRA; sleep 600"], {"EXTRA": "on"})],
    )
    return tmp_path


def _kill(name: str, run: Path) -> int:
    pid = procs.running_pid(name, run)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    procs.wait_gone([pid], 5)
    return pid


def _stop_all(sup: Supervisor) -> None:
    for c in sup.components:
        procs.stop(c.name, sup.run_dir, grace=1)


def test_a_component_that_exits_is_started_again_with_a_growing_back_off(state: Path) -> None:
    sup = Supervisor(state)
    try:
        t = 1000.0
        sup.step(t)  # nothing runs yet: both are started at once
        first = procs.running_pid("sleeper", sup.run_dir)
        assert first is not None and procs.running_pid("envy", sup.run_dir) is not None
        for _ in range(50):  # the environment on top of the supervisor's
            if "on" in (state / "logs" / "envy.log").read_text():
                break
            time.sleep(0.1)
        assert "on" in (state / "logs" / "envy.log").read_text()

        _kill("sleeper", sup.run_dir)
        sup.step(t := t + 0.01)  # seen gone: waits its back-off
        assert procs.running_pid("sleeper", sup.run_dir) is None
        sup.step(t := t + BACKOFF_BASE_S)
        second = procs.running_pid("sleeper", sup.run_dir)
        assert second is not None and second != first
        sleeper = sup.components[0]
        assert sleeper.restarts == 2 and sleeper.backoff_s == 2 * BACKOFF_BASE_S

        for _ in range(8):  # crashing again and again: the wait doubles up to the cap
            _kill("sleeper", sup.run_dir)
            sup.step(t := t + 0.01)
            sup.step(t := t + sleeper.backoff_s - 0.02)
            assert procs.running_pid("sleeper", sup.run_dir) is None  # not before its back-off
            sup.step(t := t + 0.02)
            assert procs.running_pid("sleeper", sup.run_dir) is not None
        assert sleeper.backoff_s == BACKOFF_CAP_S

        sup.step(t := t + STABLE_S)  # ran long enough: the back-off starts over
        assert sleeper.backoff_s == 0.0
    finally:
        _stop_all(sup)


def test_nothing_is_started_while_an_up_or_down_holds_the_lock(state: Path) -> None:
    sup = Supervisor(state)
    with open(state / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            sup.step(1000.0)
            assert procs.running_pid("sleeper", sup.run_dir) is None
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    try:
        sup.step(1001.0)
        assert procs.running_pid("sleeper", sup.run_dir) is not None
    finally:
        _stop_all(sup)


def test_the_sandbox_knows_the_supervisor_by_its_name() -> None:
    from weightsync.sandbox.controlplane import SUPERVISOR

    assert supervisor.NAME == SUPERVISOR
