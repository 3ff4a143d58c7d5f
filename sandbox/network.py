"""Pod networking: one bridge on the host, one network namespace and veth pair per pod.

The bridge carries a dedicated subnet (default 10.77.0.0/24, $WEIGHTSYNC_SANDBOX_SUBNET); the host side of
the bridge is the first address and the API server listens there. There is no NAT and no default route in
the pods: traffic stays between this machine and its own namespaces.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
from dataclasses import dataclass

BRIDGE = "wsbx0"
NETNS_PREFIX = "wsbx-"
VETH_PREFIX = "wsbxv"
DEFAULT_SUBNET = "10.77.0.0/24"


@dataclass(frozen=True)
class Subnet:
    """The pod subnet: the bridge (host) address and the range pods get addresses from."""

    network: ipaddress.IPv4Network

    @classmethod
    def from_env(cls) -> Subnet:
        return cls(ipaddress.IPv4Network(os.environ.get("WEIGHTSYNC_SANDBOX_SUBNET", DEFAULT_SUBNET)))

    @property
    def gateway(self) -> str:
        return str(next(self.network.hosts()))

    @property
    def prefixlen(self) -> int:
        return self.network.prefixlen

    def pod_addresses(self) -> list[str]:
        return [str(a) for a in list(self.network.hosts())[1:]]


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Runs `ip` with `args`; raises an error naming the command and its message on failure."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


def _link_exists(name: str) -> bool:
    return ip("link", "show", name, check=False).returncode == 0


def ensure_bridge(subnet: Subnet) -> None:
    """Creates the bridge with the gateway address, unless it is there; refuses a subnet already routed."""
    cidr = f"{subnet.gateway}/{subnet.prefixlen}"
    if not _link_exists(BRIDGE):
        for line in ip("-4", "route", "show").stdout.splitlines():
            dest = line.split()[0]
            if dest != "default" and ipaddress.IPv4Network(dest, strict=False).overlaps(subnet.network):
                raise RuntimeError(
                    f"the sandbox subnet {subnet.network} overlaps the route `{line}`: "
                    "set WEIGHTSYNC_SANDBOX_SUBNET to a free private range"
                )
        ip("link", "add", BRIDGE, "type", "bridge")
    if cidr not in ip("-4", "addr", "show", "dev", BRIDGE).stdout:
        ip("addr", "flush", "dev", BRIDGE)
        ip("addr", "add", cidr, "dev", BRIDGE)
    ip("link", "set", BRIDGE, "up")


def delete_bridge() -> None:
    if _link_exists(BRIDGE):
        ip("link", "del", BRIDGE)


def netns_name(pod_uid: str) -> str:
    return NETNS_PREFIX + pod_uid.replace("-", "")[:12]


def create_pod_netns(name: str, address: str, subnet: Subnet) -> None:
    """A fresh network namespace `name` with loopback and eth0 (address/prefix) wired to the bridge."""
    delete_netns(name)
    veth = VETH_PREFIX + name[len(NETNS_PREFIX) :][:10]
    ip("link", "del", veth, check=False)
    ip("netns", "add", name)
    ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name)
    ip("link", "set", veth, "master", BRIDGE)
    ip("link", "set", veth, "up")
    ip("-n", name, "addr", "add", f"{address}/{subnet.prefixlen}", "dev", "eth0")
    ip("-n", name, "link", "set", "eth0", "up")
    ip("-n", name, "link", "set", "lo", "up")


def netns_pids(name: str) -> list[int]:
    """The pids of every process inside network namespace `name`."""
    proc = ip("netns", "pids", name, check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def delete_netns(name: str) -> None:
    """Removes the namespace (its veth pair goes with it once no process holds it)."""
    ip("netns", "del", name, check=False)


def list_sandbox_netns() -> list[str]:
    return [
        line.split()[0]
        for line in ip("netns", "list", check=False).stdout.splitlines()
        if line.startswith(NETNS_PREFIX)
    ]
