"""One container's shim (as containerd has one per container): starts it, pumps its output, records its exit.

Invoked by the node agent as `python -I shim.py <shim.json>` in a session of its own, so the container
outlives the agent: the agent can be killed and restarted while the container keeps running, keeps writing
its output (the pipes' reader is this process, not the agent) and its exit code still gets recorded. The
spec names the command (nsenter -> unshare -> launcher -> exec, one pid all along), the container's log file
and three files in the pod's run/ directory that the agent (this one or the next) reads:

* `<name>.pid`: `<pid> <start time>` of the container, written right after it started (down() kills it by
  this file even when no agent runs);
* `<name>.shim.pid`: this process (written by the agent when it started it, and by this at its start);
* `<name>.exit`: `{"exitCode": <Popen returncode>, "finishedAt": <epoch seconds>}`, written (atomically)
  when the container ended, whatever it left behind in its process group was killed and its output is in
  its log (or DRAIN_S passed), so a container reported as ended has all its output in its log.

Standard library only (containerlog.py is loaded by its path): it starts once per container run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_weightsync_sandbox_{name}", Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _start_time(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    containerlog = _load("containerlog")
    pid_file, exit_file = Path(spec["pidFile"]), Path(spec["exitFile"])
    # the agent writes it too, right after starting this; here for an agent killed in between (both rename)
    _write_atomically(pid_file.with_suffix(".shim.pid"), f"{os.getpid()} {_start_time(os.getpid())}\n")
    output = containerlog.capture(Path(spec["logFile"]))
    try:
        popen = subprocess.Popen(
            spec["argv"],
            env=dict(os.environ),
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=output.stdout,
            stderr=output.stderr,
            start_new_session=True,
        )
    except OSError as e:
        output.started()
        output.wait()
        print(f"[shim {time.strftime('%H:%M:%S')}] cannot start {spec['argv'][0]}: {e}", flush=True)
        _write_atomically(exit_file, json.dumps({"exitCode": 128, "finishedAt": time.time()}))
        return
    output.started()  # only the container holds the write ends now
    with contextlib.suppress(OSError):  # it may have ended already: then its pid is still ours (unreaped)
        _write_atomically(pid_file, f"{popen.pid} {_start_time(popen.pid)}\n")
    code = popen.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, signal.SIGKILL)  # whatever it left behind in its process group
    output.wait()  # False: a process that left the group still holds its stdout (DRAIN_S passed)
    _write_atomically(exit_file, json.dumps({"exitCode": code, "finishedAt": time.time()}))


if __name__ == "__main__":
    main()
