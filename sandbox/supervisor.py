"""The sandbox's supervisor: a component that exits is started again with the same command line.

    python -m weightsync.sandbox.supervisor --state-dir DIR

`up` starts every component, writes their command lines to <state>/run/components.json (same flags, ports,
data directory, certificates: the restarted process is the same component) and starts this process last. It
polls the components' pid files every 0.2 s (a component `up` started is not its child; one it started is,
and is reaped here); one that is gone is started again after a back-off that begins at 0.2 s, doubles up to
10 s, and starts over once the component has run for 30 s. Every exit and restart is logged
(logs/supervisor.log). A restart happens only while no `up`/`down` holds the state directory's lock, and
`down` stops this process first, so nothing it stops comes back.

Pods are not touched: the node agent's containers run under shims of their own, and a restarted agent adopts
them (agent.py).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from weightsync.sandbox import procs

POLL_S = 0.2
BACKOFF_BASE_S = 0.2
BACKOFF_CAP_S = 10.0
STABLE_S = 30.0  # a component that ran this long starts its back-off over
NAME = "supervisor"


def _log(message: str) -> None:
    print(f"[supervisor {time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass
class Component:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # on top of the supervisor's own environment
    pid: int | None = None
    up_since: float = 0.0
    backoff_s: float = 0.0
    next_try: float = 0.0
    restarts: int = 0


def write_components(run_dir: Path, components: list[tuple[str, list[str], dict[str, str]]]) -> None:
    """What `up` records for the supervisor: (name, argv, extra environment), in start order."""
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = [{"name": n, "argv": argv, "env": env} for n, argv, env in components]
    tmp = run_dir / ".components.json.tmp"
    tmp.write_text(json.dumps(spec, indent=1))
    os.replace(tmp, run_dir / "components.json")


@contextlib.contextmanager
def _unless_locked(lock_file: Path) -> Iterator[bool]:
    """True while this holds the state directory's lock; False when an up/down holds it."""
    with open(lock_file, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class Supervisor:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.run_dir = state_dir / "run"
        self.log_dir = state_dir / "logs"
        spec = json.loads((self.run_dir / "components.json").read_text())
        self.components = [Component(c["name"], c["argv"], c.get("env", {})) for c in spec]
        self.stop = threading.Event()

    def _reap(self) -> None:
        with contextlib.suppress(ChildProcessError):
            while True:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    return
                for c in self.components:
                    if c.pid == pid:
                        code = os.waitstatus_to_exitcode(status)
                        _log(f"{c.name} (pid {pid}) exited with {code}")

    def step(self, now: float) -> None:
        self._reap()
        for c in self.components:
            pid = procs.running_pid(c.name, self.run_dir)
            if pid is not None:
                if pid != c.pid:
                    c.pid, c.up_since = pid, now
                elif c.backoff_s and now - c.up_since >= STABLE_S:
                    c.backoff_s = 0.0
                continue
            if c.pid is not None:
                _log(f"{c.name} (pid {c.pid}) is gone; starting it again in {c.backoff_s or BACKOFF_BASE_S:g}s")
                c.pid = None
                c.next_try = now + (c.backoff_s or BACKOFF_BASE_S)
            if now < c.next_try:
                continue
            with _unless_locked(self.state_dir / "lock") as mine:
                if not mine:
                    continue  # an up or down is at work: it starts or stops components itself
                if procs.running_pid(c.name, self.run_dir) is not None:
                    continue
                env = {**os.environ, **c.env}
                c.pid = procs.spawn(c.name, c.argv, self.run_dir, self.log_dir, env=env)
            c.up_since = now
            c.restarts += 1
            c.backoff_s = min(c.backoff_s * 2 or BACKOFF_BASE_S, BACKOFF_CAP_S)
            c.next_try = now + c.backoff_s
            _log(f"started {c.name} again (pid {c.pid}; restart {c.restarts}; next back-off {c.backoff_s:g}s)")

    def run(self) -> None:
        names = ", ".join(c.name for c in self.components)
        _log(f"supervising {names}")
        while not self.stop.is_set():
            try:
                self.step(time.monotonic())
            except Exception as e:  # never die of one bad round: the next one retries
                _log(f"error: {e!r}")
            self.stop.wait(POLL_S)
        _log("stopped")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="weightsync.sandbox.supervisor", description=__doc__)
    parser.add_argument("--state-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    supervisor = Supervisor(args.state_dir)

    def on_signal(signum: int, _frame: object) -> None:
        supervisor.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    supervisor.run()
    sys.exit(0)


if __name__ == "__main__":
    main()
