"""A pod's hosts file, changed in place so that a reader never sees it empty or a name at a wrong address.

Every container bind-mounts the pod's hosts file over /etc/hosts. A bind mount holds the inode, so the file
cannot be replaced by a rename: the agent must change it in place. Truncating and writing it (open "w") left a
window in which every reader saw an empty file, and so could not resolve even the pod's own hostname: a
program that asked at that moment failed or silently chose a fallback (gloo binds to the loopback address
when the hostname does not resolve, and its peers then wait on an address that never answers, until the
group's timeout). The file changes whenever a pod comes or goes anywhere in the cluster, and under load the
window is milliseconds long (the writer thread loses the CPU or the GIL between truncate and write).

Writing a whole new text over the old one in place is not enough either: a read that runs while the kernel
copies a write into the same page can get the first part of a line from one text and the rest from the
other, a name next to another pod's address. So each line keeps its place (its slot) while it is wanted, and
a slot changes from one line to another only through a comment, each step a write that no reader can see
half done:

* a line that is still wanted is not touched (the first lines, localhost and the pod's own names, never are);
* a line no longer wanted is turned into a comment by writing `#` over its first byte (one byte: whole or not
  at all);
* a new line goes into a slot that was free (a comment no text wants) before this change and is long enough,
  or at the end of the file: its bytes after the first go in first, behind the slot's `#`, then its first
  byte in a write of its own, which turns the comment into the line at once. A slot freed by this change is
  reused only by a later one.

A reader thus sees, for each line, the old one, a comment, or the new one. The file never shrinks.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path


def _free(raw: bytes) -> bool:
    return raw.startswith(b"#") or not raw.strip()


def changes(current: bytes, text: str) -> tuple[list[tuple[int, bytes]], list[tuple[int, bytes]]]:
    """The (offset, bytes) writes that turn the file's `current` bytes into the lines of `text`: first
    those that free slots and fill new lines in behind a `#`, then the one-byte writes that show them."""
    wanted = [line.rstrip().encode() for line in text.splitlines()]
    wanted = [line for line in wanted if line]
    missing = Counter(wanted)
    hidden: list[tuple[int, bytes]] = []
    shown: list[tuple[int, bytes]] = []
    if current and not current.endswith(b"\n"):  # an unfinished last line (a writer that died): end it
        hidden.append((len(current), b"\n"))
        current += b"\n"
    free: list[tuple[int, int]] = []  # (offset, length with the newline) of slots free before this change
    offset = 0
    for raw in current.splitlines(keepends=True):
        line = raw.rstrip()
        if missing[line] > 0:
            missing[line] -= 1  # still wanted: left where it is
        elif _free(raw):
            free.append((offset, len(raw)))
        else:
            hidden.append((offset, b"#"))
        offset += len(raw)
    end = offset
    for line in wanted:
        if missing[line] == 0:
            continue
        missing[line] -= 1
        slot = next((s for s in free if s[1] > len(line)), None)
        if slot is None:
            at, body = end, line[1:] + b"\n"
            hidden.append((at, b"#" + body))
            end += len(line) + 1
        else:
            free.remove(slot)
            at, body = slot[0], line[1:] + b" " * (slot[1] - len(line) - 1) + b"\n"
            hidden.append((at + 1, body))
        shown.append((at, line[:1]))
    return hidden, shown


def _coalesce(writes: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    for offset, data in sorted(writes):
        if out and out[-1][0] + len(out[-1][1]) == offset:
            out[-1] = (out[-1][0], out[-1][1] + data)
        else:
            out.append((offset, data))
    return out


def rewrite(path: Path, text: str) -> None:
    """Makes the file at `path` hold the lines of `text`, in place (same inode), as described above."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size == 0:  # a new file, which no container reads yet: all of it in one write
            writes = [(0, b"".join(line.rstrip().encode() + b"\n" for line in text.splitlines() if line.strip()))]
        else:
            hidden, shown = changes(os.pread(fd, size, 0), text)
            writes = _coalesce(hidden) + shown
        for offset, data in writes:
            view = memoryview(data)
            while view:
                view = view[os.pwrite(fd, view, offset + len(data) - len(view)) :]
    finally:
        os.close(fd)
