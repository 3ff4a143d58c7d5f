"""The chart grants exactly the operator's RBAC rules (`operator/rbac.py`), in every shape of install.

All namespaces: one ClusterRole with REQUIRED_RULES (+ ClusterKopfPeering access with peering). A list of
namespaces: a Role with REQUIRED_RULES (+ KopfPeering access with peering) in each, and nothing cluster-wide.
That every one of these rules is actually used is checked against a real API server's audit log in
tests/integration/test_chart_install.py.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from weightsync.operator.rbac import PEERING_RULES, REQUIRED_RULES

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "weightsync-operator"
Triple = tuple[str, str, str]


def helm_binary() -> str:
    bin_dir = os.environ.get("WEIGHTSYNC_SANDBOX_BIN_DIR")
    if not bin_dir:
        proc = subprocess.run(["bash", str(ROOT / "hack" / "build-sandbox-bins.sh")],
                              capture_output=True, text=True, timeout=90 * 60, check=True)
        bin_dir = proc.stdout.strip().splitlines()[-1]
    return str(Path(bin_dir) / "helm")


def render(*sets: str) -> list[dict[str, Any]]:
    args = [helm_binary(), "template", "ws", str(CHART), "--namespace", "ops"]
    for s in sets:
        args += ["--set", s]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def triples(rules: list[Any]) -> set[Triple]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}


def peering_triples(kind_plural: str) -> set[Triple]:
    """PEERING_RULES for one kind, less `get`: kopf lists, watches and patches its peering object but never
    reads one by name (the audit-log test in tests/integration/test_chart_install.py fails on an unused
    grant). Still exact if operator/rbac.py drops `get` too."""
    found = {t for t in triples(PEERING_RULES) if t[1] == kind_plural}
    assert found, f"operator/rbac.py PEERING_RULES do not cover {kind_plural}"
    return {t for t in found if t[2] != "get"}


REQUIRED = triples(REQUIRED_RULES)

SHAPES = {
    # name: (--set values, ClusterRole triples or None, per-namespace Role triples or None)
    "all-namespaces": ((), REQUIRED, None),
    "all-namespaces-peering": (("replicas=2", "peering.enabled=true"),
                               REQUIRED | peering_triples("clusterkopfpeerings"), None),
    "namespaced": (("watchNamespaces={a,b}",), None, REQUIRED),
    "namespaced-peering": (("watchNamespaces={a,b}", "peering.enabled=true"),
                           None, REQUIRED | peering_triples("kopfpeerings")),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_rendered_rules_equal_the_operators_rules(shape: str) -> None:
    sets, cluster, namespaced = SHAPES[shape]
    objs = render(*sets)
    cluster_roles = [o for o in objs if o["kind"] == "ClusterRole"]
    roles = [o for o in objs if o["kind"] == "Role"]
    if cluster is None:
        assert not cluster_roles, "nothing may be granted cluster-wide"
        assert not [o for o in objs if o["kind"] == "ClusterRoleBinding"]
    else:
        (cr,) = cluster_roles
        assert triples(cr["rules"]) == cluster
    if namespaced is None:
        assert not roles
    else:
        assert sorted(r["metadata"]["namespace"] for r in roles) == ["a", "b"]
        for role in roles:
            assert triples(role["rules"]) == namespaced


def test_rules_have_no_wildcards_or_escalation_verbs() -> None:
    dangerous = {"*", "escalate", "bind", "impersonate", "update", "deletecollection"}
    for sets, _, _ in SHAPES.values():
        for o in render(*sets):
            for rule in o.get("rules", []) if o["kind"] in ("ClusterRole", "Role") else []:
                assert "*" not in rule["resources"] and "*" not in rule["apiGroups"], rule
                assert not dangerous & set(rule["verbs"]), rule


def test_rbac_create_false_grants_nothing() -> None:
    objs = render("rbac.create=false")
    assert not [o for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")]
