"""The iptables tools that enforce NetworkPolicy inside pods' network namespaces (see netpolicy.py).

The kernel's legacy x_tables (filter table, conntrack, REJECT) are what this needs; nftables and tc are not
used. No iptables userspace need be installed: `provide` uses, in this order, $WEIGHTSYNC_SANDBOX_IPTABLES
(the path of an `xtables-legacy-multi`, or `off`), one on PATH, one unpacked earlier under
`~/.cache/weightsync/tools/iptables-legacy/`, else fetches Debian's iptables package and its libraries with
`apt-get download` and unpacks them there with `dpkg -x` (nothing is installed; about a second). Without any
of these the sandbox runs without enforcing NetworkPolicy and says why (`Sandbox.network_policy`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("iptables", "libxtables12", "libip4tc2", "libip6tc2")
MULTI = "xtables-legacy-multi"
CACHE_NAME = "iptables-legacy"
TIMEOUT_S = 120
RECORD = "network-policy.json"  # in <state>/run: what `up` found, for the node agent and Sandbox.network_policy


@dataclass(frozen=True)
class Iptables:
    """An `xtables-legacy-multi` and the environment it runs with (its libraries and extensions)."""

    multi: str
    lib_dir: str = ""  # set for an unpacked package: LD_LIBRARY_PATH and XTABLES_LIBDIR

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.lib_dir:
            env["LD_LIBRARY_PATH"] = ":".join(filter(None, [self.lib_dir, env.get("LD_LIBRARY_PATH")]))
            env["XTABLES_LIBDIR"] = f"{self.lib_dir}/xtables"
        return env

    def restore(self, netns: str, v4: str, v6: str) -> None:
        """Replaces the filter tables of network namespace `netns` (each in one atomic step)."""
        for tool, text in (("iptables-restore", v4), ("ip6tables-restore", v6)):
            argv = ["nsenter", f"--net=/run/netns/{netns}", "--", self.multi, tool, "-w", "5"]
            proc = subprocess.run(argv, input=text, env=self.env(), capture_output=True, text=True,
                                  timeout=30, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"{tool} in {netns} failed: {proc.stderr.strip() or proc.returncode}")

    def works(self) -> str:
        """'' when it lists a filter table in a throw-away network namespace, else why not."""
        argv = ["unshare", "--net", "--", self.multi, "iptables", "-w", "5", "-L", "INPUT", "-n"]
        try:
            proc = subprocess.run(argv, env=self.env(), capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            return str(e)
        return "" if proc.returncode == 0 else (proc.stderr.strip() or f"exit code {proc.returncode}")


def cache_dir() -> Path:
    return Path(os.environ.get("WEIGHTSYNC_CACHE", Path.home() / ".cache" / "weightsync")) / "tools" / CACHE_NAME


def _unpacked(root: Path) -> Iptables | None:
    multi, lib = root / "usr" / "sbin" / MULTI, next(root.glob("usr/lib/*/libxtables.so.*"), None)
    return Iptables(str(multi), str(lib.parent)) if multi.is_file() and lib is not None else None


def fetch(root: Path) -> None:
    """Unpacks Debian's iptables and its libraries into `root` (apt-get download, dpkg -x; installs nothing)."""
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"no {tool} to fetch iptables with")
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{CACHE_NAME}-") as tmp:
        debs, unpacked = Path(tmp) / "debs", Path(tmp) / "root"
        debs.mkdir()
        proc = subprocess.run(["apt-get", "download", *PACKAGES], cwd=debs, capture_output=True, text=True,
                              timeout=TIMEOUT_S, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"apt-get download {' '.join(PACKAGES)} failed: {proc.stderr.strip()[-500:]}")
        for deb in sorted(debs.glob("*.deb")):
            subprocess.run(["dpkg", "-x", str(deb), str(unpacked)], capture_output=True, text=True,
                           timeout=TIMEOUT_S, check=True)
        shutil.rmtree(root, ignore_errors=True)
        os.replace(unpacked, root)  # whole or not at all: a second run never sees half a package


def provide(fetch_missing: bool = True) -> Iptables | str:
    """Working iptables tools, or why there are none (the sandbox then does not enforce NetworkPolicy)."""
    configured = os.environ.get("WEIGHTSYNC_SANDBOX_IPTABLES", "")
    if configured == "off":
        return "WEIGHTSYNC_SANDBOX_IPTABLES=off"
    candidates: list[Iptables] = []
    if configured:
        candidates.append(Iptables(configured))
    elif shutil.which(MULTI):
        candidates.append(Iptables(str(shutil.which(MULTI))))
    found = _unpacked(cache_dir())
    reasons = []
    if found is None and fetch_missing and not configured:
        try:
            fetch(cache_dir())
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            reasons.append(f"fetching iptables failed: {e}")
        found = _unpacked(cache_dir())
    if found is not None and not configured:
        candidates.append(found)
    for candidate in candidates:
        why = candidate.works()
        if not why:
            return candidate
        reasons.append(f"{candidate.multi}: {why}")
    return "; ".join(reasons) or f"no {MULTI} on PATH nor under {cache_dir()}"


def record(state_dir: Path, found: Iptables | str) -> None:
    """Records what `up` found (the tools, or why there are none) for the node agent and `network_policy`."""
    entry = found.__dict__ if isinstance(found, Iptables) else {"reason": found}
    (state_dir / "run" / RECORD).write_text(json.dumps(entry) + "\n")


def recorded(state_dir: Path) -> Iptables | str:
    """What `up` recorded: the tools, or why NetworkPolicy is not enforced."""
    try:
        entry = json.loads((state_dir / "run" / RECORD).read_text())
    except (OSError, ValueError):
        return f"{state_dir / 'run' / RECORD} is missing (the sandbox was not started by `up`)"
    return str(entry["reason"]) if "reason" in entry else Iptables(**entry)
