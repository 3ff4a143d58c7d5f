"""Pod networking: one bridge on the host, one network namespace and veth pair per pod.

Each state directory gets its own bridge (`wsbx<id>`), namespace prefix (`wsbx<id>-`) and /24 subnet (the
first free 10.77.<n>.0/24 from a hash of the directory's path, or $WEIGHTSYNC_SANDBOX_SUBNET; pinned in
<state>/run/subnet), so two sandboxes on one machine never touch each other's pods. The bridge holds the
subnet's first address and the API server listens there. There is no NAT and no default route in the pods:
traffic stays between this machine and its own namespaces.
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
        """The state directory's network: as recorded there, else a new one (recorded by `record`)."""
        digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()
        bridge = f"wsbx{digest[:6]}"
        recorded = state_dir / "run" / "subnet"
        if recorded.exists():
            subnet = recorded.read_text().strip()
        elif os.environ.get("WEIGHTSYNC_SANDBOX_SUBNET"):
            subnet = os.environ["WEIGHTSYNC_SANDBOX_SUBNET"]
        else:
            subnet = _free_subnet(int(digest[:4], 16) % 254, bridge)
        return cls(bridge, f"{bridge}-", ipaddress.IPv4Network(subnet))

    def record(self, state_dir: Path) -> None:
        """Pins the subnet for this state directory (the node agent reads it back)."""
        (state_dir / "run").mkdir(parents=True, exist_ok=True)
        (state_dir / "run" / "subnet").write_text(str(self.network))

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


def _routes() -> list[tuple[str, ipaddress.IPv4Network]]:
    """(device, destination) of every IPv4 route but the default one."""
    found = []
    for line in ip("-4", "route", "show").stdout.splitlines():
        words = line.split()
        if words[0] != "default":
            dev = words[words.index("dev") + 1] if "dev" in words else ""
            found.append((dev, ipaddress.IPv4Network(words[0], strict=False)))
    return found


def _free_subnet(start: int, own_bridge: str) -> str:
    """The first 10.77.<n>.0/24 from n = start on that no route (but our own bridge's) overlaps."""
    taken = [net for dev, net in _routes() if dev != own_bridge]
    for i in range(254):
        candidate = ipaddress.IPv4Network(f"{SUBNET_BASE}.{(start + i) % 254}.0/24")
        if not any(candidate.overlaps(net) for net in taken):
            return str(candidate)
    raise RuntimeError(f"no free /24 left in {SUBNET_BASE}.0.0/16: set WEIGHTSYNC_SANDBOX_SUBNET")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Runs `ip` with `args`; raises an error naming the command and its message on failure."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


def link_exists(name: str) -> bool:
    return ip("link", "show", name, check=False).returncode == 0


def ensure_bridge(net: PodNetwork) -> None:
    """Creates the bridge with the gateway address, unless it is there; refuses a subnet already routed."""
    cidr = f"{net.gateway}/{net.prefixlen}"
    if not link_exists(net.bridge):
        for dev, dest in _routes():
            if dest.overlaps(net.network):
                raise RuntimeError(
                    f"the sandbox subnet {net.network} overlaps the route to {dest} via {dev} (another "
                    "sandbox?): run `down --purge` or set WEIGHTSYNC_SANDBOX_SUBNET to a free private /24"
                )
        ip("link", "add", net.bridge, "type", "bridge")
        # bridged pod traffic skips iptables: a FORWARD policy of DROP (Docker's) must not cut pods off
        ip(
            "link",
            "set",
            net.bridge,
            "type",
            "bridge",
            "nf_call_iptables",
            "0",
            "nf_call_ip6tables",
            "0",
            "nf_call_arptables",
            "0",
            check=False,
        )
    if cidr not in ip("-4", "addr", "show", "dev", net.bridge).stdout:
        ip("addr", "flush", "dev", net.bridge)
        ip("addr", "add", cidr, "dev", net.bridge)
    ip("link", "set", net.bridge, "up")


def delete_bridge(net: PodNetwork) -> None:
    if link_exists(net.bridge):
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


def netns_address(name: str) -> str | None:
    """The IPv4 address of eth0 in network namespace `name` (a pod's), None when it has none."""
    proc = ip("-n", name, "-4", "-o", "addr", "show", "dev", "eth0", check=False)
    words = proc.stdout.split()
    return words[words.index("inet") + 1].split("/")[0] if "inet" in words else None


def netns_pids(name: str) -> list[int]:
    """The pids of every process inside network namespace `name`."""
    proc = ip("netns", "pids", name, check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def delete_netns(name: str) -> None:
    """Removes the namespace (its veth pair goes with it once no process holds it)."""
    ip("netns", "del", name, check=False)


class AddressPool:
    """The pod addresses of one subnet, handed out round the subnet rather than lowest first.

    A pod re-created at once (a member replaced under the same name) would otherwise get the address its
    predecessor had, and every peer's neighbour (ARP) cache still maps that address to the deleted veth for
    up to ~30 s: connections to the new pod went unanswered until the entry expired (a replaced trainer was
    unreachable for 40 s). Real CNIs rarely hand an address straight back either. Not thread-safe: the
    agent holds its lock around every call."""

    def __init__(self, addresses: list[str]) -> None:
        self._addresses = addresses
        self._used: set[str] = set()
        self._next = 0  # where `take` looks first: just past the address it handed out last

    def take(self) -> str:
        for i in range(len(self._addresses)):
            address = self._addresses[(self._next + i) % len(self._addresses)]
            if address not in self._used:
                self._used.add(address)
                self._next = (self._next + i + 1) % len(self._addresses)
                return address
        raise RuntimeError(f"no free pod address left among {len(self._addresses)}")

    def hold(self, address: str) -> None:
        """An address already in use (a network namespace an earlier agent made)."""
        self._used.add(address)

    def release(self, address: str) -> None:
        self._used.discard(address)
