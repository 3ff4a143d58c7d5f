"""Container logs: every line a container's processes write reaches the log whole, and is read back whole.

The capture tests run the node agent's real path: a container process gets the pipes of
containerlog.capture (or is started by containers.start itself, as the pod worker does, where this runs as
root), its child processes write many short and long lines in pieces, buffered and unbuffered, and the log
is read back with the reader `kubectl logs` goes through.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from weightsync.sandbox import containerlog, containers
from weightsync.sandbox.containerlog import MAX_RECORD_BYTES, Line, LineSplitter, LogReader, RunStart
from weightsync.sandbox.kubelet_server import current_run, run_lines, since

DEMO_DIR = Path(__file__).resolve().parents[2] / "examples" / "demo"

# The lines the writers write, also computed here to check the log: `<name> <index> <payload>`, of lengths
# from a few bytes to several times a record's 16 KiB, never above `limit`.
LINE_SOURCE = r'''
def line(name, i, limit):
    import random
    rnd = random.Random(f"{name}-{i}")
    n = rnd.choice([rnd.randint(1, 200), rnd.randint(3900, 4200), rnd.randint(4097, 9000),
                    rnd.randint(8000, 70000)])
    head = f"{name} {i:05d} "
    body = "abcdefghijklmnopqrstuvwxyz0123456789-=+_ \t\u00e9\u4e2d"
    text = head + (body[i % len(body):] + body * (n // len(body) + 2))[:n]
    while len(text.encode()) > limit:
        text = text[: len(text) // 2]
    return text


def stream_of(fds, i):
    return fds[i % len(fds)]
'''
_ns: dict[str, Any] = {}
exec(LINE_SOURCE, _ns)
line: Callable[[str, int, int], str] = _ns["line"]
stream_of: Callable[[list[int], int], int] = _ns["stream_of"]

# One writer process: its lines, each to stdout or stderr, written
#   "pieces": cut at random places, every piece with its own write call (os.write, or an 8 KiB-buffered
#             file flushed now and then, which writes whatever it holds, mid-line), short sleeps in between;
#   "emit":   each with one write call (demo_log.emit), as the demo's programs write theirs.
WRITER = LINE_SOURCE + r'''
import os, random, sys, time

def main():
    name, fds, style = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    count, limit = int(sys.argv[4]), int(sys.argv[5])
    rnd = random.Random(name)
    time.sleep(max(float(os.environ["START_AT"]) - time.time(), 0))  # all writers at once
    if style == "emit":
        sys.path.insert(0, DEMO_DIR)
        import demo_log
        for i in range(count):
            demo_log.emit(line(name, i, limit), stream_of(fds, i))
            if rnd.random() < 0.05:
                time.sleep(0.001)
        return
    files = {fd: os.fdopen(os.dup(fd), "wb", buffering=8192) for fd in fds}
    for i in range(count):
        fd = stream_of(fds, i)
        data = (line(name, i, limit) + "\n").encode()
        cuts = sorted(rnd.sample(range(1, len(data)), min(rnd.randint(0, 4), len(data) - 1)))
        for start, end in zip([0, *cuts], [*cuts, len(data)]):
            piece = data[start:end]
            if rnd.random() < 0.5:
                files[fd].flush()
                view = memoryview(piece)
                while view:
                    view = view[os.write(fd, view):]
            else:
                files[fd].write(piece)
                if rnd.random() < 0.3:
                    files[fd].flush()
            if rnd.random() < 0.02:
                time.sleep(0.001)
    for f in files.values():
        f.flush()

import json
DEMO_DIR = sys.argv[6]
main()
'''

# The container: starts its writers sharing its stdout and stderr ("direct"), or each with pipes of its own
# that it relays in whole lines (demo_log.spawn, "relay", as inference.py starts its workers).
CONTAINER = r"""
import json, os, subprocess, sys, time
how, writers, demo_dir = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
os.environ["START_AT"] = str(time.time() + 1.0)
if how == "relay":
    sys.path.insert(0, demo_dir)
    import demo_log
    started = [demo_log.spawn(argv) for argv in writers]
    codes = [p.wait() for p, _ in started]
    demo_log.drain([t for _, threads in started for t in threads], timeout=60)
else:
    procs = [subprocess.Popen(argv) for argv in writers]
    codes = [p.wait() for p in procs]
