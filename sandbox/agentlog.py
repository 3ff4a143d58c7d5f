"""The node agent's log: whole lines from many threads, never interleaved."""

from __future__ import annotations

import sys
import threading
import time

_lock = threading.Lock()


def log(message: str) -> None:
    line = f"[node-agent {time.strftime('%H:%M:%S')}] {message}\n"
    with _lock:
        sys.stdout.write(line)
        sys.stdout.flush()
