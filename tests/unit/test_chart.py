"""The Helm chart without a cluster: `helm lint`, `helm template` for every scenario in the chart's ci/, the
restricted security context, the watch-namespaces and peering shapes, the values schema and its comments.

The rendered manifests are validated against the real API server's schemas in
tests/integration/test_chart_install.py (server-side dry-run on the sandbox).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tarfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "weightsync-operator"
SCENARIOS = sorted(CHART.glob("ci/*-values.yaml"))
RELEASE, NAMESPACE = "ws", "weightsync-system"
HELM_TIMEOUT_S = 60


@cache
def helm_binary() -> str:
    """helm from $WEIGHTSYNC_SANDBOX_BIN_DIR, else from hack/build-sandbox-bins.sh (instant once built)."""
    bin_dir = os.environ.get("WEIGHTSYNC_SANDBOX_BIN_DIR")
    if not bin_dir:
        proc = subprocess.run(
            ["bash", str(ROOT / "hack" / "build-sandbox-bins.sh")],
            capture_output=True, text=True, timeout=90 * 60, check=True,
        )
        bin_dir = proc.stdout.strip().splitlines()[-1]
    helm = Path(bin_dir) / "helm"
    assert helm.is_file(), f"no helm in {bin_dir}"
    return str(helm)


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [helm_binary(), *args], capture_output=True, text=True, timeout=HELM_TIMEOUT_S, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def render(values: dict[str, Any] | Path | None = None, *sets: str) -> list[dict[str, Any]]:
    """`helm template` of the chart; returns the rendered objects."""
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    if isinstance(values, Path):
        args += ["-f", str(values)]
    elif values is not None:
        args += ["--values", "-"]  # helm reads "-" from stdin
    for s in sets:
        args += ["--set", s]
    proc = subprocess.run(
        [helm_binary(), *args], input=yaml.safe_dump(values) if isinstance(values, dict) else None,
        capture_output=True, text=True, timeout=HELM_TIMEOUT_S, check=False,
    )
    assert proc.returncode == 0, f"helm template failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def render_error(values: dict[str, Any] | None = None, *sets: str) -> str:
    """The error of a `helm template` that must fail."""
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--values", "-"]
    for s in sets:
        args += ["--set", s]
    proc = subprocess.run(
        [helm_binary(), *args], input=yaml.safe_dump(values or {}),
        capture_output=True, text=True, timeout=HELM_TIMEOUT_S, check=False,
    )
    assert proc.returncode != 0, f"helm template accepted bad values {values} {sets}"
    return proc.stderr


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


# ---------------------------------------------------------------- lint and render every scenario


def test_ci_scenarios_exist() -> None:
    names = {p.name for p in SCENARIOS}
    assert {"default-values.yaml", "watch-namespaces-values.yaml", "ha-values.yaml",
            "monitoring-values.yaml"} <= names


def test_helm_lint_strict_default() -> None:
    out = helm("lint", "--strict", str(CHART)).stdout
    assert "1 chart(s) linted, 0 chart(s) failed" in out


@pytest.mark.parametrize("values", SCENARIOS, ids=lambda p: p.stem)
def test_helm_lint_strict_scenario(values: Path) -> None:
    helm("lint", "--strict", str(CHART), "-f", str(values))


@pytest.mark.parametrize("values", SCENARIOS, ids=lambda p: p.stem)
def test_every_object_is_labelled_and_namespaced_correctly(values: Path) -> None:
    objs = render(values)
    assert objs
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"}
    for o in objs:
        meta = o["metadata"]
        labels = meta["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE, meta
        assert labels["app.kubernetes.io/managed-by"] == "Helm", meta
        assert labels["helm.sh/chart"] == "weightsync-operator-0.1.0", meta
        if o["kind"] in cluster_scoped:
            assert "namespace" not in meta, meta
        else:
            assert meta["namespace"], meta
    names = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objs]
    assert len(names) == len(set(names)), f"duplicate objects: {names}"


# ---------------------------------------------------------------- the Deployment


def test_default_render_kinds() -> None:
    kinds = sorted(o["kind"] for o in render())
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "ServiceAccount"]


@pytest.mark.parametrize("values", SCENARIOS, ids=lambda p: p.stem)
def test_restricted_security_context(values: Path) -> None:
    """The Pod Security Standard "restricted", field by field (admission is tested on the sandbox)."""
    pod = one(render(values), "Deployment")["spec"]["template"]["spec"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] != 0
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsNonRoot"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert "privileged" not in sc
    for forbidden in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(forbidden)
    assert all("hostPath" not in v for v in pod.get("volumes", []))
    # A read-only root filesystem needs a writable /tmp.
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]


def test_deployment_runs_the_operator_module_with_probes_and_ports() -> None:
    objs = render()
    c = container(objs)
    assert c["command"] == ["python", "-m", "weightsync.operator"]
    assert c["args"] == ["--standalone"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"health": 8080, "metrics": 9090}
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["resources"]["requests"] == {"cpu": "100m", "memory": "128Mi"}
    assert c["resources"]["limits"] == {"memory": "512Mi"}
    assert c["image"] == "ghcr.io/weightsync/weightsync-operator:0.1.0"
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    dep = one(objs, "Deployment")
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}, "standalone: never two operators at once"
    pod = dep["spec"]["template"]
    assert pod["spec"]["serviceAccountName"] == one(objs, "ServiceAccount")["metadata"]["name"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    svc = one(objs, "Service")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"] == [
        {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}
    ]


def test_resources_and_scheduling_values_reach_the_pod() -> None:
    objs = render(CHART / "ci" / "custom-values.yaml")
    dep = one(objs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert dep["metadata"]["name"] == "ws-operator"
    assert c["image"] == ("registry.example.com/ml/weightsync-operator@sha256:"
                          "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
    assert c["imagePullPolicy"] == "Always"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["serviceAccountName"] == "ws-operator-existing"
    assert not by_kind(objs, "ServiceAccount"), "serviceAccount.create=false creates none"
    assert one(objs, "ClusterRoleBinding")["subjects"][0]["name"] == "ws-operator-existing"
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["tolerations"][0]["key"] == "dedicated"
    assert dep["spec"]["template"]["metadata"]["annotations"] == {"example.com/team": "ml-infra"}
    assert dep["spec"]["template"]["metadata"]["labels"]["example.com/tier"] == "control"
    assert {"name": "TZ", "value": "UTC"} in c["env"]
    assert not by_kind(objs, "Service"), "metrics.service.enabled=false"

    objs = render(CHART / "ci" / "monitoring-values.yaml")
    assert container(objs)["resources"] == {
        "requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}
    }


# ---------------------------------------------------------------- watch namespaces, peering, ServiceMonitor


def test_all_namespaces_uses_one_cluster_role() -> None:
    objs = render()
    assert not by_kind(objs, "Role") and not by_kind(objs, "RoleBinding")
    role, binding = one(objs, "ClusterRole"), one(objs, "ClusterRoleBinding")
    resources = {r for rule in role["rules"] for r in rule["resources"]}
    assert {"weightsyncs", "pods", "secrets"} <= resources
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": one(objs, "ServiceAccount")["metadata"]
                                    ["name"], "namespace": NAMESPACE}]


def test_watch_namespaces_uses_a_role_per_namespace() -> None:
    objs = render(CHART / "ci" / "watch-namespaces-values.yaml")
    assert container(objs)["args"] == ["--namespace=team-a", "--namespace=team-b", "--standalone"]
    roles, bindings = by_kind(objs, "Role"), by_kind(objs, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for b in bindings:
        assert b["roleRef"]["kind"] == "Role"
        assert b["subjects"][0]["namespace"] == NAMESPACE, "the ServiceAccount lives in the release namespace"
    # Nothing is granted cluster-wide: the operator needs nothing cluster-scoped then.
    assert not by_kind(objs, "ClusterRole") and not by_kind(objs, "ClusterRoleBinding")
    role_resources = {r for rule in roles[0]["rules"] for r in rule["resources"]}
    assert {"weightsyncs", "pods", "secrets"} <= role_resources


def test_peering_cluster_wide() -> None:
    objs = render(CHART / "ci" / "ha-values.yaml")
    dep = one(objs, "Deployment")
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["strategy"]["type"] == "RollingUpdate"
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert "args" not in container(objs), "peering on, all namespaces: no flags"
    peering = one(objs, "ClusterKopfPeering")
    assert peering["apiVersion"] == "kopf.dev/v1"
    assert peering["metadata"]["name"] == "weightsync-operator"
    assert not by_kind(objs, "KopfPeering")
    rules = one(objs, "ClusterRole")["rules"]
    assert any(rule["resources"] == ["clusterkopfpeerings"] for rule in rules)
    assert not any("kopfpeerings" in rule["resources"] for rule in rules)


def test_peering_namespaced() -> None:
    objs = render(CHART / "ci" / "ha-namespaced-values.yaml")
    peerings = by_kind(objs, "KopfPeering")
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["team-a", "team-b"]
    assert {p["metadata"]["name"] for p in peerings} == {"weightsync-operator"}
    assert not by_kind(objs, "ClusterKopfPeering")
    for role in by_kind(objs, "Role"):
        assert any(rule["resources"] == ["kopfpeerings"] for rule in role["rules"])
    assert not by_kind(objs, "ClusterRole")


def test_no_peering_grants_nothing_for_peering() -> None:
    for values in (None, CHART / "ci" / "watch-namespaces-values.yaml"):
        objs = render(values)
        for role in by_kind(objs, "ClusterRole") + by_kind(objs, "Role"):
            assert not any(rule["apiGroups"] == ["kopf.dev"] for rule in role["rules"])


def test_service_monitor() -> None:
    assert not by_kind(render(), "ServiceMonitor")
    objs = render(CHART / "ci" / "monitoring-values.yaml")
    sm = one(objs, "ServiceMonitor")
    svc = one(objs, "Service")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert sm["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s",
                                        "scrapeTimeout": "5s"}]
    assert svc["spec"]["ports"][0]["port"] == 8443
    assert svc["metadata"]["annotations"] == {"prometheus.io/scrape": "true"}


# ---------------------------------------------------------------- values.schema.json and values.yaml


BAD_VALUES: list[tuple[dict[str, Any], list[str], str]] = [
    ({}, ["replicas=-1"], "/replicas"),
    ({}, ["replicas=many"], "/replicas"),
    ({"replicas": 2}, [], "replicas=2 needs peering.enabled=true"),
    ({"replicas": 3, "peering": {"enabled": False}}, [], "replicas=3 needs peering.enabled=true"),
    ({"image": {"pullPolicy": "Sometimes"}}, [], "/image/pullPolicy"),
    ({"image": {"digest": "md5:abc"}}, [], "/image/digest"),
    ({"image": {"repository": ""}}, [], "/image/repository"),
    ({"watchNamespaces": ["Team_A"]}, [], "/watchNamespaces/0"),
    ({"watchNamespaces": ["a", "a"]}, [], "/watchNamespaces"),
    ({"watchNamespaces": "team-a"}, [], "/watchNamespaces"),
    ({"replica": 1}, [], "replica"),
    ({"metrics": {"service": {"port": 70000}}}, [], "/metrics/service/port"),
    ({"metrics": {"serviceMonitor": {"interval": "often"}}}, [], "/metrics/serviceMonitor/interval"),
    ({"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}}, [],
     "metrics.service.enabled=true"),
    ({"serviceAccount": {"create": False}}, [], "serviceAccount.name is required when serviceAccount.create"),
    ({"resources": {"limits": {"memory": "lots"}}}, [], "/resources/limits/memory"),
    ({"probes": {"liveness": {"periodSeconds": 0}}}, [], "/probes/liveness/periodSeconds"),
]


@pytest.mark.parametrize(("values", "sets", "names"), BAD_VALUES, ids=lambda v: str(v)[:40])
def test_schema_rejects_bad_values_naming_the_field(
    values: dict[str, Any], sets: list[str], names: str
) -> None:
    err = render_error(values, *sets)
    assert names in err, f"error does not name {names!r}:\n{err}"


def test_replicas_minus_one_message() -> None:
    err = render_error({}, "replicas=-1")
    assert "values don't meet the specifications of the schema" in err
    assert "/replicas" in err and "minimum" in err


def test_replicas_without_peering_message() -> None:
    err = render_error({"replicas": 2})
    assert "replicas=2 needs peering.enabled=true: without kopf peering every replica would act" in err


def _values_keys(tree: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield f"{prefix}{k}"
            yield from _values_keys(v, f"{prefix}{k}.")


def test_every_values_key_has_a_comment() -> None:
    """Each key line of values.yaml is directly preceded by a comment line (its documentation)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    key_re = re.compile(r"^(\s*)([A-Za-z][\w.-]*):(\s|$)")
    undocumented = []
    keys_seen = 0
    for i, line in enumerate(lines):
        m = key_re.match(line)
        if not m:
            continue
        keys_seen += 1
        prev = lines[i - 1].strip() if i else ""
        if not prev.startswith("#"):
            undocumented.append(f"values.yaml:{i + 1}: {line.strip()}")
    assert keys_seen == len(list(_values_keys(yaml.safe_load((CHART / "values.yaml").read_text()))))
    assert not undocumented, "keys without a comment line above them:\n" + "\n".join(undocumented)


