"""The Helm chart on the sandbox's real control plane.

- every ci/ scenario, rendered by `helm template`, passes the API server's own validation (server-side
  dry-run, strict field validation) and Pod Security admission at the `restricted` level;
- `helm install` runs the operator as a pod on the sandbox node, in a namespace that enforces the
  `restricted` Pod Security Standard, under the chart's ServiceAccount (its token, not admin), and that
  operator reconciles a WeightSync through create, scale up and down, drift repair and delete (RBAC
  sufficiency: no request of the operator is forbidden, and the work gets done);
- RBAC minimality: every (resource, verb) the chart grants was used by the operator during that run,
  read from the API server's audit log;
- `helm upgrade` with changed values (namespaced mode, two replicas with peering, other resources) is
  applied in place and the operator keeps working; `helm uninstall` leaves nothing of the release behind
  but the CRDs, which Helm never deletes.
"""

from __future__ import annotations

import json
import secrets
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from weightsync.sandbox.waiting import wait_for

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "weightsync-operator"
SCENARIOS = sorted(CHART.glob("ci/*-values.yaml"))
NODE = "sandbox-node-0"
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/warn": "restricted",
    "pod-security.kubernetes.io/audit": "restricted",
}
OPERATOR_READY_S = 180
RECONCILE_S = 120
T = TypeVar("T")

# A member's process in the sandbox: waits for SIGTERM (the node agent runs the command as a local process;
# the image is ignored).
IDLE = ["python", "-c", "import signal; signal.sigwait({signal.SIGTERM}); print('bye')"]


# ------------------------------------------------------------------------------------------------ helpers


def kjson(sandbox: Any, *args: str) -> Any:
    return json.loads(sandbox.kubectl(*args, "-o", "json").stdout)


def items(sandbox: Any, *args: str) -> list[dict[str, Any]]:
    return kjson(sandbox, "get", *args)["items"]


def poll(condition: Callable[[], T | None], timeout: float, what: str,
         describe: Callable[[], str] | None = None) -> T:
    return wait_for(condition, timeout=timeout, what=what, interval=0.25, describe=describe)


def make_namespace(sandbox: Any, prefix: str, labels: dict[str, str] | None = None) -> str:
    name = f"{prefix}-{secrets.token_hex(3)}"
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}}
    sandbox.kubectl("apply", "-f", "-", input=json.dumps(ns))
    return name


def delete_namespace(sandbox: Any, name: str) -> None:
    sandbox.kubectl("delete", "namespace", name, "--ignore-not-found", "--wait=false")


def apply_crds(sandbox: Any) -> None:
    """The chart's CRDs, as `helm install` would create them (the dry-runs render CRs of kopf's kinds)."""
    sandbox.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CHART / "crds"))
    for crd in ("weightsyncs.weightsync.dev", "kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"):
        sandbox.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")


def weightsync(name: str, replicas: int) -> dict[str, Any]:
    def template(container: str) -> dict[str, Any]:
        spec = {"name": container, "image": "weightsync-runtime:dev", "command": IDLE}
        return {"spec": {"containers": [spec]}}

    return {
        "apiVersion": "weightsync.dev/v1alpha1",
        "kind": "WeightSync",
        "metadata": {"name": name},
        "spec": {
            "trainer": {"template": template("trainer")},
            "inference": {"replicas": replicas, "template": template("engine")},
            "transport": {"backend": "gloo"},
        },
    }


