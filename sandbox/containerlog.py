"""Container output, recorded the way a CRI container runtime records it, and read back in whole lines.

Each container gets one pipe for its stdout and one for its stderr (as containerd gives it two FIFOs). A pump
thread (of the container's shim, so the output outlives a node-agent restart) reads both, splits each stream
on newlines, keeps a stream's unfinished last line until its newline arrives (or the stream ends), and appends
one record per line to the container's log file:

    2026-11-28T20:00:00.123456789Z stdout F loaded v=3 epoch=0 rank=2 ...

(the CRI logging format: when the pump read it, which stream, F for a full line or P for a part of a longer
one, the line without its newline). A line longer than MAX_RECORD_BYTES is written as P records and a final F
record, which the reader joins again, per stream. The records of one read are appended with one write(2) to
the O_APPEND file, so a record is never cut or mixed with another writer's (a later run's pump, the run header),
and a reader keeps a record back until its newline is there. A run of the container starts with a line of its
own, `==== <time> <command>` (see containers.start), which no record can look like.

What the pump cannot do is tell apart two processes writing to the same stream: a pipe merges its writers'
bytes, and the kernel keeps a write whole only up to PIPE_BUF (4096) bytes, while the pipe has room for it.
A line written in pieces (Python's print under PYTHONUNBUFFERED=1 writes the text and its newline with two
write calls; a block-buffered stdout flushes every 8 KiB, mid-line) can be joined with another process's
line there. A real container runtime does the same, so programs whose processes share a stdout must write
each line with one write call, or give each process its own pipe (examples/demo/demo_log.py does both).

Lines of a plain-text log (the format before these records) are read as stdout lines without a timestamp.

The pump runs in the container's shim (shim.py), which loads this module by its path: standard library only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import selectors
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

STDOUT, STDERR = "stdout", "stderr"
#: Longer lines are recorded as several records, as containerd's max_container_log_line_size does (16 KiB).
MAX_RECORD_BYTES = 16 * 1024
#: Room in each pipe (the kernel's default is 64 KiB): a writer rarely waits for the pump, and a write
#: larger than PIPE_BUF is kept whole whenever the pipe has room for it.
PIPE_BYTES = 1 << 20
READ_BYTES = 256 * 1024
#: How long Process.kill waits for the pump to write what the container wrote before it ended.
DRAIN_S = 5.0

RUN_HEADER = re.compile(rb"==== \d{4}-\d\d-\d\dT")  # the line containers.start writes before each run
_RECORD = re.compile(rb"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)) (stdout|stderr) ([^ ]+)(?: |$)")


def timestamp(ns: int | None = None) -> str:
    """RFC 3339 with nanoseconds in UTC, fixed width (so timestamps sort as strings)."""
    ns = time.time_ns() if ns is None else ns
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 1_000_000_000)) + f".{ns % 1_000_000_000:09d}Z"


def encode_lines(stream: str, lines: Iterable[bytes], stamp: str) -> bytes:
    """The records of whole lines (without their newlines); a long line becomes P records and an F record."""
    out = bytearray()
    prefix = f"{stamp} {stream} ".encode()
    for line in lines:
        for start in range(0, len(line) - MAX_RECORD_BYTES, MAX_RECORD_BYTES):
            out += prefix + b"P " + line[start : start + MAX_RECORD_BYTES] + b"\n"
        last = (max(len(line) - 1, 0) // MAX_RECORD_BYTES) * MAX_RECORD_BYTES
        out += prefix + b"F " + line[last:] + b"\n"
    return bytes(out)


class LineSplitter:
    """One stream's bytes in, records of its whole lines out; the unfinished last line waits for its newline."""

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.tail = b""

    def feed(self, data: bytes, stamp: str) -> bytes:
        data = self.tail + data
        end = data.rfind(b"\n")
        lines = data[:end].split(b"\n") if end >= 0 else []
        self.tail = data[end + 1 :]
        out = encode_lines(self.stream, lines, stamp)
        if len(self.tail) > MAX_RECORD_BYTES:  # a very long line: its beginning goes out now, as P records
            cut = (len(self.tail) - 1) // MAX_RECORD_BYTES * MAX_RECORD_BYTES
            prefix = f"{stamp} {self.stream} P ".encode()
            out += b"".join(
                prefix + self.tail[i : i + MAX_RECORD_BYTES] + b"\n" for i in range(0, cut, MAX_RECORD_BYTES)
            )
            self.tail = self.tail[cut:]
        return out

    def end(self, stamp: str) -> bytes:
        """The stream ended: its unfinished line is over too."""
        tail, self.tail = self.tail, b""
        return encode_lines(self.stream, [tail], stamp) if tail else b""


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class LogPump(threading.Thread):
    """Reads a container's stdout and stderr pipes until every process holding them has closed them, and
    appends their lines to the log file as records."""

    def __init__(self, log_file: Path, out: int, fds: dict[int, str]) -> None:
        super().__init__(name=f"log-{log_file.parent.parent.name}/{log_file.stem}", daemon=True)
        self.log_file = log_file
        self.out = out  # the log file, opened O_APPEND
        self.fds = fds  # read end -> stream
        self.failed = False

    def run(self) -> None:
        out = self.out
        splitters = {fd: LineSplitter(stream) for fd, stream in self.fds.items()}
        try:
            with selectors.DefaultSelector() as selector:
                for fd in self.fds:
                    selector.register(fd, selectors.EVENT_READ)
                while selector.get_map():
                    for key, _ in selector.select():
                        fd = int(key.fd)
                        chunk = os.read(fd, READ_BYTES)
                        if chunk:
                            records = splitters[fd].feed(chunk, timestamp())
                        else:  # every writer closed it
                            selector.unregister(fd)
                            records = splitters[fd].end(timestamp())
                        if records:
                            self._append(out, records)
        finally:
            os.close(out)
            for fd in self.fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _append(self, out: int, records: bytes) -> None:
        try:
            _write_all(out, records)
        except OSError as e:  # a full disk: keep draining the pipes, so the container never blocks on them
            if not self.failed:
                sys.stdout.write(
                    f"[container-log {time.strftime('%H:%M:%S')}] cannot write {self.log_file}: {e}; "
                    "dropping that container's output until it can\n"
                )
                sys.stdout.flush()
            self.failed = True
        else:
            self.failed = False


