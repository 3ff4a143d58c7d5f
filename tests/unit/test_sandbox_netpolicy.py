"""The sandbox's NetworkPolicy ingress rules (sandbox/netpolicy.py) against the Kubernetes semantics."""

from __future__ import annotations

from typing import Any

from weightsync.sandbox.netpolicy import OPEN, Allow, PolicyIndex, matches, render_v4, render_v6

Obj = dict[str, Any]


def pod(name: str, ip: str | None, ns: str = "a", phase: str = "Running", ports: list[Obj] | None = None,
        **labels: str) -> Obj:
    return {
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"containers": [{"name": "c", "ports": ports or []}]},
        "status": {"phase": phase, **({"podIP": ip} if ip else {})},
    }


def policy(name: str, spec: Obj, ns: str = "a") -> Obj:
    return {"metadata": {"name": name, "namespace": ns}, "spec": spec}


def namespace(name: str, **labels: str) -> Obj:
    return {"metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name, **labels}}}


SERVER = pod("server", "10.0.0.10", app="server")
CLIENT = pod("client", "10.0.0.11", role="client")
OTHER = pod("other", "10.0.0.12", role="other")
REMOTE = pod("remote", "10.0.0.20", ns="b", role="client")
PODS = [SERVER, CLIENT, OTHER, REMOTE]
NAMESPACES = [namespace("a"), namespace("b", team="x")]
ON_SERVER = {"matchLabels": {"app": "server"}}


def rules(*policies: Obj, target: Obj = SERVER, pods: list[Obj] = PODS) -> list[Allow] | None:
    return PolicyIndex(policies, pods, NAMESPACES).rules_for(target)


def sources(found: list[Allow] | None) -> set[str]:
    assert found is not None
    return {a.source for a in found}


def test_a_pod_no_ingress_policy_selects_is_open() -> None:
    assert rules() is None
    assert rules(policy("p", {"podSelector": {"matchLabels": {"app": "nope"}}})) is None
    assert rules(policy("p", {"podSelector": {}}, ns="b")) is None, "another namespace's policy"
    egress_only = policy("p", {"podSelector": {}, "policyTypes": ["Egress"], "egress": []})
    assert rules(egress_only) is None


def test_a_selected_pod_without_ingress_rules_admits_nothing() -> None:
    assert rules(policy("p", {"podSelector": {}})) == [], "policyTypes omitted: Ingress"
    assert rules(policy("p", {"podSelector": ON_SERVER, "policyTypes": ["Ingress", "Egress"]})) == []


def test_peers_by_pod_and_namespace_selector() -> None:
    same_ns = {"ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}]}]}
    assert sources(rules(policy("p", {"podSelector": ON_SERVER, **same_ns}))) == {"10.0.0.11/32"}
    by_ns = {"ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "x"}}}]}]}
    assert sources(rules(policy("p", {"podSelector": ON_SERVER, **by_ns}))) == {"10.0.0.20/32"}
    every_ns = {"ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"role": "client"}}}]}]}
    assert sources(rules(policy("p", {"podSelector": ON_SERVER, **every_ns}))) == {"10.0.0.11/32", "10.0.0.20/32"}
    both_in_b = {"from": [{"namespaceSelector": {"matchLabels": {"team": "x"}},
                           "podSelector": {"matchLabels": {"role": "other"}}}]}
    assert sources(rules(policy("p", {"podSelector": ON_SERVER, "ingress": [both_in_b]}))) == set(), "AND"
    either = {"from": [{"namespaceSelector": {"matchLabels": {"team": "x"}}},
                       {"podSelector": {"matchLabels": {"role": "other"}}}]}
    assert sources(rules(policy("p", {"podSelector": ON_SERVER, "ingress": [either]}))) == {
        "10.0.0.20/32", "10.0.0.12/32"
    }, "two peers: OR"


def test_pods_without_an_address_or_ended_are_no_sources() -> None:
    waiting, ended = pod("w", None, role="client"), pod("e", "10.0.0.30", phase="Succeeded", role="client")
    found = rules(policy("p", {"podSelector": ON_SERVER, "ingress": [{"from": [{"podSelector": {}}]}]}),
                  pods=[*PODS, waiting, ended])
    assert sources(found) == {"10.0.0.10/32", "10.0.0.11/32", "10.0.0.12/32"}


def test_a_rule_without_from_admits_every_source_and_without_ports_every_port() -> None:
    found = rules(policy("p", {"podSelector": ON_SERVER, "ingress": [{}]}))
    assert found == [Allow("0.0.0.0/0", None, None, "a/p")]


def test_ip_blocks_minus_their_excepts() -> None:
    block = {"from": [{"ipBlock": {"cidr": "10.0.0.0/24", "except": ["10.0.0.0/25", "10.0.0.192/27"]}}]}
    assert sources(rules(policy("p", {"podSelector": ON_SERVER, "ingress": [block]}))) == {
        "10.0.0.128/26", "10.0.0.224/27"
    }
    v6 = {"from": [{"ipBlock": {"cidr": "fd00::/8"}}]}
    assert rules(policy("p", {"podSelector": ON_SERVER, "ingress": [v6]})) == [], "pods are IPv4 only"


def test_ports_protocols_ranges_and_named_ports() -> None:
    named = pod("server", "10.0.0.10", app="server",
                ports=[{"name": "store", "containerPort": 29500}, {"name": "dns", "containerPort": 53,
                                                                  "protocol": "UDP"}])
    ports = [
        {"port": 80},
        {"port": 9000, "endPort": 9010, "protocol": "UDP"},
        {"protocol": "SCTP"},
        {"port": "store"},
        {"port": "dns", "protocol": "UDP"},
        {"port": "dns"},  # TCP: the pod has no TCP port of that name
        {"port": "missing"},
    ]
    found = rules(policy("p", {"podSelector": ON_SERVER, "ingress": [{"ports": ports}]}), target=named)
    assert found is not None
    assert {(a.protocol, a.ports) for a in found} == {
        ("tcp", (80, 80)), ("udp", (9000, 9010)), ("sctp", None), ("tcp", (29500, 29500)), ("udp", (53, 53))
    }


def test_policies_add_up() -> None:
    web = policy("web", {"podSelector": ON_SERVER, "ingress": [{"ports": [{"port": 80}]}]})
    clients = policy("clients", {"podSelector": {}, "ingress": [
        {"from": [{"podSelector": {"matchLabels": {"role": "client"}}}]}
    ]})
    assert rules(web, clients) == [
        Allow("0.0.0.0/0", "tcp", (80, 80), "a/web"),
        Allow("10.0.0.11/32", None, None, "a/clients"),
    ]
    assert rules(web, clients, target=OTHER) == [Allow("10.0.0.11/32", None, None, "a/clients")]


def test_label_selector_expressions() -> None:
    labels = {"app": "x", "tier": "db"}
    assert matches({}, labels) and matches(None, labels)
    assert matches({"matchExpressions": [{"key": "app", "operator": "In", "values": ["x", "y"]}]}, labels)
    assert not matches({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["x"]}]}, labels)
    assert matches({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["x"]}]}, labels)
    assert matches({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}, labels)
    assert not matches({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}, labels)
    assert not matches({"matchLabels": {"app": "x"}, "matchExpressions": [{"key": "zone", "operator": "Exists"}]},
                       labels)


