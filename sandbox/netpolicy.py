"""NetworkPolicy ingress, as Kubernetes defines it, turned into one pod's iptables INPUT rules. Pure.

A pod that no policy with policyType Ingress selects is open. A selected pod admits only what some selecting
policy's `ingress` rule allows: a rule admits its `from` peers (none listed: every source) on its `ports`
(none listed: every port and protocol). A peer is a `podSelector` (pods of the policy's namespace), a
`namespaceSelector` (every pod of those namespaces), both (those pods of those namespaces) or an `ipBlock`
(a CIDR minus its `except`s). A port is a number (with `endPort`: a range) or a name (the selected pod's
container port of that name and protocol); `protocol` defaults to TCP. Label selectors have `matchLabels` and
`matchExpressions` (In, NotIn, Exists, DoesNotExist); `{}` matches everything.

Always admitted, as most network plugins do: loopback (the pod itself), replies and related packets of the
pod's own connections (conntrack), and the node's address (the agent's probes). Egress is not restricted.
Pods are IPv4 only: IPv6 (link-local addresses still exist) admits only loopback, replies and ICMPv6 on a
selected pod. What is refused: TCP with a reset, UDP with an ICMP port unreachable (a refused connection
fails at once, as with kube-router or Cilium's reject mode), anything else dropped.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

Obj = dict[str, Any]

ALL = "0.0.0.0/0"


def matches(selector: Obj | None, labels: dict[str, str]) -> bool:
    """Whether a LabelSelector matches `labels`; an empty selector matches all (a missing one: see callers)."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            return False  # the API server rejects others; match nothing rather than everything
    return True


def _labels(obj: Obj) -> dict[str, str]:
    return dict(obj.get("metadata", {}).get("labels") or {})


def is_ingress(policy: Obj) -> bool:
    """Whether the policy restricts ingress: policyTypes lists Ingress, or (omitted) always."""
    types = policy.get("spec", {}).get("policyTypes")
    return types is None or "Ingress" in types


def pod_address(pod: Obj) -> str | None:
    """The pod's IPv4 address while it holds one (not once it ended)."""
    if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
        return None
    ip = pod.get("status", {}).get("podIP")
    return str(ip) if ip and ":" not in str(ip) else None


@dataclass(frozen=True, order=True)
class Allow:
    """Traffic admitted: from `source` (a CIDR), `protocol` (tcp, udp, sctp; None: all) to `ports` (an
    inclusive range; None: all), because of `policy` (namespace/name)."""

    source: str
    protocol: str | None
    ports: tuple[int, int] | None
    policy: str


def _exclude(cidr: str, excepts: Iterable[str]) -> list[str]:
    """`cidr` minus the `excepts`, as CIDRs (IPv4 only: pods have no IPv6 address)."""
    try:
        remaining = [ipaddress.IPv4Network(cidr, strict=False)]
    except ValueError:
        return []
    for raw in excepts:
        try:
            cut = ipaddress.IPv4Network(raw, strict=False)
        except ValueError:
            continue
        nxt: list[ipaddress.IPv4Network] = []
        for net in remaining:
            if cut.supernet_of(net):
                continue
            nxt.extend(net.address_exclude(cut) if net.supernet_of(cut) else [net])
        remaining = nxt
    return sorted(str(n) for n in remaining)