print(f"container done {codes}", flush=True)
sys.exit(max(codes))
"""


def _scenario(tmp_path: Path, how: str, writers: list[dict[str, Any]]) -> list[str]:
    (tmp_path / "writer.py").write_text(WRITER)
    (tmp_path / "container.py").write_text(CONTAINER)
    argvs = [
        [sys.executable, str(tmp_path / "writer.py"), w["name"], json.dumps(w["fds"]), w["style"], str(w["count"]),
         str(w["limit"]), str(DEMO_DIR)]
        for w in writers
    ]
    return [sys.executable, str(tmp_path / "container.py"), how, json.dumps(argvs), str(DEMO_DIR)]


def _check(log_file: Path, writers: list[dict[str, Any]]) -> None:
    """Every writer's lines, each whole, in its order, on its stream; nothing else but the container's own."""
    lines = run_lines(containerlog.read_events(log_file.read_bytes(), complete=True), previous=False)
    stdout = [x.text for x in lines if x.stream == "stdout"]
    assert stdout, log_file.read_bytes()[:2000]
    assert stdout[-1] == "container done [0, 0]", stdout[-1][:500]  # (the streams' order is the pump's reads')
    for stream, fd in (("stdout", 1), ("stderr", 2)):
        got = [x.text for x in lines if x.stream == stream and not x.text.startswith("container done")]
        expected_total = 0
        for w in writers:
            expected = [line(w["name"], i, w["limit"]) for i in range(w["count"]) if stream_of(w["fds"], i) == fd]
            mine = [t for t in got if t.startswith(w["name"] + " ")]
            bad = [(a[:60], len(a), len(b)) for a, b in zip(mine, expected, strict=False) if a != b]
            assert (len(mine), bad[:3]) == (len(expected), []), f"{w['name']} on {stream}"
            expected_total += len(expected)
        strays = [t[:80] for t in got if not any(t.startswith(w["name"] + " ") for w in writers)]
        assert (len(got), strays[:3]) == (expected_total, []), f"fragments of lines on {stream}"


SCENARIOS = {
    # Each writer to its own stream, in pieces of any size: the runtime keeps a partial line per stream.
    "pieces-one-stream-each": (
        "direct",
        [dict(name="alpha", fds=[1], style="pieces", count=250, limit=1 << 30),
         dict(name="bravo", fds=[2], style="pieces", count=250, limit=1 << 30)],
    ),
    # Both on the same stdout and stderr, each line with one write call: whole up to PIPE_BUF (the kernel's
    # guarantee for a pipe shared by several writers; longer ones are what "relay" is for).
    "one-write-per-line-shared": (
        "direct",
        [dict(name="alpha", fds=[1, 1, 2], style="emit", count=600, limit=4095),
         dict(name="bravo", fds=[1, 2], style="emit", count=600, limit=4095)],
    ),
    # Both writing long lines in pieces, to stdout and stderr, through the container's relays (demo_log.spawn):
    # lines of any length from any number of processes reach the shared stdout whole.
    "pieces-relayed": (
        "relay",
        [dict(name="alpha", fds=[1, 1, 1, 2], style="pieces", count=250, limit=1 << 30),
         dict(name="bravo", fds=[1, 2], style="pieces", count=250, limit=1 << 30)],
    ),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_lines_of_processes_sharing_a_container_reach_its_log_whole(tmp_path: Path, scenario: str) -> None:
    how, writers = SCENARIOS[scenario]
    log_file = tmp_path / "logs" / "main.log"
    log_file.parent.mkdir()
    log_file.write_bytes(b"==== 2026-12-01T00:00:00 python container.py\n")
    output = containerlog.capture(log_file)
    try:
        proc = subprocess.Popen(_scenario(tmp_path, how, writers), stdout=output.stdout, stderr=output.stderr,
                                stdin=subprocess.DEVNULL)
    finally:
        output.started()
    assert proc.wait(timeout=240) == 0
    assert output.wait(60), "the pump did not end after the container's processes did"
    _check(log_file, writers)


def _can_start_containers() -> bool:
    if os.geteuid() != 0:
        return False
    probe = subprocess.run([containers.UNSHARE, "--mount", "--uts", "--", "true"], capture_output=True, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_start_containers(), reason="starting a container needs root (mount namespaces)")
def test_a_container_started_by_the_agent_logs_whole_lines(tmp_path: Path) -> None:
    """containers.start, as the pod worker calls it (the container's shim pumps its output); poll() says it
    ended only once the output is in the log."""
    how, writers = SCENARIOS["pieces-relayed"]
    log_file = tmp_path / "pod" / "logs" / "main.log"
    proc = containers.start(
        python=sys.executable,
        netns=None,
        spec_file=tmp_path / "pod" / "run" / "main.json",
        argv=_scenario(tmp_path, how, writers),
        env=dict(os.environ),
        mounts=[],
        hostname=None,
        working_dir=None,
        log_file=log_file,
    )
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() == 0
    proc.kill()  # as the pod worker does before it reports the container terminated
    assert proc.files.exit_code() == 0  # the shim records the exit only once the output is in the log
    _check(log_file, writers)


# -- the records ----------------------------------------------------------------------------------------


def _pieces(data: bytes, rnd: random.Random, most: int) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        n = rnd.randint(1, most)
        out.append(data[i : i + n])
        i += n
    return out


def test_records_in_any_pieces_give_back_the_lines_of_each_stream() -> None:
    rnd = random.Random(7)
    streams = {"stdout": LineSplitter("stdout"), "stderr": LineSplitter("stderr")}
    written: dict[str, list[str]] = {"stdout": [], "stderr": []}
    log = bytearray()
    for i in range(400):
        stream = rnd.choice(["stdout", "stderr"])
        n = rnd.choice([0, 5, MAX_RECORD_BYTES - 1, MAX_RECORD_BYTES, MAX_RECORD_BYTES + 1, 3 * MAX_RECORD_BYTES,
                        rnd.randint(1, 60000)])
        text = (f"{stream} {i} " + "x\u00e9" * n)[:n]
        written[stream].append(text)
        for piece in _pieces((text + "\n").encode(), rnd, 20000):  # the stream's bytes as the pump reads them
            log += streams[stream].feed(piece, containerlog.timestamp())
    for s in streams.values():
        assert s.end(containerlog.timestamp()) == b""
    assert max(len(r) for r in bytes(log).split(b"\n")) <= MAX_RECORD_BYTES + 40
    reader = LogReader()
    events: list[Line | RunStart] = []
    for piece in _pieces(bytes(log), rnd, 50000):  # a reader reading while the pump writes
        events += reader.feed(piece)
    assert reader.finish() == []
    got: dict[str, list[str]] = {"stdout": [], "stderr": []}
    for e in events:
        assert isinstance(e, Line)
        got[e.stream].append(e.text)
    assert got == written


def test_the_reader_gives_whole_lines_only() -> None:
    t = "2026-12-01T10:00:00.000000001Z"
    reader = LogReader()
    assert reader.feed(f"{t} stdout P first ".encode()) == []  # no newline yet: the pump is writing it
    assert reader.feed(b"part, \n") == []  # a P record: the rest of that line is not there yet
    assert reader.feed(f"{t} stderr F an error\n{t} stdout F and the end".encode()) == [Line(t, "stderr", "an error")]
    assert reader.feed(b"\n") == [Line(t, "stdout", "first part, and the end")]
    assert reader.feed(f"{t} stdout P cut off by the end of the stream\n".encode()) == []
    assert reader.finish() == [Line(t, "stdout", "cut off by the end of the stream")]


def test_a_partial_line_at_the_end_of_a_stream_is_a_line() -> None:
    splitter = LineSplitter("stdout")
    stamp = containerlog.timestamp(0)
    assert splitter.feed(b"one\ntw", stamp) == b"1970-01-01T00:00:00.000000000Z stdout F one\n"
    assert splitter.end(stamp) == b"1970-01-01T00:00:00.000000000Z stdout F tw\n"
    assert splitter.end(stamp) == b""


def test_runs_and_plain_text_logs() -> None:
    t = "2026-12-01T10:00:00.000000001Z"
    log = (f"==== 2026-12-01T10:00:00 python a\n{t} stdout F one\n{t} stdout P lost at a \n"
           f"==== 2026-12-01T10:00:05 python a\n{t} stderr F two\n{t} stdout F ==== 2026-12-01T10:00:09 x\n")
    events = containerlog.read_events(log.encode(), complete=True)
    assert [x.text for x in run_lines(events, previous=True)] == ["one", "lost at a "]  # its run had ended
    assert [x.text for x in run_lines(events, previous=False)] == ["two", "==== 2026-12-01T10:00:09 x"]
    assert run_lines(events, previous=False)[0].render(timestamps=True) == f"{t} two\n"
    assert "".join(containerlog.plain_text(events)).splitlines()[3] == "==== 2026-12-01T10:00:05 python a"
    # A log of the plain-text format before these records: lines without timestamps.
    assert current_run("==== 2026-12-01T10:00:00 python a\nplain\n", previous=False) == "plain\n"


def test_since_is_a_timestamp_of_the_log() -> None:
    assert since({"sinceTime": ["2026-12-01T10:00:00Z"]}) == "2026-12-01T10:00:00.000000000Z"
    assert since({"sinceSeconds": ["2"]}, now_ns=5_000_000_000) == "1970-01-01T00:00:03.000000000Z"
    assert since({}) is None
