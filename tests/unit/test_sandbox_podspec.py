"""Pure logic of the sandbox's node agent: env resolution, downward-API files, hosts files, probes."""

from __future__ import annotations

import base64
import copy
from typing import Any

import pytest
from weightsync.sandbox.podspec import (
    ConfigError,
    command_line,
    expand,
    field_value,
    format_map,
    hosts_view,
    render_hosts,
    resolve_env,
)
from weightsync.sandbox.probes import ProbeState


def pod(name: str, ns: str = "ns", ip: str = "", **spec: Any) -> dict[str, Any]:
    labels = spec.pop("labels", {})
    ready = spec.pop("ready", False)
    status: dict[str, Any] = {"podIP": ip} if ip else {}
    status["conditions"] = [{"type": "Ready", "status": "True" if ready else "False"}]
    return {
        "metadata": {
            "name": name,
            "namespace": ns,
            "uid": f"uid-{name}",
            "labels": labels,
            "annotations": {"epoch": "3"},
        },
        "spec": {"containers": [{"name": "main"}], **spec},
        "status": status,
    }


def service(name: str, ns: str = "ns", **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns}, "spec": spec}


def lookup_from(objects: dict[tuple[str, str], dict[str, Any]]) -> Any:
    return lambda kind, namespace, name: objects.get((kind, name))


def test_expand_follows_kubernetes_rules() -> None:
    env = {"A": "1", "B": "two"}
    assert expand("$(A)-$(B)-$(C)-$$(A)", env) == "1-two-$(C)-$(A)"


def test_resolve_env_value_from_every_source() -> None:
    secret = {"kind": "Secret", "type": "Opaque", "data": {"k": base64.b64encode(b"s3cret").decode()}}
    objects = {
        ("Secret", "s"): secret,
        ("ConfigMap", "c"): {"kind": "ConfigMap", "data": {"m": "fast", "x": "y"}},
    }
    p = pod("p0", ip="10.77.0.5", labels={"role": "trainer"})
    container = {
        "name": "main",
        "envFrom": [{"configMapRef": {"name": "c"}, "prefix": "CM_"}],
        "env": [
            {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "EPOCH", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['epoch']"}}},
            {"name": "ROLE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['role']"}}},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
            {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "m"}}},
            {
                "name": "GONE",
                "valueFrom": {"secretKeyRef": {"name": "missing", "key": "k", "optional": True}},
            },
            {"name": "BOTH", "value": "$(NAME):$(MODE):$(BASE)"},
        ],
    }
    env = resolve_env(p, container, {"BASE": "b"}, lookup_from(objects))
    assert env == {
        "BASE": "b",
        "CM_m": "fast",
        "CM_x": "y",
        "NAME": "p0",
        "IP": "10.77.0.5",
        "EPOCH": "3",
        "ROLE": "trainer",
        "TOKEN": "s3cret",
        "MODE": "fast",
        "BOTH": "p0:fast:b",
    }


@pytest.mark.parametrize(
    "ref",
    [
        {"secretKeyRef": {"name": "missing", "key": "k"}},
        {"configMapKeyRef": {"name": "c", "key": "nope"}},
        {"fieldRef": {"fieldPath": "spec.nonsense"}},
    ],
)
def test_resolve_env_names_what_is_missing(ref: dict[str, Any]) -> None:
    objects = {("ConfigMap", "c"): {"kind": "ConfigMap", "data": {}}}
    with pytest.raises(ConfigError, match="X"):
        resolve_env(
            pod("p"), {"name": "main", "env": [{"name": "X", "valueFrom": ref}]}, {}, lookup_from(objects)
        )


def test_command_is_required_because_images_are_ignored() -> None:
    with pytest.raises(ConfigError, match="no command"):
        command_line({"name": "main", "args": ["x"]}, {})
    assert command_line({"name": "m", "command": ["python"], "args": ["$(A)"]}, {"A": "run.py"}) == [
        "python",
        "run.py",
    ]