def owned_by(obj: dict[str, Any], uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences", []))


class Release:
    """One `helm install` of the chart into a fresh namespace that enforces Pod Security `restricted`."""

    def __init__(self, sandbox: Any) -> None:
        self.sandbox = sandbox
        self.namespace = make_namespace(sandbox, "wsop", RESTRICTED)
        self.name = "wsop"
        self.fullname = f"{self.name}-weightsync-operator"
        self.user = f"system:serviceaccount:{self.namespace}:{self.fullname}"
        self.installed = False

    def helm(self, verb: str, *args: str) -> str:
        return self.sandbox.helm(verb, self.name, *args, "--namespace", self.namespace, timeout=400).stdout

    def install(self, *args: str) -> str:
        self.installed = True
        return self.helm_waiting("install", *args)

    def upgrade(self, *args: str) -> str:
        return self.helm_waiting("upgrade", *args)

    def helm_waiting(self, verb: str, *args: str) -> str:
        """install/upgrade --wait; on failure the message carries the operator pods' state and logs."""
        try:
            return self.helm(verb, str(CHART), "--wait", f"--timeout={OPERATOR_READY_S}s", *args)
        except Exception as e:
            pods = [(p["metadata"]["name"], p["status"]) for p in self.operator_pods()]
            raise AssertionError(f"helm {verb} failed: {e}\npods: {pods}\n{self.logs()}") from e

    def uninstall(self) -> None:
        if self.installed:
            self.helm("uninstall", "--wait", "--timeout=120s")
            self.installed = False

    def operator_pods(self) -> list[dict[str, Any]]:
        return items(self.sandbox, "pods", "-n", self.namespace,
                     "-l", "app.kubernetes.io/name=weightsync-operator,app.kubernetes.io/instance=wsop")

    def logs(self) -> str:
        return "\n".join(
            f"--- {p['metadata']['name']}\n"
            + self.sandbox.pod_log(self.namespace, p["metadata"]["name"], "operator")[-6000:]
            for p in self.operator_pods()
        )


@pytest.fixture
def release(sandbox: Any) -> Iterator[Release]:
    rel = Release(sandbox)
    try:
        yield rel
    finally:
        rel.uninstall()
        delete_namespace(sandbox, rel.namespace)


# ------------------------------------------------------------------------------------------------ audit log


def audit_offset(sandbox: Any) -> int:
    """Where the audit log ends now: audit_events(since=) reads only the requests after it."""
    return Path(sandbox.audit_log).stat().st_size


def audit_events(sandbox: Any, user: str, since: int, pods: set[str]) -> list[dict[str, Any]]:
    """The requests of one user made from the given pods (a bound ServiceAccount token names its pod), from
    the API server's audit log (JSON lines), one per audit ID."""
    seen: dict[str, dict[str, Any]] = {}
    with open(sandbox.audit_log, encoding="utf-8") as f:
        f.seek(since)
        for line in f:
            if f'"{user}"' not in line:
                continue
            ev = json.loads(line)
            who = ev.get("user", {})
            pod = who.get("extra", {}).get("authentication.kubernetes.io/pod-name", [None])[0]
            if who.get("username") == user and pod in pods:
                seen[ev["auditID"]] = ev
    return list(seen.values())


def request_key(ev: dict[str, Any]) -> tuple[str, str, str] | None:
    ref = ev.get("objectRef")
    if not ref or "resource" not in ref:
        return None  # discovery (/api, /apis, /version): granted to every authenticated user
    resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
    return ref.get("apiGroup", ""), resource, ev["verb"]


def granted(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}


def forbidden(events: list[dict[str, Any]]) -> list[str]:
    """Requests that RBAC refused (not those refused by admission, e.g. in a namespace being deleted)."""
    return sorted({f"{ev['verb']} {ev['requestURI']}" for ev in events
                   if ev.get("annotations", {}).get("authorization.k8s.io/decision") == "forbid"})


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("values", SCENARIOS, ids=lambda p: p.stem)
def test_rendered_chart_passes_server_side_validation(sandbox: Any, values: Path) -> None:
    apply_crds(sandbox)
    release_ns = make_namespace(sandbox, "wsop-dry", RESTRICTED)
    watched = [make_namespace(sandbox, "team"), make_namespace(sandbox, "team")]
    try:
        args = ["template", "wsop", str(CHART), "--namespace", release_ns, "-f", str(values)]
        if yaml.safe_load(values.read_text()).get("watchNamespaces"):
            args += ["--set", f"watchNamespaces={{{','.join(watched)}}}"]
        docs = [d for d in yaml.safe_load_all(sandbox.helm(*args).stdout) if d]
        # The ServiceMonitor's CRD (prometheus-operator) is not in the sandbox: checked field by field in
        # tests/unit/test_chart.py::test_service_monitor instead.
        docs = [d for d in docs if d["kind"] != "ServiceMonitor"]
        assert any(d["kind"] == "Deployment" for d in docs)
        proc = sandbox.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-",
                               input=yaml.safe_dump_all(docs))
        assert proc.stdout.count("(server dry run)") == len(docs), proc.stdout
        # Pod Security admission warns about a Deployment whose pods `restricted` would reject.
        assert "PodSecurity" not in proc.stderr and "violate" not in proc.stderr, proc.stderr
        # ...as it does for a weakened one (so the check above can fail).
        weak = [d for d in yaml.safe_load_all(sandbox.helm(
            *args, "--set", "securityContext.allowPrivilegeEscalation=true").stdout) if d]
        weak_deployment = next(d for d in weak if d["kind"] == "Deployment")
        proc = sandbox.kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump(weak_deployment))
        assert 'would violate PodSecurity "restricted' in proc.stderr, proc.stderr
    finally:
        for ns in (release_ns, *watched):
            delete_namespace(sandbox, ns)