def test_schema_covers_every_values_key() -> None:
    """values.schema.json describes every key of values.yaml (typos are refused, so each must be declared)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = []

    def walk(tree: dict[str, Any], node: dict[str, Any], prefix: str) -> None:
        for key, val in tree.items():
            sub = node.get("properties", {}).get(key)
            if sub is None:
                missing.append(prefix + key)
                continue
            assert "description" in sub, f"{prefix}{key} has no description in the schema"
            if isinstance(val, dict) and val and sub.get("properties"):
                walk(val, sub, f"{prefix}{key}.")

    walk(values, schema, "")
    assert not missing, f"values without a schema entry: {missing}"


def test_defaults_satisfy_schema_and_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["type"] == "application"
    pyproject = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M)
    assert version and chart["appVersion"] == version.group(1), "appVersion follows the package version"
    assert (CHART / "README.md").is_file()
    assert (CHART / "templates" / "NOTES.txt").is_file()


def test_chart_crds_hold_every_kind_the_templates_create() -> None:
    """Helm installs crds/ before the templates: the WeightSync CRD and kopf's peering CRDs (the chart creates
    a ClusterKopfPeering or KopfPeerings) must be there, the same files as the repository's crds/."""
    crds = {}
    for path in sorted((CHART / "crds").glob("*.yaml")):
        assert path.read_text() == (ROOT / "crds" / path.name).read_text(), f"{path.name} differs from crds/"
        for doc in yaml.safe_load_all(path.read_text()):
            crds[doc["spec"]["names"]["kind"]] = doc["spec"]["group"]
    assert crds == {
        "WeightSync": "weightsync.dev", "KopfPeering": "kopf.dev", "ClusterKopfPeering": "kopf.dev"
    }
    kinds = {o["kind"] for values in SCENARIOS for o in render(values)}
    assert {"KopfPeering", "ClusterKopfPeering"} <= kinds


def test_helm_package(tmp_path: Path) -> None:
    """The packaged chart carries the CRDs, the schema and the README, and leaves the ci/ scenarios out."""
    helm("package", str(CHART), "--destination", str(tmp_path))
    (archive,) = tmp_path.glob("weightsync-operator-*.tgz")
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    for member in ("crds/weightsync.dev_weightsyncs.yaml", "crds/kopf.dev_peerings.yaml", "values.schema.json",
                   "README.md", "templates/NOTES.txt", "templates/deployment.yaml"):
        assert f"weightsync-operator/{member}" in names
    assert not any("/ci/" in n for n in names)
