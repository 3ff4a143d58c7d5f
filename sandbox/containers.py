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

from weightsync.sandbox import procs
from weightsync.sandbox.paths import repo_root

LAUNCHER = Path(__file__).with_name("launcher.py")
NSENTER = shutil.which("nsenter") or "/usr/bin/nsenter"
UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"


@dataclass
class Process:
    """A running container: its Popen handle, when it started, where its output goes."""

    popen: subprocess.Popen[bytes]
    started_wall: float

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
        self.signal_tree(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)


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
    with open(log_file, "ab") as log:
        command = " ".join(argv).replace("\n", "\\n")  # one line: kubectl logs splits runs on it
        log.write(f"==== {time.strftime('%Y-%m-%dT%H:%M:%S')} {command}\n".encode())
        log.flush()
        popen = subprocess.Popen(
            cmd,
            env=dict(env),
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    # down() finds containers through these files even when the agent is gone (hostNetwork pods have no netns)
    spec_file.with_suffix(".pid").write_text(f"{popen.pid} {procs.start_time(popen.pid)}\n")
    return Process(popen, time.time())
