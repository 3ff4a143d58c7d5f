"""Member pods under the API server's own Pod Security admission: `restricted` admits them as generated, and
what the spec asks for beyond it (hostNetwork, IPC_LOCK for an RDMA device) is all that it refuses."""

from __future__ import annotations

import re

import pytest
from weightsync.operator import constants as c
from weightsync.sandbox import Sandbox

from .conftest import OperatorProcess
from .test_operator import apply, manifest, pods, wait_ready, wait_status

pytestmark = pytest.mark.cluster


def enforce(sandbox: Sandbox, namespace: str, level: str) -> None:
    sandbox.kubectl("label", "namespace", namespace, "--overwrite", f"pod-security.kubernetes.io/enforce={level}",
                    "pod-security.kubernetes.io/enforce-version=latest")  # fmt: skip


def test_generated_members_pass_restricted_admission(
    sandbox: Sandbox, namespace: str, operator: OperatorProcess
) -> None:
    enforce(sandbox, namespace, "restricted")
    apply(sandbox, namespace, manifest(replicas=2))
    wait_ready(sandbox, namespace, 0, 3)
    for pod in pods(sandbox, namespace).values():
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in spec["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_only_what_the_spec_asks_for_goes_beyond_restricted(
    sandbox: Sandbox, namespace: str, operator: OperatorProcess
) -> None:
    enforce(sandbox, namespace, "restricted")
    asks = {"network": {"hostNetwork": True, "rdmaResource": "rdma/ib"}, "transport": {"backend": "nccl"},
            "rendezvous": {"port": 31877}}  # fmt: skip
    apply(sandbox, namespace, manifest(replicas=1, **asks))
    st = wait_status(
        sandbox, namespace, "refused by Pod Security admission",
        lambda s: any(x["type"] == "Ready" and x["reason"] == c.REASON_CHILD_REJECTED for x in s.get("conditions", [])),
    )  # fmt: skip
    message = next(x["message"] for x in st["conditions"] if x["type"] == "Ready")
    assert 'violates PodSecurity "restricted:latest"' in message, message
    # each refused pod names its violations: exactly the two the spec asked for
    refused = re.findall(r'violates PodSecurity "restricted:latest": ([^;]*?)(?:$|;)', message)
    assert refused, message
    for violations in refused:
        named = sorted(re.findall(r"(?:^|, )([a-z ]+) \(", violations))
        assert named == ["host namespaces", "unrestricted capabilities"], violations
        assert "hostNetwork=true" in violations and '"IPC_LOCK"' in violations, violations
    assert pods(sandbox, namespace) == {}
    # a namespace that grants them admits the group as it is
    enforce(sandbox, namespace, "privileged")
    wait_status(sandbox, namespace, "members created", lambda s: s.get("ready", "").endswith("/2")
                and len(pods(sandbox, namespace)) == 2)  # fmt: skip
    trainer = pods(sandbox, namespace)["ws-trainer-0"]["spec"]
    assert trainer["hostNetwork"] is True
    assert trainer["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
