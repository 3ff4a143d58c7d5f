"""Whole lines in the pod's log, from every process of a container.

A container's stdout is one pipe for all of its processes (inference.py runs one per worker), and the
container runtime cuts what comes out of it into log lines at the newlines. The kernel keeps a write whole
only up to PIPE_BUF (4096 bytes, and only while the pipe has room), so processes sharing a stdout can merge
their lines: Python's print writes the text and its newline with two write calls when PYTHONUNBUFFERED=1 (as
the demo's pods run), and a block-buffered stdout flushes every 8 KiB, mid-line. Another process's line
written in between joins the two into one line of the log, and the demo's checker misses one of them.

So the demo's programs

* write each line of their own with one write call (`emit`), never a part of one, and
* give each worker process its own stdout and stderr pipes (`spawn`): the parent relays each worker's
  complete lines to the container's stdout or stderr, each with one write call under a lock, so whatever a
  worker writes and however it buffers it (its Python prints, its logging, torch's C++ messages), its lines
  reach the log whole and nothing is written into the middle of them.

Standard library only, like the programs' other helpers.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from typing import IO, Any

READ_BYTES = 64 * 1024

_locks: dict[int, threading.Lock] = {1: threading.Lock(), 2: threading.Lock()}


def _lock(fd: int) -> threading.Lock:
    return _locks.setdefault(fd, threading.Lock())


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_lines(data: bytes, fd: int = 1) -> None:
    """Whole lines (`data` ends with a newline), in one write call, after this process's other lines."""
    stream = {1: sys.stdout, 2: sys.stderr}.get(fd)
    with _lock(fd):
        if stream is not None:  # what this process printed before comes first
            with contextlib.suppress(Exception):
                stream.flush()
        _write_all(fd, data)


def emit(line: str, fd: int = 1) -> None:
    """One line and its newline with one write call (what print(line, flush=True) does only when stdout
    is buffered)."""
    write_lines((line.rstrip("\n") + "\n").encode(errors="replace"), fd)


def sync_line(report: Any, loss: float, checksum: str, output: str, mean: float) -> str:
    """A trainer's line for one sync it reported (`report`, a SyncReport), which the demo's checker and the
    e2e tests parse (run_demo.parse_trainer): `checksum`, `output` and `mean` of the weights it sent."""
    return (f"sync v={report.version} epoch={report.epoch} loss={loss:.4f} checksum={checksum} "
            f"output={output} mean={mean:.6f} tensors={report.tensors} bytes={report.bytes} "
            f"seconds={report.seconds:.4f} gbps={report.gbps:.3f} acked={len(report.acked)} "
            f"transport={report.transport}")


def relay(source: IO[bytes], fd: int) -> threading.Thread:
    """Copies the complete lines read from `source` (a pipe) to `fd` as they come, each batch with one write
    call; a last line without its newline gets one. Ends when every writer of the pipe has closed it."""

    def run() -> None:
        tail = b""
        broken = False
        with source:
            while chunk := os.read(source.fileno(), READ_BYTES):
                data = tail + chunk
                end = data.rfind(b"\n") + 1
                tail = data[end:]
                if end and not broken:
                    try:
                        write_lines(data[:end], fd)
                    except OSError:  # nobody reads the container's output any more: keep draining the pipe
                        broken = True
            if tail and not broken:
                with contextlib.suppress(OSError):
                    write_lines(tail + b"\n", fd)

    thread = threading.Thread(target=run, name=f"relay-{fd}", daemon=True)
    thread.start()
    return thread


def spawn(argv: list[str]) -> tuple[subprocess.Popen[bytes], list[threading.Thread]]:
    """Starts `argv` with a stdout and a stderr of its own, relayed line by line to ours."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    return proc, [relay(proc.stdout, 1), relay(proc.stderr, 2)]


def drain(relays: Iterable[threading.Thread], timeout: float = 10.0) -> None:
    """Waits (up to `timeout` in all) until the relays have written everything their processes wrote."""
    deadline = time.monotonic() + timeout
    for thread in relays:
        thread.join(max(deadline - time.monotonic(), 0.0))