def test_downward_api_formats() -> None:
    assert format_map({"b": 'say "hi"', "a": "1"}) == 'a="1"\nb="say \\"hi\\""'
    assert field_value(pod("p"), "metadata.annotations") == 'epoch="3"'


def test_hosts_file_has_pod_names_under_their_headless_service() -> None:
    trainer = pod("trainer-0", ip="10.77.0.2", hostname="trainer-0", subdomain="g", labels={"group": "g"})
    worker = pod("inference-0", ip="10.77.0.3", hostname="inference-0", subdomain="g", labels={"group": "g"})
    worker["spec"]["hostAliases"] = [{"ip": "10.77.0.9", "hostnames": ["store", "store.local"]}]
    stranger = pod("other", ns="elsewhere", ip="10.77.0.4", hostname="x", subdomain="g")  # no Service there
    finished = pod("done", ip="10.77.0.8", hostname="done", subdomain="g", labels={"group": "g"})
    finished["status"]["phase"] = "Succeeded"
    headless = service("g", clusterIP="None", publishNotReadyAddresses=True, selector={"group": "g"})
    hosts = render_hosts(worker, [trainer, worker, stranger, finished], [headless], "10.77.0.1")
    lines = hosts.splitlines()
    assert (
        "10.77.0.3\tinference-0.g.ns.svc.cluster.local inference-0.g.ns.svc inference-0.g.ns "
        "inference-0.g inference-0" in lines
    )
    assert (
        "10.77.0.2\ttrainer-0.g.ns.svc.cluster.local trainer-0.g.ns.svc trainer-0.g.ns trainer-0.g" in lines
    )
    assert "10.77.0.2\tg.ns.svc.cluster.local g.ns.svc g.ns g" in lines  # not Ready, but published
    assert (
        "10.77.0.1\tkubernetes.default.svc.cluster.local kubernetes.default.svc kubernetes.default" in lines
    )
    assert "10.77.0.4" not in hosts
    assert "10.77.0.8" not in hosts
    assert "10.77.0.9\tstore store.local" in lines


def test_hosts_file_lists_only_ready_endpoints_by_default() -> None:
    ready = pod("a", ip="10.77.0.2", labels={"app": "x"}, ready=True)
    not_ready = pod("b", ip="10.77.0.3", labels={"app": "x"})
    other_ns = pod("c", ns="two", ip="10.77.0.9", labels={"app": "x"}, ready=True)
    hosts = render_hosts(
        other_ns, [ready, not_ready, other_ns], [service("x", selector={"app": "x"})], "10.77.0.1"
    )
    assert "10.77.0.2\tx.ns.svc.cluster.local x.ns.svc x.ns\n" in hosts  # no short form from namespace two
    assert "10.77.0.3" not in hosts


def test_only_what_hosts_files_show_of_a_pod_makes_the_agent_rewrite_them() -> None:
    # The agent rewrites every pod's hosts file when hosts_view of any pod changes; members patch their
    # own annotations at every sync, which must not cost the node a rewrite of every file.
    before = pod("a", ip="10.77.0.2", labels={"app": "x"})
    annotated = copy.deepcopy(before)
    annotated["metadata"]["annotations"] = {"weightsync.dev/last-sync": "{}"}
    assert hosts_view(annotated) == hosts_view(before)
    became_ready = pod("a", ip="10.77.0.2", labels={"app": "x"}, ready=True)
    relabelled = pod("a", ip="10.77.0.2", labels={"app": "y"})
    moved = pod("a", ip="10.77.0.3", labels={"app": "x"})
    for changed in (became_ready, relabelled, moved):
        assert hosts_view(changed) != hosts_view(before)


def test_probe_thresholds() -> None:
    state = ProbeState.start({"failureThreshold": 2, "successThreshold": 1, "periodSeconds": 0}, True)
    assert not state.record(False) and state.passing
    assert state.record(False) and not state.passing
    assert state.record(True) and state.passing


