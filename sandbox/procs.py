"""Long-lived processes with pid files: start detached, check, stop whole process groups.

A pid file holds `<pid> <start time>` (field 22 of /proc/<pid>/stat), so a recycled pid is never
mistaken for ours.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot, or None when it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie."""
    return not is_zombie(pid)


def spawn(
    name: str,
    argv: list[str],
    run_dir: Path,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
) -> int:
    """Starts `argv` in its own session, output appended to <log_dir>/<name>.log; records its pid file."""
    log_dir.mkdir(parents=True, exist_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"{name}.log", "ab") as log:
        log.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(env) if env is not None else None,
        )
    (run_dir / f"{name}.pid").write_text(f"{proc.pid} {start_time(proc.pid)}\n")
    return proc.pid


def running_pid(name: str, run_dir: Path) -> int | None:
    """The pid recorded for `name` when that very process is still alive, else None."""
    try:
        pid_text, started = (run_dir / f"{name}.pid").read_text().split()
    except (OSError, ValueError):
        return None
    pid = int(pid_text)
    if start_time(pid) != started or is_zombie(pid):
        return None
    return pid


def kill_group(pid: int, sig: int) -> None:
    """Sends `sig` to the process group led by `pid` and to `pid` itself; quiet when they are gone."""
    for send in (os.killpg, os.kill):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            send(pid, sig)


def wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Waits up to `timeout` seconds for the processes to exit; returns those still alive."""
    remaining = list(pids)
    deadline = time.monotonic() + timeout
    while remaining and time.monotonic() < deadline:
        remaining = [p for p in remaining if start_time(p) is not None and not is_zombie(p)]
        if remaining:
            time.sleep(0.05)
    return [p for p in remaining if start_time(p) is not None and not is_zombie(p)]


def stop(name: str, run_dir: Path, grace: float = 10.0) -> bool:
    """Stops the recorded process and its group (SIGTERM, then SIGKILL after `grace`); True if it ran."""
    pid = running_pid(name, run_dir)
    (run_dir / f"{name}.pid").unlink(missing_ok=True)
    if pid is None:
        return False
    kill_group(pid, signal.SIGTERM)
    if wait_gone([pid], grace):
        kill_group(pid, signal.SIGKILL)
        wait_gone([pid], 5.0)
    return True


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (children first), found through /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found