def assert_least_privilege(
    sandbox: Any, release: Release, rules: list[dict[str, Any]], since: int, delegated: list[dict[str, Any]]
) -> None:
    """For the operator pods running now (not a replaced one, which loses its grant when an upgrade switches
    the RBAC shape and may be refused until it is gone). Sufficiency: none of their requests was forbidden.
    Minimality: every granted (apiGroup, resource, verb) was used in a request, or delegated: the API server
    lets the operator create a Role only with rules it holds itself (the trainer's report Role grants get and
    patch on a pod)."""
    pods = {p["metadata"]["name"] for p in release.operator_pods()}
    events = audit_events(sandbox, release.user, since, pods)
    assert events, f"no request of {release.user} from {pods} in the audit log"
    assert not forbidden(events), f"forbidden requests of the operator: {forbidden(events)}"
    used = {k for ev in events if (k := request_key(ev))}
    unused = granted(rules) - used - granted(delegated)
    assert not unused, f"granted but never used by the operator: {sorted(unused)}\nused: {sorted(used)}"


def assert_denials_are_caught(sandbox: Any, release: Release, tmp_path: Path) -> None:
    """Control for assert_least_privilege: a request that RBAC refuses, made with the operator's
    ServiceAccount token bound to a running operator pod, is found by audit_events() and forbidden()."""
    pod = release.operator_pods()[0]["metadata"]["name"]
    token = sandbox.kubectl("create", "token", release.fullname, "-n", release.namespace,
                            "--bound-object-kind=Pod", f"--bound-object-name={pod}").stdout.strip()
    admin = yaml.safe_load(sandbox.kubectl("config", "view", "--raw", "--minify").stdout)
    cluster = admin["clusters"][0]["cluster"]
    kubeconfig = tmp_path / "operator-token.kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "op",
        "clusters": [{"name": "sb", "cluster": cluster}],
        "users": [{"name": "op", "user": {"token": token}}],
        "contexts": [{"name": "op", "context": {"cluster": "sb", "user": "op"}}],
    }))
    since = audit_offset(sandbox)
    denied = sandbox.kubectl("--kubeconfig", str(kubeconfig), "get", "configmaps", "-n", release.namespace,
                             check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr, denied.stderr

    def caught() -> list[str]:
        return forbidden(audit_events(sandbox, release.user, since, {pod}))

    (request,) = poll(caught, 30, "the denied request in the audit log")
    assert request.startswith(f"list /api/v1/namespaces/{release.namespace}/configmaps"), request


def test_install_reconcile_rbac_upgrade_uninstall(sandbox: Any, release: Release, tmp_path: Path) -> None:
    """The whole life of a release, with the operator as a pod under the chart's ServiceAccount."""
    work = make_namespace(sandbox, "wsop-work")
    fast_resync = ("--set", "extraArgs={--resync-seconds=3}")  # Roles are repaired on the periodic resync
    try:
        since = audit_offset(sandbox)
        out = release.install(*fast_resync)
        assert "NOTES:" in out and "all namespaces" in out and "Helm never deletes CRDs" in out
        for crd in ("weightsyncs.weightsync.dev", "kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"):
            # Installed from the chart's crds/ unless an earlier test applied them already.
            sandbox.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
        (pod,) = release.operator_pods()
        assert pod["spec"]["nodeName"] == NODE
        assert pod["spec"]["serviceAccountName"] == release.fullname
        assert pod["status"]["phase"] == "Running"
        assert any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"]["conditions"])

        delegated = exercise_operator(sandbox, release, work, "demo")
        assert_metrics_served(sandbox, release, pod)
        cluster_role = kjson(sandbox, "get", "clusterrole", f"{release.fullname}-{release.namespace}")
        assert_least_privilege(sandbox, release, cluster_role["rules"], since, delegated)

        # Upgrade: namespaced mode on the work namespace, two replicas with peering, other resources.
        since = audit_offset(sandbox)
        release.upgrade(*fast_resync, "--set", f"watchNamespaces={{{work}}}", "--set", "replicas=2",
                        "--set", "peering.enabled=true", "--set", "resources.limits.memory=768Mi")
        deployment = kjson(sandbox, "get", "deployment", release.fullname, "-n", release.namespace)
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["args"] == [f"--namespace={work}", "--resync-seconds=3"]
        assert container["resources"]["limits"]["memory"] == "768Mi"
        assert deployment["status"].get("readyReplicas") == 2
        poll(lambda: len(release.operator_pods()) == 2, OPERATOR_READY_S, "the old operator pod to be gone")
        gone = sandbox.kubectl("get", "clusterrole", f"{release.fullname}-{release.namespace}", check=False)
        assert gone.returncode != 0 and "NotFound" in gone.stderr, "namespaced: nothing cluster-wide"
        role = kjson(sandbox, "get", "role", release.fullname, "-n", work)
        kjson(sandbox, "get", "kopfpeering", "weightsync-operator", "-n", work)
        delegated = exercise_operator(sandbox, release, work, "after-upgrade")
        assert_least_privilege(sandbox, release, role["rules"], since, delegated)

        # Upgrade back to all namespaces, keeping two replicas with peering: the Roles go, the ClusterRole
        # (now with ClusterKopfPeering access) comes back.
        since = audit_offset(sandbox)
        release.upgrade(*fast_resync, "--set", "replicas=2", "--set", "peering.enabled=true")
        poll(lambda: len(release.operator_pods()) == 2, OPERATOR_READY_S, "the old operator pods to be gone")
        gone = sandbox.kubectl("get", "role", release.fullname, "-n", work, check=False)
        assert gone.returncode != 0 and "NotFound" in gone.stderr
        kjson(sandbox, "get", "clusterkopfpeering", "weightsync-operator")
        delegated = exercise_operator(sandbox, release, work, "cluster-peering")
        cluster_role = kjson(sandbox, "get", "clusterrole", f"{release.fullname}-{release.namespace}")
        assert "clusterkopfpeerings" in {r for rule in cluster_role["rules"] for r in rule["resources"]}
        assert_least_privilege(sandbox, release, cluster_role["rules"], since, delegated)
        assert_denials_are_caught(sandbox, release, tmp_path)

        # Uninstall: nothing of the release is left but the CRDs.
        release.uninstall()

        def leftovers() -> list[str]:
            return sandbox.kubectl(
                "get", "deployments,replicasets,pods,services,serviceaccounts,roles,rolebindings,"
                "clusterroles,clusterrolebindings,kopfpeerings,clusterkopfpeerings",
                "-A", "-l", "app.kubernetes.io/instance=wsop", "-o", "name",
            ).stdout.split()

        # The garbage collector removes the ReplicaSet and its pods after helm deleted the Deployment.
        poll(lambda: not leftovers(), 120, "nothing of the release to be left after helm uninstall",
             lambda: f"left: {leftovers()}")
        for crd in ("weightsyncs.weightsync.dev", "kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"):
            kjson(sandbox, "get", "crd", crd)  # kept by design
    finally:
        sandbox.kubectl("delete", "weightsyncs", "--all", "-n", work, "--wait=false", check=False)
        delete_namespace(sandbox, work)


def assert_metrics_served(sandbox: Any, release: Release, pod: dict[str, Any]) -> None:
    """The metrics Service selects the operator pod on its `metrics` port, which serves Prometheus text."""
    service = f"{release.fullname}-metrics"

    def endpoint() -> tuple[str, int] | None:
        for eps in items(sandbox, "endpointslices", "-n", release.namespace,
                         "-l", f"kubernetes.io/service-name={service}"):
            ports = {p.get("name"): p.get("port") for p in eps.get("ports") or []}
            for ep in eps.get("endpoints") or []:
                if ep.get("targetRef", {}).get("name") == pod["metadata"]["name"] and "metrics" in ports:
                    return ep["addresses"][0], ports["metrics"]
        return None

    address, port = poll(endpoint, 60, f"an endpoint of Service {service} on the operator pod")
    assert port == 9090 and address == pod["status"]["podIP"]
    with urllib.request.urlopen(f"http://{address}:{port}/metrics", timeout=10) as rsp:
        text = rsp.read().decode()
    assert "weightsync_reconciles_total" in text, text[:2000]


def exercise_operator(sandbox: Any, release: Release, ns: str, name: str) -> list[dict[str, Any]]:
    """Create a WeightSync, see its children and status, scale it up and down, break its children (deleted
    and modified) and see them repaired, delete it: the operator uses every verb its code has. Returns the
    rules of the report Role the operator created (which it must hold itself)."""
    describe = release.logs
    sandbox.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(weightsync(name, replicas=2)))
    uid = kjson(sandbox, "get", "weightsync", name, "-n", ns)["metadata"]["uid"]

    def members() -> list[dict[str, Any]]:
        return [p for p in items(sandbox, "pods", "-n", ns) if owned_by(p, uid)]

    def status() -> dict[str, Any]:
        return kjson(sandbox, "get", "weightsync", name, "-n", ns).get("status", {})

    def ready_with(n_inference: int) -> bool:
        st = status()
        pods = members()
        return (st.get("phase") == "Ready" and st.get("worldSize") == 1 + n_inference
                and len(pods) == 1 + n_inference
                and all(p["status"].get("phase") == "Running" for p in pods))

    poll(lambda: ready_with(2), RECONCILE_S, f"{name} Ready with 3 members", describe)
    pods = sorted(p["metadata"]["name"] for p in members())
    assert pods == [f"{name}-inference-0", f"{name}-inference-1", f"{name}-trainer-0"]
    assert all(p["spec"]["nodeName"] == NODE for p in members())
    service = kjson(sandbox, "get", "service", name, "-n", ns)
    assert owned_by(service, uid) and service["spec"]["clusterIP"] == "None"
    assert owned_by(kjson(sandbox, "get", "secret", f"{name}-token", "-n", ns), uid)
    st = status()
    assert st["observedGeneration"] == kjson(sandbox, "get", "weightsync", name, "-n", ns)["metadata"][
        "generation"]
    assert {c["type"] for c in st["conditions"]} >= {"Ready"}

    epoch = status().get("epoch")
    sandbox.kubectl("scale", "weightsync", name, "-n", ns, "--replicas=3")
    poll(lambda: ready_with(3), RECONCILE_S, f"{name} scaled up to 3 inference replicas", describe)
    sandbox.kubectl("scale", "weightsync", name, "-n", ns, "--replicas=1")
    poll(lambda: ready_with(1), RECONCILE_S, f"{name} scaled down to 1 inference replica", describe)
    assert status().get("epoch", 0) > (epoch or 0)

    # Drift: the Service, the Secret and a member pod come back.
    sandbox.kubectl("delete", "service", name, "-n", ns)
    sandbox.kubectl("delete", "secret", f"{name}-token", "-n", ns)
    sandbox.kubectl("delete", "pod", f"{name}-inference-0", "-n", ns, "--wait=false")
    poll(lambda: owned_by(kjson(sandbox, "get", "service", name, "-n", ns), uid), RECONCILE_S,
         "the Service to be re-created", describe)
    poll(lambda: owned_by(kjson(sandbox, "get", "secret", f"{name}-token", "-n", ns), uid), RECONCILE_S,
         "the Secret to be re-created", describe)
    poll(lambda: ready_with(1), RECONCILE_S, f"{name} Ready again after drift", describe)

    # Drift of fields: the Service, the trainer's report Role and RoleBinding, the NetworkPolicy are patched back.
    role_name = f"{name}-trainer-report"
    role = kjson(sandbox, "get", "role", role_name, "-n", ns)
    binding = kjson(sandbox, "get", "rolebinding", role_name, "-n", ns)
    assert owned_by(role, uid) and owned_by(binding, uid)
    sandbox.kubectl("patch", "service", name, "-n", ns, "--type=merge",
                    "-p", '{"spec": {"publishNotReadyAddresses": false}}')
    narrowed = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]
    sandbox.kubectl("patch", "role", role_name, "-n", ns, "--type=merge",
                    "-p", json.dumps({"rules": narrowed}))
    sandbox.kubectl("patch", "rolebinding", role_name, "-n", ns, "--type=merge",
                    "-p", json.dumps({"subjects": [{"kind": "ServiceAccount", "name": "nobody",
                                                    "namespace": ns}]}))
    policy = kjson(sandbox, "get", "networkpolicy", name, "-n", ns)
    sandbox.kubectl("patch", "networkpolicy", name, "-n", ns, "--type=merge",
                    "-p", '{"spec": {"ingress": [{}]}}')  # admit everything
    poll(lambda: kjson(sandbox, "get", "service", name, "-n", ns)["spec"].get("publishNotReadyAddresses"),
         RECONCILE_S, "the Service's publishNotReadyAddresses to be repaired", describe)
    poll(lambda: kjson(sandbox, "get", "networkpolicy", name, "-n", ns)["spec"] == policy["spec"],
         RECONCILE_S, "the NetworkPolicy to be repaired", describe)
    poll(lambda: kjson(sandbox, "get", "role", role_name, "-n", ns)["rules"] == role["rules"],
         RECONCILE_S, "the report Role's rules to be repaired", describe)
    poll(lambda: kjson(sandbox, "get", "rolebinding", role_name, "-n", ns)["subjects"] == binding["subjects"],
         RECONCILE_S, "the report RoleBinding's subjects to be repaired", describe)

    # Delete: the operator lets go, the garbage collector removes the children.
    sandbox.kubectl("delete", "weightsync", name, "-n", ns, "--timeout=120s")
    poll(lambda: not members(), RECONCILE_S, f"the members of {name} to be gone", describe)
    return role["rules"]
