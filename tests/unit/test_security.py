"""operator/security.py: the restricted profile filled in where a template is silent; the template's own
choices kept; IPC_LOCK only where the RDMA device goes."""

from __future__ import annotations

from weightsync.operator.security import harden


def test_a_silent_template_gets_the_restricted_profile() -> None:
    spec = {"containers": [{"name": "a"}, {"name": "b"}], "initContainers": [{"name": "i"}]}
    harden(spec, None)
    assert spec["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    for container in [*spec["initContainers"], *spec["containers"]]:
        assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def test_the_templates_own_settings_win() -> None:
    own = {"capabilities": {"drop": ["NET_RAW"], "add": ["SYS_PTRACE"]}, "allowPrivilegeEscalation": True}
    spec = {
        "securityContext": {"runAsUser": 0, "runAsNonRoot": False},
        "containers": [{"name": "a", "securityContext": own}],
    }
    harden(spec, None)
    assert spec["securityContext"]["runAsNonRoot"] is False and spec["securityContext"]["runAsUser"] == 0
    assert spec["containers"][0]["securityContext"] == {
        "allowPrivilegeEscalation": True, "capabilities": {"drop": ["NET_RAW"], "add": ["SYS_PTRACE"]}}  # fmt: skip


def test_ipc_lock_goes_only_to_containers_with_the_rdma_device() -> None:
    rdma = {"limits": {"rdma/ib": "1"}}
    spec = {"containers": [{"name": "a", "resources": rdma}, {"name": "b"}]}
    harden(spec, "rdma/ib")
    assert spec["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    assert spec["containers"][1]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    harden(spec, "rdma/ib")  # idempotent
    assert spec["containers"][0]["securityContext"]["capabilities"]["add"] == ["IPC_LOCK"]
