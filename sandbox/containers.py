"""One container process: started inside the pod's network namespace and its own mount/UTS namespaces."""

from __future__ import annotations

import contextlib
import json
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


@dataclass
class Process:
    """A running container: its Popen handle, when it started, the pump writing its output to its log."""

    popen: subprocess.Popen[bytes]
    started_wall: float
    output: containerlog.Capture

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        """The exit code once it exited (negative: killed by that signal), else None."""
        return self.popen.poll()

    def signal_tree(self, sig: int) -> None:
        """Signals the container's process group and every descendant (processes that left the group too)."""
        for pid in [self.pid, *procs.descendants(self.pid)]:
            procs.kill_group(pid, sig)

    def kill(self) -> None:
        """Kills what is left of the container and waits until its output is in its log (the container's
        status says it ended only then, so `kubectl logs` of an ended container has all of it)."""
        self.signal_tree(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)
        self.output.wait()  # False: a process that left the container's tree still holds its stdout


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
    """Writes the launcher's spec and starts nsenter (net) -> unshare (mount, uts) -> launcher -> exec."""
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
    with open(log_file, "ab") as log:  # one write: the pump of an earlier run may still append records
        command = " ".join(argv).replace("\n", "\\n")  # one line: kubectl logs splits runs on it
        log.write(f"==== {time.strftime('%Y-%m-%dT%H:%M:%S')} {command}\n".encode())
    output = containerlog.capture(log_file)  # stdout and stderr: a pipe each, read into the log by a pump
    try:
        popen = subprocess.Popen(
            cmd,
            env=dict(env),
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=output.stdout,
            stderr=output.stderr,
            start_new_session=True,
        )
    finally:
        output.started()  # only the container holds the write ends now (or nobody: the pump ends)
    # down() finds containers through these files even when the agent is gone (hostNetwork pods have no netns)
    spec_file.with_suffix(".pid").write_text(f"{popen.pid} {procs.start_time(popen.pid)}\n")
    return Process(popen, time.time(), output)