def test_the_operators_policy_admits_the_group_everywhere_and_the_operator_on_the_service_ports() -> None:
    group = {"matchLabels": {"weightsync.dev/name": "ws"}}
    operator_pods = {"matchLabels": {"app.kubernetes.io/part-of": "weightsync",
                                     "app.kubernetes.io/component": "operator"}}
    spec = {"podSelector": group, "policyTypes": ["Ingress"], "ingress": [
        {"from": [{"podSelector": group}]},
        {"from": [{"namespaceSelector": {}, "podSelector": operator_pods}], "ports": [{"port": 29500,
                                                                                      "protocol": "TCP"}]},
    ]}
    trainer = pod("ws-trainer-0", "10.0.0.2", **{"weightsync.dev/name": "ws"})
    worker = pod("ws-worker-0", "10.0.0.3", **{"weightsync.dev/name": "ws"})
    other_group = pod("other-trainer", "10.0.0.4", **{"weightsync.dev/name": "other"})
    operator = pod("operator", "10.0.0.5", ns="b", **operator_pods["matchLabels"])
    found = rules(policy("ws", spec), target=trainer, pods=[trainer, worker, other_group, operator])
    assert found == [
        Allow("10.0.0.2/32", None, None, "a/ws"),
        Allow("10.0.0.3/32", None, None, "a/ws"),
        Allow("10.0.0.5/32", "tcp", (29500, 29500), "a/ws"),
    ]
    assert rules(policy("ws", spec), target=other_group, pods=[trainer, other_group]) is None


def test_rendered_tables() -> None:
    assert OPEN[0] == "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
    text = render_v4([Allow("10.0.0.3/32", None, None, "a/ws"), Allow("10.0.0.5/32", "tcp", (80, 90), "a/ws")],
                     "10.0.0.1")
    assert text.splitlines()[4:-1] == [
        "-A INPUT -i lo -j ACCEPT",
        "-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        '-A INPUT -s 10.0.0.1/32 -m comment --comment "the node" -j ACCEPT',
        '-A INPUT -s 10.0.0.3/32 -m comment --comment "a/ws" -j ACCEPT',
        '-A INPUT -s 10.0.0.5/32 -p tcp --dport 80:90 -m comment --comment "a/ws" -j ACCEPT',
        "-A INPUT -p tcp -j REJECT --reject-with tcp-reset",
        "-A INPUT -p udp -j REJECT --reject-with icmp-port-unreachable",
        "-A INPUT -j DROP",
    ]
    assert "-j DROP" in render_v6(True) and "ipv6-icmp" in render_v6(True)


def test_selectors_of_several_labels_or_only_expressions() -> None:
    db = pod("db", "10.0.0.40", app="server", tier="db")
    zoned = pod("zoned", "10.0.0.41", role="client", zone="z")
    everyone = [*PODS, db, zoned]
    both = policy("both", {"podSelector": {"matchLabels": {"tier": "db", "app": "server"}}})
    assert rules(both, target=db, pods=everyone) == []
    assert rules(both, pods=everyone) is None, "one of the two labels only"
    exists = policy("exists", {"podSelector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]}})
    assert rules(exists, pods=everyone) == [] and rules(exists, target=CLIENT, pods=everyone) is None
    peer = {"from": [{"podSelector": {"matchLabels": {"zone": "z", "role": "client"}}}]}
    assert sources(rules(policy("p", {"podSelector": ON_SERVER, "ingress": [peer]}), pods=everyone)) == {"10.0.0.41/32"}