@dataclass
class Capture:
    """The write ends a container gets as its stdout and stderr, and the pump reading the other ends."""

    stdout: int
    stderr: int
    pump: LogPump

    def started(self) -> None:
        """The container holds the write ends now: close ours (the pump ends when the container's are gone)."""
        for fd in (self.stdout, self.stderr):
            with contextlib.suppress(OSError):
                os.close(fd)

    def wait(self, timeout: float = DRAIN_S) -> bool:
        """Waits until everything written to the pipes is in the log; False when something still holds them."""
        self.pump.join(timeout)
        return not self.pump.is_alive()


def capture(log_file: Path) -> Capture:
    """Pipes for a container's stdout and stderr, and a started pump that writes their lines to `log_file`."""
    out = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    fds: dict[int, str] = {}
    ends: list[int] = []
    for stream in (STDOUT, STDERR):
        read, write = os.pipe()  # not inherited: Popen dup2()s the write end onto the child's 1 or 2
        with contextlib.suppress(OSError):
            fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        fds[read] = stream
        ends.append(write)
    pump = LogPump(log_file, out, fds)
    pump.start()
    return Capture(ends[0], ends[1], pump)


# -- reading ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    """One whole line of a container's output."""

    time: str  # when the runtime read it (RFC 3339); '' for a line of a plain-text log
    stream: str
    text: str  # without its newline

    def render(self, timestamps: bool = False) -> str:
        return f"{self.time} {self.text}\n" if timestamps and self.time else f"{self.text}\n"


@dataclass(frozen=True)
class RunStart:
    """The line the runtime writes before each run of the container."""

    header: str


class LogReader:
    """Reads a log file's bytes as they come, in any pieces: whole lines out, the P records of a long line
    joined with its F record (per stream), a record not yet ended by its newline held back."""

    def __init__(self) -> None:
        self.rest = b""
        self.pending: dict[str, tuple[str, list[bytes]]] = {}  # stream -> (time of the first part, parts)

    def feed(self, data: bytes) -> list[Line | RunStart]:
        data = self.rest + data
        end = data.rfind(b"\n") + 1
        self.rest = data[end:]
        out: list[Line | RunStart] = []
        for raw in data[: max(end - 1, 0)].split(b"\n") if end else []:
            out.extend(self._record(raw))
        return out

    def finish(self) -> list[Line | RunStart]:
        """Nothing more will be written (the container ended): what is held back is complete as it is."""
        rest, self.rest = self.rest, b""
        out = self._record(rest) if rest else []
        return [*out, *self._flush()]

    def _flush(self) -> list[Line | RunStart]:
        pending, self.pending = self.pending, {}
        return [Line(t, stream, b"".join(parts).decode(errors="replace")) for stream, (t, parts) in pending.items()]

    def _record(self, raw: bytes) -> list[Line | RunStart]:
        if RUN_HEADER.match(raw):
            return [*self._flush(), RunStart(raw.decode(errors="replace"))]  # a new run: the last one is over
        m = _RECORD.match(raw)
        if m is None:  # a plain-text log
            return [Line("", STDOUT, raw.decode(errors="replace"))]
        stamp, stream = m[1].decode(), m[2].decode()
        content = raw[m.end() :]
        first, parts = self.pending.pop(stream, (stamp, []))
        parts.append(content)
        if m[3].split(b":")[0] == b"P":
            self.pending[stream] = (first, parts)
            return []
        return [Line(first, stream, b"".join(parts).decode(errors="replace"))]


def read_events(data: bytes, complete: bool) -> list[Line | RunStart]:
    """Every line and run start of a log file's bytes; `complete`: nothing more will be written to it."""
    reader = LogReader()
    events = reader.feed(data)
    return [*events, *reader.finish()] if complete else events


def runs(events: Iterable[Line | RunStart]) -> list[list[Line]]:
    """The lines of each run, oldest run first (lines before the first run start are not a run's)."""
    out: list[list[Line]] = []
    for e in events:
        if isinstance(e, RunStart):
            out.append([])
        elif out:
            out[-1].append(e)
    return out


def plain_text(events: Iterable[Line | RunStart]) -> Iterator[str]:
    """The log as text: each run's header line, then its lines."""
    for e in events:
        yield f"{e.header}\n" if isinstance(e, RunStart) else e.render()
