"""The operator's NetworkPolicy per WeightSync, as the API server stores it: ingress to the group's pods only
from the group's own pods and from the operator; none when the spec says so."""

from __future__ import annotations

import pytest
from weightsync.operator import constants as c
from weightsync.sandbox import Sandbox

from .conftest import OperatorProcess
from .test_operator import apply, events, get, manifest, wait_ready
from .test_operator_honesty import wait_reconciles

pytestmark = pytest.mark.cluster


def test_the_group_gets_a_network_policy_admitting_only_its_pods_and_the_operator(
    sandbox: Sandbox, namespace: str, operator: OperatorProcess
) -> None:
    apply(sandbox, namespace, manifest(replicas=2, rendezvous={"port": 29600}))
    wait_ready(sandbox, namespace, 0, 3)
    policy = get(sandbox, namespace, "networkpolicy", "ws")
    assert policy is not None
    assert policy["metadata"]["ownerReferences"][0]["kind"] == "WeightSync"
    group = {"matchLabels": {c.NAME_LABEL: "ws"}}
    operator_pods = {
        "matchLabels": {"app.kubernetes.io/part-of": "weightsync", "app.kubernetes.io/component": "operator"}
    }
    assert policy["spec"] == {
        "podSelector": group,
        "policyTypes": ["Ingress"],
        "ingress": [
            {"from": [{"podSelector": group}]},
            {
                "from": [{"namespaceSelector": {}, "podSelector": operator_pods}],
                "ports": [{"port": 29600, "protocol": "TCP"}],
            },
        ],
    }
    wait_reconciles(operator, 3)
    assert not [m for m in events(sandbox, namespace, c.REASON_UPDATED) if "NetworkPolicy" in m], "a fixed point"


def test_no_network_policy_when_the_spec_says_so(sandbox: Sandbox, namespace: str, operator: OperatorProcess) -> None:
    apply(sandbox, namespace, manifest(replicas=1, network={"networkPolicy": False}))
    wait_ready(sandbox, namespace, 0, 2)
    assert get(sandbox, namespace, "networkpolicy", "ws") is None
