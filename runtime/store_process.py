"""The trainer's store, served by a process of its own.

The trainer's main thread is busy in Python for most of a sync (laying out and enqueueing tens of thousands
of tensors); a store served by a thread of the same process would answer every member only when that
thread lets go of the interpreter lock, adding milliseconds to each round trip of the handshake. A child
process answers at once, and keeps answering while the trainer's Python is busy or stopped: a stalled
trainer is then found by its heartbeat, like any member. The child needs only the standard library and
`cryptography` (store.py runs as a script, without importing torch), and ends when the trainer does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from weightsync.runtime import store

_START_SECONDS = 60.0


class StoreProcess:
    """A `store.StoreServer` in a child process; `port` is where it listens."""

    def __init__(self, port: int, token: str, host: str = "") -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-P", str(Path(store.__file__))], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env={k: v for k, v in os.environ.items() if not k.startswith("WEIGHTSYNC_")}, close_fds=True,
            text=True)
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._stdin: IO[str] = self._proc.stdin
        self._stdin.write(json.dumps({"port": port, "token": token, "host": host}) + "\n")
        self._stdin.flush()
        answer = self._read_answer(self._proc.stdout)
        bound = answer.get("port")
        if "error" in answer or not isinstance(bound, int):
            self.close()
            raise OSError(answer.get("error", f"the store process ended before listening ({answer})"))
        self.port = bound

    def _read_answer(self, stdout: IO[str]) -> dict[str, object]:
        deadline = time.monotonic() + _START_SECONDS
        line = stdout.readline()  # the child answers within a second; a child that died gives EOF at once
        if not line:
            self._proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            return {"error": f"the store process exited with code {self._proc.returncode} before listening"}
        answer = json.loads(line)
        return answer if isinstance(answer, dict) else {"error": f"unexpected answer {line!r}"}

    def alive(self) -> bool:
        return self._proc.poll() is None

    def ended(self) -> str:
        code = self._proc.poll()
        return "running" if code is None else f"exit code {code}" if code >= 0 else f"signal {-code}"

    def close(self) -> None:
        """Stop the store: its clients see their connections close."""
        if self._proc.poll() is None:
            try:
                self._stdin.close()
                self._proc.wait(timeout=5.0)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait(timeout=5.0)
        if self._proc.stdout is not None:
            self._proc.stdout.close()
