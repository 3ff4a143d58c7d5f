"""One container process: started inside the pod's network namespace and its own mount/UTS namespaces."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightsync.sandbox import containerlog, procs
from weightsync.sandbox.paths import repo_root

LAUNCHER = Path(__file__).with_name("launcher.py")
NSENTER = shutil.which("nsenter") or "/usr/bin/nsenter"
UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"


SHIM = Path(__file__).with_name("shim.py")
#: How long start() waits for the shim to report the container's pid (a Python start on a loaded machine).
SHIM_START_S = 60.0
#: How long kill() waits for the shim to record the exit (the container's pipes drained) after SIGKILL.
KILL_WAIT_S = 10.0 + containerlog.DRAIN_S


@dataclass(frozen=True)
class Files:
    """What one container's shim and the agent keep in the pod's run/ directory (see shim.py)."""

    run_dir: Path
    name: str

    @property
    def pid(self) -> Path:
        return self.run_dir / f"{self.name}.pid"

    @property
    def shim_pid(self) -> Path:
        return self.run_dir / f"{self.name}.shim.pid"

    @property
    def exit(self) -> Path:
        return self.run_dir / f"{self.name}.exit"

    @property
    def shim_spec(self) -> Path:
        return self.run_dir / f"{self.name}.shim.json"

    @property
    def state(self) -> Path:
        """The agent's record of the run (how many runs, the last one's end, back-off, GPUs)."""
        return self.run_dir / f"{self.name}.state.json"

    def finished_wall(self) -> float | None:
        try:
            return float(json.loads(self.exit.read_text())["finishedAt"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def exit_code(self) -> int | None:
        try:
            return int(json.loads(self.exit.read_text())["exitCode"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def clear(self) -> None:
        for path in (self.pid, self.shim_pid, self.exit):
            path.unlink(missing_ok=True)


@dataclass
class Process:
    """A container run: its pid, its shim (which outlives the agent), when it started.

    `shim` is the shim's Popen when this agent started it (so it is reaped), None for a container adopted
    after an agent restart."""

    pid: int
    started_wall: float
    files: Files
    shim_pid: int
    shim: subprocess.Popen[bytes] | None = None
    lost: bool = False  # the shim died without recording the exit

    def finished_wall(self) -> float | None:
        """When it ended (its shim's record), None while it runs."""
        return self.files.finished_wall()

    def poll(self) -> int | None:
        """The exit code once it ended and its output is in its log (negative: killed by that signal)."""
        code = self.files.exit_code()
        if code is not None:
            if self.shim is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.shim.wait(timeout=1)  # it writes the exit last: reap it
            return code
        if self.shim is not None:
            self.shim.poll()
        if procs.running_pid(self.files.shim_pid.stem, self.files.run_dir) is None:
            code = self.files.exit_code()  # it may have written it just before it ended
            if code is not None:
                return code
            if procs.running_pid(self.files.pid.stem, self.files.run_dir) is not None:
                self.signal_tree(signal.SIGKILL)  # nobody reads its output any more
            self.lost = True
            return -signal.SIGKILL
        return None

    def signal_tree(self, sig: int) -> None:
        """Signals the container's process group and every descendant (processes that left the group too)."""
        if procs.running_pid(self.files.pid.stem, self.files.run_dir) is None:
            return  # ended: its pid (and group id) may belong to another process by now
        for pid in [self.pid, *procs.descendants(self.pid)]:
            procs.kill_group(pid, sig)

    def kill(self) -> None:
        """Kills what is left of the container and waits until its shim recorded the exit, so its output is in
        its log (the container's status says it ended only then, so `kubectl logs` of an ended container has
        all of it)."""
        if self.poll() is not None:
            return
        self.signal_tree(signal.SIGKILL)
        deadline = time.monotonic() + KILL_WAIT_S
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)


def adopt(files: Files, started_wall: float) -> Process | None:
    """The run recorded in `files` (by a shim an earlier agent started), while its shim or its exit is there."""
    shim_pid = procs.running_pid(files.shim_pid.stem, files.run_dir)
    if shim_pid is None and files.exit_code() is None:
        return None
    deadline = time.monotonic() + SHIM_START_S
    while not files.pid.exists() and files.exit_code() is None and time.monotonic() < deadline:
        if shim_pid is not None and procs.running_pid(files.shim_pid.stem, files.run_dir) is None:
            break
        time.sleep(0.05)
    try:
        pid = int(files.pid.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        if files.exit_code() is None:
            return None
        pid = shim_pid or 0  # it could not even start it: the exit file says so
    return Process(pid, started_wall, files, shim_pid or 0)


def keep_visible() -> list[str]:
    """Host paths every container must still see after its volumes are mounted: the Python environment
    that runs the commands and the checkout its editable install points into."""
    paths = {sys.prefix, str(Path(__file__).resolve().parent.parent)}
    with contextlib.suppress(FileNotFoundError):
        paths.add(str(repo_root()))
    return sorted(paths)


def start(
    *,
    python: str,
    netns: str | None,
    spec_file: Path,
    argv: list[str],
    env: Mapping[str, str],
    mounts: list[dict[str, Any]],
    hostname: str | None,
    working_dir: str | None,
    log_file: Path,
) -> Process:
    """Writes the launcher's spec and starts the container's shim, which starts nsenter (net) -> unshare
    (mount, uts) -> launcher -> exec and pumps its output into `log_file`; returns once it runs."""
    spec_file.parent.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(
        json.dumps({"argv": argv, "mounts": mounts, "hostname": hostname, "workingDir": working_dir,
                    "keep": keep_visible()})
    )
    log_file.parent.mkdir(parents=True, exist_ok=True)
    enter = [NSENTER, f"--net=/run/netns/{netns}", "--"] if netns else []  # None: the host's network
    cmd = [
        *enter,
        UNSHARE,
        "--mount",
        "--uts",
        "--propagation",
        "private",
        "--",
        python,
        "-I",
        str(LAUNCHER),
        str(spec_file),
    ]
    files = Files(spec_file.parent, spec_file.stem)
    files.clear()  # the last run's, which the caller has dealt with
    files.shim_spec.write_text(
        json.dumps({"argv": cmd, "logFile": str(log_file), "pidFile": str(files.pid), "exitFile": str(files.exit)})
    )
    with open(log_file, "ab") as log:  # one write: the shim of an earlier run may still append records
        command = " ".join(argv).replace("\n", "\\n")  # one line: kubectl logs splits runs on it
        log.write(f"==== {time.strftime('%Y-%m-%dT%H:%M:%S')} {command}\n".encode())
    shim = subprocess.Popen(
        [python, "-I", str(SHIM), str(files.shim_spec)],
        env=dict(env),  # the container's: the shim passes its own environment on
        cwd="/",
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # never signalled with the agent's process group
    )
    # down() finds the shim through this file even when no agent runs; never read half written (renamed)
    tmp = files.shim_pid.with_name(f".{files.shim_pid.name}.tmp")
    tmp.write_text(f"{shim.pid} {procs.start_time(shim.pid)}\n")
    os.replace(tmp, files.shim_pid)
    deadline = time.monotonic() + SHIM_START_S
    while not files.pid.exists() and files.exit_code() is None:
        if shim.poll() is not None or time.monotonic() > deadline:
            shim.kill()
            shim.wait()
            raise RuntimeError(f"the container's shim {'ended' if shim.returncode else 'did not start it'}")
        time.sleep(0.01)
    try:
        pid = int(files.pid.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pid = shim.pid  # it could not even start it: the exit file says so
    return Process(pid, time.time(), files, shim.pid, shim)
