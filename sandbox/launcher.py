"""Runs inside a pod's fresh mount and UTS namespaces (entered through nsenter + unshare), then execs.

Invoked as `python -I launcher.py <spec.json>` with the container's environment: bind-mounts the pod's
hosts file, resolv.conf and volumes over their paths, sets the pod's hostname, changes to the working
directory and execs the container's command. Standard library only: it must start fast and stand alone.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import sys

MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384

_libc = ctypes.CDLL(None, use_errno=True)


def _mount(source: str, target: str, flags: int) -> None:
    if _libc.mount(source.encode(), target.encode(), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount --bind {source} {target}: {os.strerror(err)}")


def bind(source: str, target: str, read_only: bool) -> None:
    """Bind-mounts `source` over `target`, creating an empty target (file or directory) when missing."""
    if not os.path.lexists(target):
        if os.path.isdir(source):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target) or "/", exist_ok=True)
            open(target, "a").close()
    _mount(source, target, MS_BIND | MS_REC)
    if read_only:
        _mount(source, target, MS_BIND | MS_REMOUNT | MS_RDONLY)


def _covered(path: str, targets: list[str]) -> bool:
    """Whether a mount over one of `targets` hides `path` (a target that is a proper ancestor of it)."""
    return any(path != t and path.startswith(t.rstrip("/") + "/") for t in targets)


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    mounts = spec["mounts"]
    keep = spec.get("keep", [])
    try:
        # Every source, and every path the container needs from the host (the project's code and its
        # Python), is opened before anything is mounted: an emptyDir over /tmp must not hide a checkout or a
        # state directory that lives below /tmp. Binds then come from the open descriptors.
        held = {p: os.open(p, os.O_PATH) for p in {*(m["source"] for m in mounts), *keep} if os.path.exists(p)}

        def source(path: str) -> str:
            return f"/proc/self/fd/{held[path]}" if path in held else path

        for m in mounts:
            bind(source(m["source"]), m["target"], bool(m.get("readOnly")))
        targets = [m["target"] for m in mounts]
        for path in keep:
            if path in held and _covered(path, targets):
                bind(source(path), path, False)
        if spec.get("hostname"):  # None: a hostNetwork pod keeps the node's name, as on a real node
            socket.sethostname(spec["hostname"])
        os.chdir(spec.get("workingDir") or "/")
    except OSError as e:
        print(f"weightsync sandbox: cannot set up the container: {e}", file=sys.stderr, flush=True)
        sys.exit(128)
    argv = spec["argv"]
    try:
        os.execvpe(argv[0], argv, dict(os.environ))
    except OSError as e:
        print(f"weightsync sandbox: cannot run {argv[0]!r}: {e}", file=sys.stderr, flush=True)
        sys.exit(127)


if __name__ == "__main__":
    main()
