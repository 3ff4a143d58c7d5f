"""A pod's hosts file changes in place, and a reader never sees it empty or a name at another pod's address."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

from weightsync.sandbox.hostsfile import changes, rewrite

OWN = "10.77.0.5\tr0.grp.ns.svc.cluster.local r0.grp.ns.svc r0.grp.ns r0.grp r0"


def hosts_text(rng: random.Random) -> str:
    """Like render_hosts: the same first lines, then pods that come and go, of names of many lengths."""
    lines = ["# Managed by the weightsync sandbox node agent", "127.0.0.1\tlocalhost", OWN]
    for i in rng.sample(range(150), rng.randrange(0, 60)):
        name = f"p{i}-" + "x" * (i * 7 % 50)
        lines.append(f"10.77.{i // 250}.{i % 250 + 2}\t{name}.g.ns.svc.cluster.local {name}.g.ns.svc {name}.g.ns")
    rng.shuffle(lines[3:])
    return "\n".join(lines) + "\n"


def records(data: bytes) -> list[str]:
    """The lines a resolver takes from the file (not comments, not blank lines)."""
    return [line.rstrip() for line in data.decode().splitlines() if line.strip() and not line.startswith("#")]


def apply(data: bytes, writes: list[tuple[int, bytes]]) -> bytes:
    out = bytearray(data)
    for offset, chunk in writes:
        out[len(out) : offset + len(chunk)] = b"\0" * max(offset + len(chunk) - len(out), 0)
        out[offset : offset + len(chunk)] = chunk
    return bytes(out)


def test_each_write_shows_a_file_of_whole_lines_of_the_old_or_the_new_text() -> None:
    rng = random.Random(1)
    data = hosts_text(rng).encode()  # as rewrite writes a new file: whole, in one write
    for _ in range(300):
        old_text, text = records(data), hosts_text(rng)
        hidden, shown = changes(data, text)
        assert all(len(chunk) == 1 for _, chunk in shown)  # a line appears with a write of one byte
        valid = {*old_text, *records(text.encode())}
        step = data
        for write in [*hidden, *shown]:  # what a reader sees after each write
            step = apply(step, [write])
            assert OWN in records(step)
            assert set(records(step)) <= valid
        assert len(step) >= len(data)  # never shrinks
        assert sorted(records(step)) == sorted(records(text.encode()))
        assert step.startswith(data[: data.find(OWN.encode()) + len(OWN)])  # the first lines never move
        data = step


def test_freed_slots_are_reused_so_the_file_stays_small() -> None:
    rng = random.Random(2)
    data = b""
    for _ in range(500):
        hidden, shown = changes(data, hosts_text(rng))
        data = apply(data, [*hidden, *shown])
    assert len(data) < 4 * len(hosts_text(random.Random(0)).encode()) + 16 * 1024


def test_a_concurrent_reader_never_sees_an_empty_file_or_a_foreign_line(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    rng = random.Random(3)
    texts = [hosts_text(rng) for _ in range(20)]
    valid = {line for text in texts for line in records(text.encode())}
    rewrite(path, texts[0])
    inode = path.stat().st_ino
    stop = threading.Event()
    bad: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            with open(path, "rb", buffering=4096) as f:
                seen = records(f.read())
            if OWN not in seen or not set(seen) <= valid:
                bad.append("\n".join(sorted(set(seen) - valid)) or "no own line")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(3000):
            rewrite(path, texts[i % len(texts)])
    finally:
        stop.set()
        thread.join()
    assert not bad, bad[0]
    assert path.stat().st_ino == inode  # the same file: a bind mount of it sees every change
    assert sorted(records(path.read_bytes())) == sorted(records(texts[2999 % 20].encode()))


def test_rewrite_creates_a_missing_file_and_ends_an_unfinished_line(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    rewrite(path, "127.0.0.1\tlocalhost\n")
    assert path.read_text() == "127.0.0.1\tlocalhost\n"
    assert os.stat(path).st_mode & 0o777 == 0o644
    with open(path, "ab") as f:
        f.write(b"#10.77.0.9\tcut sh")  # a writer that died appending
    rewrite(path, "127.0.0.1\tlocalhost\n10.77.0.9\tr1\n")
    assert records(path.read_bytes()) == ["127.0.0.1\tlocalhost", "10.77.0.9\tr1"]