class PolicyIndex:
    """The policies, pods and namespaces one node sees, indexed once; `rules_for` answers per pod.

    Peer addresses depend only on the policy, so they are resolved once per index (a change to any policy,
    pod address or label, or namespace label makes a new index), not once per selected pod."""

    def __init__(self, policies: Iterable[Obj], pods: Iterable[Obj], namespaces: Iterable[Obj]) -> None:
        # Indexed by one label of their selectors' matchLabels (the operator's policies, pods' group labels):
        # linear, not quadratic, in policies x pods (600 pods and 200 policies: a few ms per change).
        self.policies: dict[tuple[str, str, str] | str, list[Obj]] = {}  # (ns, key, value) or ns (no label)
        for p in policies:
            if is_ingress(p):
                self.policies.setdefault(_index_key(p["metadata"]["namespace"], p["spec"].get("podSelector")),
                                         []).append(p)
        self.namespace_labels = {n["metadata"]["name"]: _labels(n) for n in namespaces}
        self.addressed: dict[tuple[str, str, str] | str, list[tuple[Obj, str]]] = {}  # (ns, key, value) or ns
        for pod in pods:
            if ip := pod_address(pod):
                namespace = pod["metadata"]["namespace"]
                for key in [namespace, *((namespace, k, v) for k, v in _labels(pod).items())]:
                    self.addressed.setdefault(key, []).append((pod, ip))
        self._sources: dict[tuple[str, str], list[list[str]]] = {}
        self._peers: dict[str, list[str]] = {}  # the same peer in many policies (the operator's) resolved once

    def _ns_labels(self, namespace: str) -> dict[str, str]:
        # the API server sets kubernetes.io/metadata.name on every namespace; a namespace not seen yet has it too
        return self.namespace_labels.get(namespace) or {"kubernetes.io/metadata.name": namespace}

    def _peer_sources(self, namespace: str, peer: Obj) -> list[str]:
        if "ipBlock" in peer:
            block = peer["ipBlock"]
            return _exclude(block["cidr"], block.get("except") or [])
        pod_sel, ns_sel = peer.get("podSelector"), peer.get("namespaceSelector")
        if pod_sel is None and ns_sel is None:
            return []  # not a valid peer (the API server rejects it): admits nothing
        key = json.dumps([namespace if ns_sel is None else None, ns_sel, pod_sel], sort_keys=True)
        if key not in self._peers:
            spaces = [namespace] if ns_sel is None else [
                ns for ns in self.addressed if isinstance(ns, str) and matches(ns_sel, self._ns_labels(ns))
            ]
            self._peers[key] = [
                f"{ip}/32"
                for ns in spaces
                for pod, ip in self.addressed.get(_index_key(ns, pod_sel), [])
                if pod_sel is None or matches(pod_sel, _labels(pod))
            ]
        return self._peers[key]

    def _sources_of(self, policy: Obj) -> list[list[str]]:
        """Per ingress rule of `policy`, the source CIDRs it admits."""
        key = (policy["metadata"]["namespace"], policy["metadata"]["name"])
        if key not in self._sources:
            per_rule = []
            for rule in policy["spec"].get("ingress") or []:
                peers = rule.get("from") or []
                if not peers:
                    per_rule.append([ALL])
                    continue
                sources: list[str] = []
                for peer in peers:
                    sources.extend(s for s in self._peer_sources(key[0], peer) if s not in sources)
                per_rule.append(sources)
            self._sources[key] = per_rule
        return self._sources[key]

    def rules_for(self, pod: Obj) -> list[Allow] | None:
        """What `pod` admits; None when no Ingress policy selects it (open)."""
        namespace = pod["metadata"]["namespace"]
        labels = _labels(pod)
        candidates = [*self.policies.get(namespace, [])]
        for k, v in labels.items():
            candidates += self.policies.get((namespace, k, v), [])
        selecting = [p for p in candidates if matches(p["spec"].get("podSelector"), labels)]
        if not selecting:
            return None
        allowed: set[Allow] = set()
        for policy in selecting:
            name = f"{namespace}/{policy['metadata']['name']}"
            for rule, sources in zip(policy["spec"].get("ingress") or [], self._sources_of(policy), strict=True):
                for protocol, ports in _ports(rule.get("ports") or [], pod):
                    allowed.update(Allow(s, protocol, ports, name) for s in sources)
        return sorted(allowed)


def _index_key(namespace: str, selector: Obj | None) -> tuple[str, str, str] | str:
    """Where what `selector` can match is indexed: under one of its matchLabels, else the namespace."""
    required = sorted(((selector or {}).get("matchLabels") or {}).items())
    return (namespace, *required[0]) if required else namespace


def _ports(entries: list[Obj], pod: Obj) -> list[tuple[str | None, tuple[int, int] | None]]:
    """A rule's ports as (protocol, range); none listed: every protocol and port."""
    if not entries:
        return [(None, None)]
    found: list[tuple[str | None, tuple[int, int] | None]] = []
    for entry in entries:
        protocol = str(entry.get("protocol") or "TCP")
        port = entry.get("port")
        if port is None:
            found.append((protocol.lower(), None))
        elif isinstance(port, int):
            found.append((protocol.lower(), (port, int(entry.get("endPort") or port))))
        else:  # a named port: the selected pod's container port of that name and protocol
            found.extend(
                (protocol.lower(), (int(p["containerPort"]), int(p["containerPort"])))
                for c in pod.get("spec", {}).get("containers", [])
                for p in c.get("ports") or []
                if p.get("name") == port and str(p.get("protocol") or "TCP") == protocol
            )
    return found


def render_v4(rules: list[Allow] | None, node_ip: str) -> str:
    """iptables-restore input for the pod's filter table: empty (all accepted) when `rules` is None."""
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    if rules is not None:
        lines += [
            "-A INPUT -i lo -j ACCEPT",
            "-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
            f'-A INPUT -s {node_ip}/32 -m comment --comment "the node" -j ACCEPT',
        ]
        for r in rules:
            match = f"-s {r.source}"
            if r.protocol:
                match += f" -p {r.protocol}"
                if r.ports:
                    low, high = r.ports
                    match += f" --dport {low}" if low == high else f" --dport {low}:{high}"
            lines.append(f'-A INPUT {match} -m comment --comment "{r.policy}" -j ACCEPT')
        lines += [
            "-A INPUT -p tcp -j REJECT --reject-with tcp-reset",
            "-A INPUT -p udp -j REJECT --reject-with icmp-port-unreachable",
            "-A INPUT -j DROP",
        ]
    return "\n".join([*lines, "COMMIT", ""])


def render_v6(selected: bool) -> str:
    """ip6tables-restore input: a selected pod has no IPv6 peers to admit (pods are IPv4 only)."""
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    if selected:
        lines += [
            "-A INPUT -i lo -j ACCEPT",
            "-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
            "-A INPUT -p ipv6-icmp -j ACCEPT",
            "-A INPUT -p tcp -j REJECT --reject-with tcp-reset",
            "-A INPUT -j DROP",
        ]
    return "\n".join([*lines, "COMMIT", ""])


#: The tables of a pod no policy selects (and of a new network namespace): everything accepted.
OPEN = (render_v4(None, ""), render_v6(False))
