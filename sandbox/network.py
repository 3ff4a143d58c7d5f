"""Pod networking: one bridge on the host, one network namespace and veth pair per pod.

Each state directory gets its own bridge (`wsbx<id>`), namespace prefix (`wsbx<id>-`) and /24 subnet
(10.77.<n>.0/24, or $WEIGHTSYNC_SANDBOX_SUBNET), derived from a hash of the directory's path, so two
sandboxes on one machine never touch each other's pods. The bridge holds the subnet's first address and
the API server listens there. There is no NAT and no default route in the pods: traffic stays between
this machine and its own namespaces.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

SUBNET_BASE = "10.77"


@dataclass(frozen=True)
class PodNetwork:
    """One sandbox's bridge, namespace prefix and pod subnet."""

    bridge: str
    netns_prefix: str
    network: ipaddress.IPv4Network

    @classmethod
    def for_state_dir(cls, state_dir: Path) -> PodNetwork:
        digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()
        subnet = (
            os.environ.get("WEIGHTSYNC_SANDBOX_SUBNET") or f"{SUBNET_BASE}.{int(digest[:4], 16) % 254}.0/24"
        )
        return cls(f"wsbx{digest[:6]}", f"wsbx{digest[:6]}-", ipaddress.IPv4Network(subnet))

    @property
    def gateway(self) -> str:
        return str(next(self.network.hosts()))

    @property
    def prefixlen(self) -> int:
        return self.network.prefixlen

    def pod_addresses(self) -> list[str]:
        return [str(a) for a in list(self.network.hosts())[1:]]

    def netns_name(self, pod_uid: str) -> str:
        return self.netns_prefix + pod_uid.replace("-", "")[:12]

    def list_netns(self) -> list[str]:
        """This sandbox's pod network namespaces."""
        return [
            line.split()[0]
            for line in ip("netns", "list", check=False).stdout.splitlines()
            if line.startswith(self.netns_prefix)
        ]


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Runs `ip` with `args`; raises an error naming the command and its message on failure."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


def _link_exists(name: str) -> bool:
    return ip("link", "show", name, check=False).returncode == 0


def ensure_bridge(net: PodNetwork) -> None:
    """Creates the bridge with the gateway address, unless it is there; refuses a subnet already routed."""
    cidr = f"{net.gateway}/{net.prefixlen}"
    if not _link_exists(net.bridge):
        for line in ip("-4", "route", "show").stdout.splitlines():
            dest = line.split()[0]
            if dest != "default" and ipaddress.IPv4Network(dest, strict=False).overlaps(net.network):
                raise RuntimeError(
                    f"the sandbox subnet {net.network} overlaps the route `{line}` (another sandbox?): "
                    "set WEIGHTSYNC_SANDBOX_SUBNET to a free private /24"
                )
        ip("link", "add", net.bridge, "type", "bridge")
    if cidr not in ip("-4", "addr", "show", "dev", net.bridge).stdout:
        ip("addr", "flush", "dev", net.bridge)
        ip("addr", "add", cidr, "dev", net.bridge)
    ip("link", "set", net.bridge, "up")


def delete_bridge(net: PodNetwork) -> None:
    if _link_exists(net.bridge):
        ip("link", "del", net.bridge)


def create_pod_netns(net: PodNetwork, name: str, address: str) -> None:
    """A fresh network namespace `name` with loopback and eth0 (address/prefix) wired to the bridge."""
    delete_netns(name)
    veth = "wv" + name[len(net.netns_prefix) :][:12]
    ip("link", "del", veth, check=False)
    ip("netns", "add", name)
    ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name)
    ip("link", "set", veth, "master", net.bridge)
    ip("link", "set", veth, "up")
    ip("-n", name, "addr", "add", f"{address}/{net.prefixlen}", "dev", "eth0")
    ip("-n", name, "link", "set", "eth0", "up")
    ip("-n", name, "link", "set", "lo", "up")


def netns_pids(name: str) -> list[int]:
    """The pids of every process inside network namespace `name`."""
    proc = ip("netns", "pids", name, check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def delete_netns(name: str) -> None:
    """Removes the namespace (its veth pair goes with it once no process holds it)."""
    ip("netns", "del", name, check=False)