def test_container_log_runs_and_tail() -> None:
    from weightsync.sandbox.kubelet_server import current_run, tail

    log = "==== 2026-11-28T20:00:00 python a\none\n==== two\n==== 2026-11-28T20:00:05 python a\nthree\n"
    assert current_run(log, previous=False) == "three\n"
    assert current_run(log, previous=True) == "one\n==== two\n"
    assert tail("a\nb\nc\n", 2) == "b\nc\n"


def test_cli_status_of_a_stopped_sandbox(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from weightsync.sandbox.cli import main

    assert main(["--state-dir", str(tmp_path), "status"]) == 1
    out = capsys.readouterr().out
    assert f"kubeconfig:  {tmp_path.resolve() / 'kubeconfig'}" in out
    assert "kube-apiserver           stopped" in out


@pytest.mark.parametrize(
    ("policy", "progress", "expected"),
    [
        ("Always", [("init", 1, True, True), ("app", 1, False, False)], "Running"),
        ("Always", [("init", 1, False, False), ("app", 0, False, False)], "Pending"),
        ("Never", [("init", 1, True, False), ("app", 0, False, False)], "Failed"),
        ("OnFailure", [("init", 2, False, False), ("app", 0, False, False)], "Pending"),
        ("Never", [("app", 1, True, True), ("app", 1, True, True)], "Succeeded"),
        ("Never", [("app", 1, True, True), ("app", 1, True, False)], "Failed"),
        ("Never", [("app", 1, True, False), ("app", 1, False, False)], "Running"),
        ("Always", [("app", 1, False, False), ("app", 0, False, False)], "Pending"),
    ],
)
def test_pod_phase(policy: str, progress: list[tuple[str, int, bool, bool]], expected: str) -> None:
    from weightsync.sandbox.podstatus import Progress, phase

    containers = [Progress(kind == "init", runs, done, ok) for kind, runs, done, ok in progress]
    assert phase(policy, containers) == expected


def test_pod_conditions_keep_transition_times_and_foreign_conditions() -> None:
    from weightsync.sandbox.podstatus import Progress, conditions

    old = [
        {"type": "PodScheduled", "status": "True"},
        {"type": "Initialized", "status": "True", "lastTransitionTime": "t0"},
    ]
    app = Progress(init=False, runs=1, ready=True)
    got = {c["type"]: c for c in conditions(old, [app], "Running", True, "t1")}
    assert got["PodScheduled"] == old[0]
    assert got["Initialized"]["lastTransitionTime"] == "t0"
    assert (got["Ready"]["status"], got["Ready"]["lastTransitionTime"]) == ("True", "t1")
    not_ready = conditions(old, [Progress(init=False, runs=1)], "Running", True, "t2")
    assert {c["type"]: c["status"] for c in not_ready}["ContainersReady"] == "False"


def test_gpu_indices_are_exclusive_per_container_and_freed_per_pod() -> None:
    from weightsync.sandbox.gpus import GpuAllocator

    gpus = GpuAllocator(4)
    ask = {"name": "main", "resources": {"limits": {"nvidia.com/gpu": "2"}}}
    assert gpus.env("pod-a", ask) == {"CUDA_VISIBLE_DEVICES": "0,1", "NVIDIA_VISIBLE_DEVICES": "0,1"}
    assert gpus.env("pod-a", ask)["CUDA_VISIBLE_DEVICES"] == "0,1"  # a restart keeps its GPUs
    assert gpus.env("pod-b", ask)["CUDA_VISIBLE_DEVICES"] == "2,3"
    with pytest.raises(RuntimeError, match="wants 2 GPUs, 0 are free"):
        gpus.env("pod-c", ask)
    gpus.release("pod-a")
    assert gpus.env("pod-c", ask)["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert gpus.env("pod-d", {"name": "cpu-only"}) == {}
    assert GpuAllocator(0).env("pod-e", ask) == {}  # no GPUs here: nothing set
