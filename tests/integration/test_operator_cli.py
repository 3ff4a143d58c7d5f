"""The operator's command line and its least-privilege RBAC rules (operator/rbac.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from weightsync.operator import rbac
from weightsync.operator.__main__ import parse_args
from weightsync.sandbox import Sandbox

from .conftest import OperatorProcess
from .test_operator import manifest, wait_ready

ROOT = Path(__file__).resolve().parents[2]


def test_watch_namespaces_from_flags_or_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WEIGHTSYNC_WATCH_NAMESPACES", raising=False)
    assert parse_args([]).namespace == []  # all namespaces
    assert parse_args(["--namespace", "a", "-n", "b"]).namespace == ["a", "b"]
    monkeypatch.setenv("WEIGHTSYNC_WATCH_NAMESPACES", "x, y,,")
    args = parse_args([])
    assert args.namespace == ["x", "y"]
    assert not args.standalone and args.peering == "weightsync-operator"
    assert args.liveness_port == 8080 and args.metrics_port == 9090
    assert parse_args(["--standalone"]).standalone


def test_operator_does_not_shadow_the_standard_library() -> None:
    code = "import operator, weightsync.operator.handlers; assert operator.add(1, 2) == 3"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.mark.cluster
def test_required_rules_suffice_for_a_full_reconcile(
    sandbox: Sandbox, namespace: str, crds: None, tmp_path: Path
) -> None:
    """The operator, as a ServiceAccount granted exactly REQUIRED_RULES, reconciles a WeightSync."""
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "weightsync-operator"}, "rules": rbac.REQUIRED_RULES}  # fmt: skip
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "weightsync-operator"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "weightsync-operator"},
        "subjects": [{"kind": "ServiceAccount", "name": "weightsync-operator", "namespace": namespace}],
    }  # fmt: skip
    sandbox.kubectl("create", "serviceaccount", "weightsync-operator", "-n", namespace)
    sandbox.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all([role, binding]))
    token = sandbox.kubectl("create", "token", "weightsync-operator", "-n", namespace).stdout.strip()
    admin: dict[str, Any] = yaml.safe_load(sandbox.kubeconfig.read_text())
    cluster = admin["clusters"][0]
    kubeconfig = tmp_path / "operator.kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "clusters": [cluster],
        "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": cluster["name"], "user": "operator"}}],
        "current-context": "operator",
    }))  # fmt: skip
    op = OperatorProcess(sandbox, namespace, tmp_path, "least-privilege")
    try:
        op.start(env={"KUBECONFIG": str(kubeconfig)})
        sandbox.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest(replicas=2)))
        wait_ready(sandbox, namespace, 0, 3)
        sandbox.kubectl("delete", "pod", "ws-inference-1", "-n", namespace, "--wait=false")
        wait_ready(sandbox, namespace, 1, 3)
        assert "forbidden" not in op.log_path.read_text().lower(), op.tail()
    finally:
        op.stop()
