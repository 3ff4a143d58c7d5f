"""The operator against the sandbox's real API server, controller-manager and node (pods are processes).

Every member pod runs a small program that reads the env contract exactly as the runtime does
(`MemberEnv.from_env()`), prints it, and prints every epoch it sees in its downward-API annotations file;
it exits with code 3 when its pod gets the annotation `test.weightsync.dev/fail: "true"` (a member failure).
"""

from __future__ import annotations

import json
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from weightsync.operator import constants as c
from weightsync.sandbox import Sandbox
from weightsync.sandbox.waiting import wait_for

from weightsync.api.models import MAX_STATUS_INT
from weightsync.contract import EPOCH_ANNOTATION, LAST_SYNC_ANNOTATION, WORLD_SIZE_ANNOTATION, MemberEnv

from .conftest import OperatorProcess

pytestmark = pytest.mark.cluster

TIMEOUT_S = 90.0
#: The operator fixture's --resync-seconds.
RESYNC_SECONDS = 3.0
FAIL_ANNOTATION = "test.weightsync.dev/fail"

MEMBER = textwrap.dedent(
    f"""
    import sys, time
    from pathlib import Path
    from weightsync.contract import EPOCH_ANNOTATION, LAST_SYNC_ANNOTATION, WORLD_SIZE_ANNOTATION, MemberEnv
    env = MemberEnv.from_env()
    print(f"member {{env.role}} rank_offset={{env.rank_offset}} world_size={{env.world_size}}", flush=True)
    seen = None
    while True:
        epoch = env.current_epoch()
        if epoch != seen:
            print(f"epoch {{epoch}}", flush=True)
            seen = epoch
        path = Path(env.annotations_file)
        if path.exists() and '{FAIL_ANNOTATION}="true"' in path.read_text():
            print("failing on request", flush=True)
            sys.exit(3)
        time.sleep(0.2)
    """
)


def template(**extra: Any) -> dict[str, Any]:
    container = {"name": "main", "image": "ignored", "command": ["python", "-u", "-c", MEMBER]}
    container.update(extra.pop("container", {}))
    return {"spec": {"terminationGracePeriodSeconds": 2, "containers": [container], **extra}}


def manifest(name: str = "ws", replicas: int = 2, workers: int = 1, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "trainer": {"template": spec.pop("trainer_template", template())},
        "inference": {
            "replicas": replicas,
            "workersPerReplica": workers,
            "template": spec.pop("inference_template", template()),
        },
        "transport": {"backend": "gloo"},
        "failurePolicy": {"backoffSeconds": 0},
    }
    body.update(spec)
    return {
        "apiVersion": "weightsync.dev/v1alpha1",
        "kind": "WeightSync",
        "metadata": {"name": name},
        "spec": body,
    }


# --- helpers ---------------------------------------------------------------------------------------------


def apply(sandbox: Sandbox, ns: str, obj: dict[str, Any]) -> None:
    sandbox.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(obj))


def get(sandbox: Sandbox, ns: str, kind: str, name: str) -> dict[str, Any] | None:
    proc = sandbox.kubectl("get", kind, name, "-n", ns, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def items(sandbox: Sandbox, ns: str, kind: str, selector: str = "") -> list[dict[str, Any]]:
    args = ["get", kind, "-n", ns, "-o", "json", *(["-l", selector] if selector else [])]
    out: list[dict[str, Any]] = json.loads(sandbox.kubectl(*args).stdout)["items"]
    return out


def status(sandbox: Sandbox, ns: str, name: str = "ws") -> dict[str, Any]:
    ws = get(sandbox, ns, "weightsync", name)
    return (ws or {}).get("status") or {}


def wait_status(sandbox: Sandbox, ns: str, what: str, check: Any, name: str = "ws") -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        st = status(sandbox, ns, name)
        return st if check(st) else None

    found: dict[str, Any] = wait_for(
        probe, TIMEOUT_S, f"WeightSync {ns}/{name}: {what}", interval=0.2,
        describe=lambda: json.dumps(status(sandbox, ns, name)),
    )  # fmt: skip
    return found


def wait_ready(sandbox: Sandbox, ns: str, epoch: int, members: int, name: str = "ws") -> dict[str, Any]:
    want = {"phase": "Ready", "epoch": epoch, "ready": f"{members}/{members}"}
    return wait_status(
        sandbox, ns, f"Ready at epoch {epoch} with {members} members",
        lambda s: all(s.get(k) == v for k, v in want.items()), name,
    )  # fmt: skip


def pods(sandbox: Sandbox, ns: str, name: str = "ws") -> dict[str, dict[str, Any]]:
    return {p["metadata"]["name"]: p for p in items(sandbox, ns, "pods", f"{c.NAME_LABEL}={name}")}


def env_of(pod: dict[str, Any]) -> dict[str, Any]:
    # an empty value is stored without its `value` key (Kubernetes reads that as "")
    return {
        e["name"]: e["valueFrom"] if "valueFrom" in e else e.get("value", "")
        for e in pod["spec"]["containers"][0]["env"]
    }


def events(sandbox: Sandbox, ns: str, reason: str) -> list[str]:
    return [e["message"] for e in items(sandbox, ns, "events") if e.get("reason") == reason]


def children(sandbox: Sandbox, ns: str, name: str = "ws") -> dict[str, list[str]]:
    selector = f"{c.NAME_LABEL}={name}"
    return {
        kind: sorted(o["metadata"]["name"] for o in items(sandbox, ns, kind, selector))
        for kind in ("pods", "services", "secrets", "roles", "rolebindings")
    }


def expected_children(replicas: int, name: str = "ws") -> dict[str, list[str]]:
    return {
        "pods": sorted([f"{name}-trainer-0"] + [f"{name}-inference-{r}" for r in range(replicas)]),
        "services": [name],
        "secrets": [f"{name}-token"],
        "roles": [f"{name}-trainer-report"],
        "rolebindings": [f"{name}-trainer-report"],
    }


def epoch_seen(sandbox: Sandbox, ns: str, pod: str, epoch: int) -> bool:
    return f"epoch {epoch}\n" in sandbox.pod_log(ns, pod, "main")


# --- reconciling -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("replicas", "workers", "extra"),
    [
        (1, 1, {}),
        (
            2,
            2,
            {
                "rendezvous": {"port": 31234, "timeoutSeconds": 45},
                "network": {"ncclEnv": {"NCCL_DEBUG": "WARN"}},
            },
        ),
        (
            3,
            4,
            {
                "transport": {
                    "backend": "gloo",
                    "packed": False,
                    "bufferSizeBytes": 1 << 20,
                    "checksums": True,
                }
            },
        ),
    ],
    ids=["1x1", "2x2-port-nccl-env", "3x4-unpacked"],
)
def test_apply_creates_exact_children_and_env(
    *,
    sandbox: Sandbox,
    namespace: str,
    operator: OperatorProcess,
    replicas: int,
    workers: int,
    extra: dict[str, Any],
) -> None:
    user_template = template(
        tolerations=[{"key": "example.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        container={
            "env": [{"name": "USER_VAR", "value": "kept"}],
            "resources": {"requests": {"cpu": "10m", "memory": "1Gi"}, "limits": {"memory": "1Gi"}},
        },
    )
    user_template["metadata"] = {"labels": {"team": "rl"}, "annotations": {"note": "kept"}}
    apply(
        sandbox,
        namespace,
        manifest(replicas=replicas, workers=workers, inference_template=user_template, **extra),
    )
    world = 1 + replicas * workers
    st = wait_ready(sandbox, namespace, 0, 1 + replicas)

    assert children(sandbox, namespace) == expected_children(replicas)
    assert st["worldSize"] == world and st["replicas"] == replicas and st["restarts"] == 0
    assert st["observedGeneration"] == 1
    assert [(m["pod"], m["role"], m["rankOffset"], m["localWorldSize"], m["ready"]) for m in st["members"]] == [
        ("ws-trainer-0", "trainer", 0, 1, True),
        *[(f"ws-inference-{r}", "inference", 1 + r * workers, workers, True) for r in range(replicas)],
    ]
    conds = {x["type"]: x["status"] for x in st["conditions"]}
    assert conds == {"Ready": "True", "Progressing": "False", "Degraded": "False", "Failed": "False"}

    ws = get(sandbox, namespace, "weightsync", "ws")
    assert ws is not None
    assert not ws["metadata"].get("finalizers"), "no finalizer: deletion never waits for the operator"
    assert not [k for k in ws["metadata"].get("annotations", {}) if "kopf" in k], "kopf stores no state on it"
    spec = ws["spec"]
    transport, rendezvous = spec["transport"], spec["rendezvous"]
    token = get(sandbox, namespace, "secret", "ws-token")["data"]["token"]  # type: ignore[index]
    assert len(token) >= 32
    endpoints = tuple(f"ws-inference-{r}.ws.{namespace}.svc.cluster.local" for r in range(replicas))
    all_pods = pods(sandbox, namespace)
    for m in st["members"]:
        pod = all_pods[m["pod"]]
        expected = MemberEnv(
            name="ws", namespace=namespace, role=m["role"],
            master_addr=f"ws-trainer-0.ws.{namespace}.svc.cluster.local", master_port=rendezvous["port"],
            world_size=world, rank_offset=m["rankOffset"], local_world_size=m["localWorldSize"],
            backend="gloo", protocol="weightsync", packed=transport["packed"],
            buffer_bytes=transport["bufferSizeBytes"], num_buffers=transport["numBuffers"],
            timeout_seconds=rendezvous["timeoutSeconds"], token="x" * 16, epoch=0,
            checksums=transport["checksums"], endpoints=endpoints if m["role"] == "trainer" else (),
        ).to_env()  # fmt: skip
        del expected["WEIGHTSYNC_TOKEN"]
        env = env_of(pod)
        assert {k: v for k, v in env.items() if k.startswith("WEIGHTSYNC_") and k != "WEIGHTSYNC_TOKEN"} == expected
        assert env["WEIGHTSYNC_TOKEN"] == {"secretKeyRef": {"name": "ws-token", "key": "token"}}
        assert {k: v for k, v in env.items() if k.startswith("NCCL_")} == spec["network"]["ncclEnv"]
        assert pod["spec"]["hostname"] == m["pod"] and pod["spec"]["subdomain"] == "ws"
        assert pod["spec"]["restartPolicy"] == "Never"
        assert pod["metadata"]["annotations"][EPOCH_ANNOTATION] == "0"
        assert pod["metadata"]["ownerReferences"][0]["kind"] == "WeightSync"
        # the process in the pod read the same contract the runtime reads
        line = f"member {m['role']} rank_offset={m['rankOffset']} world_size={world}"
        wait_for(lambda p=m["pod"], line=line: line in sandbox.pod_log(namespace, p, "main"), TIMEOUT_S, line)
        if m["role"] == "inference":
            assert env["USER_VAR"] == "kept"
            assert pod["metadata"]["labels"]["team"] == "rl" and pod["metadata"]["annotations"]["note"] == "kept"
            assert pod["spec"]["containers"][0]["resources"] == {
                "requests": {"cpu": "10m", "memory": "1Gi"},
                "limits": {"memory": "1Gi"},
            }
            assert {"key": "example.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["spec"][
                "tolerations"
            ]

    svc = get(sandbox, namespace, "service", "ws")
    assert svc is not None
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {c.NAME_LABEL: "ws"}
    assert svc["spec"]["ports"][0]["port"] == rendezvous["port"]

    table = sandbox.kubectl("get", "ws", "-n", namespace).stdout.split()
    assert table[:6] == ["NAME", "PHASE", "READY", "EPOCH", "VERSION", "GB/S"]
    assert table[7:11] == ["ws", "Ready", f"{1 + replicas}/{1 + replicas}", "0"]


def test_reserved_env_is_refused_with_a_condition_and_nothing_created(
    sandbox: Sandbox, namespace: str, operator: OperatorProcess
) -> None:
    bad = template(container={"env": [{"name": "WEIGHTSYNC_WORLD_SIZE", "value": "99"}]})
    apply(sandbox, namespace, manifest(trainer_template=bad))
    st = wait_status(sandbox, namespace, "Failed", lambda s: s.get("phase") == "Failed")
    failed = next(x for x in st["conditions"] if x["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == c.REASON_RESERVED_ENV
    assert "spec.trainer.template.spec.containers[main].env sets WEIGHTSYNC_WORLD_SIZE" in failed["message"]
    wait_for(lambda: events(sandbox, namespace, c.REASON_RESERVED_ENV), TIMEOUT_S, "a ReservedEnv event")
    assert children(sandbox, namespace) == {k: [] for k in expected_children(1)}


def test_drift_is_repaired(sandbox: Sandbox, namespace: str, operator: OperatorProcess) -> None:
    apply(sandbox, namespace, manifest(replicas=1))
    wait_ready(sandbox, namespace, 0, 2)
    token = get(sandbox, namespace, "secret", "ws-token")["data"]["token"]  # type: ignore[index]
    for kind, name in (("service", "ws"), ("secret", "ws-token"), ("role", "ws-trainer-report"),
                       ("rolebinding", "ws-trainer-report")):  # fmt: skip
        old = get(sandbox, namespace, kind, name)["metadata"]["uid"]  # type: ignore[index]
        sandbox.kubectl("delete", kind, name, "-n", namespace)
        wait_for(
            lambda k=kind, n=name, u=old: (o := get(sandbox, namespace, k, n)) and o["metadata"]["uid"] != u,
            TIMEOUT_S, f"{kind} {name} to come back",
        )  # fmt: skip
    assert get(sandbox, namespace, "secret", "ws-token")["data"]["token"] != token  # type: ignore[index]
    assert events(sandbox, namespace, c.REASON_TOKEN_RECREATED)
    st = wait_ready(sandbox, namespace, 1, 2)  # the members holding the old token were replaced: one epoch
    assert st["restarts"] == 0
    assert children(sandbox, namespace) == expected_children(1)


# --- scale and failures ----------------------------------------------------------------------------------


def test_scale_up_and_down(sandbox: Sandbox, namespace: str, operator: OperatorProcess) -> None:
    apply(sandbox, namespace, manifest(replicas=2, workers=2))
    wait_ready(sandbox, namespace, 0, 3)
    trainer_uid = pods(sandbox, namespace)["ws-trainer-0"]["metadata"]["uid"]

    sandbox.kubectl("scale", "ws/ws", "-n", namespace, "--replicas=4")
    st = wait_ready(sandbox, namespace, 1, 5)
    assert st["worldSize"] == 9 and st["replicas"] == 4 and st["restarts"] == 0
    current = pods(sandbox, namespace)
    assert sorted(current) == expected_children(4)["pods"]
    assert current["ws-trainer-0"]["metadata"]["uid"] == trainer_uid, "the trainer was not restarted"
    assert {p["metadata"]["annotations"][EPOCH_ANNOTATION] for p in current.values()} == {"1"}
    assert current["ws-trainer-0"]["metadata"]["annotations"][WORLD_SIZE_ANNOTATION] == "9"
    assert env_of(current["ws-inference-3"])["WEIGHTSYNC_RANK_OFFSET"] == "7"
    wait_for(lambda: epoch_seen(sandbox, namespace, "ws-trainer-0", 1), TIMEOUT_S, "the trainer to see epoch 1")

    sandbox.kubectl("scale", "ws/ws", "-n", namespace, "--replicas=1")
    st = wait_ready(sandbox, namespace, 2, 2)
    assert st["worldSize"] == 3 and st["restarts"] == 0
    wait_for(lambda: sorted(pods(sandbox, namespace)) == expected_children(1)["pods"], TIMEOUT_S, "scale-down")
    assert pods(sandbox, namespace)["ws-trainer-0"]["metadata"]["uid"] == trainer_uid
    assert get(sandbox, namespace, "ws", "ws")["status"]["replicas"] == 1  # type: ignore[index]
    assert events(sandbox, namespace, c.REASON_SCALED)


def test_deleted_or_failed_member_bumps_epoch_and_survivors_rejoin_in_place(
    sandbox: Sandbox, namespace: str, operator: OperatorProcess
) -> None:
    apply(sandbox, namespace, manifest(replicas=2))
    wait_ready(sandbox, namespace, 0, 3)
    before = {n: p["metadata"]["uid"] for n, p in pods(sandbox, namespace).items()}

    sandbox.kubectl("delete", "pod", "ws-inference-0", "-n", namespace, "--wait=false")
    st = wait_ready(sandbox, namespace, 1, 3)
    assert st["restarts"] == 1 and st["restartStreak"] == 1
    after = {n: p["metadata"]["uid"] for n, p in pods(sandbox, namespace).items()}
    assert after["ws-inference-0"] != before["ws-inference-0"], "re-created"
    assert after["ws-trainer-0"] == before["ws-trainer-0"] and after["ws-inference-1"] == before["ws-inference-1"]
    for survivor in ("ws-trainer-0", "ws-inference-1"):
        wait_for(lambda p=survivor: epoch_seen(sandbox, namespace, p, 1), TIMEOUT_S, f"{survivor} to see epoch 1")
    assert env_of(pods(sandbox, namespace)["ws-inference-0"])["WEIGHTSYNC_EPOCH"] == "1"

    sandbox.kubectl("annotate", "pod", "ws-inference-1", "-n", namespace, f"{FAIL_ANNOTATION}=true")
    st = wait_ready(sandbox, namespace, 2, 3)
    assert st["restarts"] == 2 and st["restartStreak"] == 2, "two failures within backoffResetSeconds: one streak"
    final = {n: p["metadata"]["uid"] for n, p in pods(sandbox, namespace).items()}
    assert final["ws-inference-1"] != after["ws-inference-1"]
    assert final["ws-trainer-0"] == before["ws-trainer-0"]
    wait_for(lambda: epoch_seen(sandbox, namespace, "ws-trainer-0", 2), TIMEOUT_S, "the trainer to see epoch 2")
    failed = events(sandbox, namespace, c.REASON_MEMBER_FAILED)
    assert any("ws-inference-1" in m and "exited with code 3" in m for m in failed), failed
    assert "weightsync_epoch_changes_total 2.0" in operator.metrics()


def test_a_failure_after_a_quiet_period_starts_a_new_backoff_streak(
    sandbox: Sandbox, namespace: str, operator: OperatorProcess
) -> None:
    apply(sandbox, namespace, manifest(replicas=1, failurePolicy={"backoffSeconds": 0.5, "backoffResetSeconds": 1}))
    wait_ready(sandbox, namespace, 0, 2)
    for epoch in (1, 2):
        sandbox.kubectl("delete", "pod", "ws-inference-0", "-n", namespace, "--wait=false")
        st = wait_ready(sandbox, namespace, epoch, 2)
        assert st["restarts"] == epoch and st["restartStreak"] == 1, st
        last = datetime.fromisoformat(st["lastFailureTime"].replace("Z", "+00:00"))
        # the status keeps whole seconds: past the reset by the wall clock, whatever the rounding
        wait_for(lambda t=last: datetime.now(UTC) >= t + timedelta(seconds=2.1), 10, "backoffResetSeconds to pass")
    steps = events(sandbox, namespace, c.REASON_BACKOFF)
    assert steps and all("backoff step 1" in m for m in steps), steps


def test_max_restarts_fails_the_group(sandbox: Sandbox, namespace: str, operator: OperatorProcess) -> None:
    apply(sandbox, namespace, manifest(replicas=1, failurePolicy={"maxRestarts": 1, "backoffSeconds": 0}))
    wait_ready(sandbox, namespace, 0, 2)
    sandbox.kubectl("delete", "pod", "ws-inference-0", "-n", namespace, "--wait=false")
    wait_ready(sandbox, namespace, 1, 2)
    sandbox.kubectl("annotate", "pod", "ws-trainer-0", "-n", namespace, f"{FAIL_ANNOTATION}=true")
    st = wait_status(sandbox, namespace, "Failed", lambda s: s.get("phase") == "Failed")
    assert st["restarts"] == 2
    failed = next(x for x in st["conditions"] if x["type"] == "Failed")
    assert failed["reason"] == c.REASON_MAX_RESTARTS and "maxRestarts=1" in failed["message"]
    assert events(sandbox, namespace, c.REASON_MAX_RESTARTS)
    trainer = get(sandbox, namespace, "pod", "ws-trainer-0")
    assert trainer is not None and trainer["status"]["phase"] == "Failed", "left for inspection, not re-created"


# --- operator restarts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("writes", [1, 3, 6])
def test_operator_killed_mid_reconcile_creates_nothing_twice(
    sandbox: Sandbox, namespace: str, operator: OperatorProcess, writes: int
) -> None:
    operator.stop()
    operator.start(crash_after_writes=writes)
    apply(sandbox, namespace, manifest(replicas=3, workers=2))
    assert operator.wait_exit(TIMEOUT_S) == 137, operator.tail()
    partial = children(sandbox, namespace)
    assert sum(len(v) for v in partial.values()) < sum(len(v) for v in expected_children(3).values())
    before = {n: p["metadata"]["uid"] for n, p in pods(sandbox, namespace).items()}
    operator.start()
    st = wait_ready(sandbox, namespace, 0, 4)
    assert st["restarts"] == 0 and st["worldSize"] == 7
    assert children(sandbox, namespace) == expected_children(3)
    after = {n: p["metadata"]["uid"] for n, p in pods(sandbox, namespace).items()}
    assert {n: after[n] for n in before} == before, "pods created before the crash were kept, not replaced"


def test_operator_killed_while_handling_a_failure_counts_it_once(
    sandbox: Sandbox, namespace: str, operator: OperatorProcess
) -> None:
    apply(sandbox, namespace, manifest(replicas=2))
    wait_ready(sandbox, namespace, 0, 3)
    operator.stop()
    operator.start(crash_after_writes=1)  # dies right after recording the bump
    sandbox.kubectl("annotate", "pod", "ws-inference-1", "-n", namespace, f"{FAIL_ANNOTATION}=true")
    assert operator.wait_exit(TIMEOUT_S) == 137, operator.tail()
    assert status(sandbox, namespace)["epoch"] == 1
    operator.start()
    st = wait_ready(sandbox, namespace, 1, 3)
    assert st["restarts"] == 1
    assert children(sandbox, namespace) == expected_children(2)


# --- deletion --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("operator_up", [True, False], ids=["operator-up", "operator-down"])
def test_deleting_the_weightsync_removes_every_child(
    sandbox: Sandbox, namespace: str, operator: OperatorProcess, operator_up: bool
) -> None:
    apply(sandbox, namespace, manifest(replicas=2))
    wait_ready(sandbox, namespace, 0, 3)
    if not operator_up:
        operator.kill()  # no finalizers: the object must not hang in Terminating
    sandbox.kubectl("delete", "ws", "ws", "-n", namespace, "--timeout=60s")
    assert get(sandbox, namespace, "weightsync", "ws") is None
    empty = {k: [] for k in expected_children(2)}
    wait_for(
        lambda: children(sandbox, namespace) == empty, TIMEOUT_S, "the garbage collector to remove children",
        describe=lambda: str(children(sandbox, namespace)),
    )  # fmt: skip


# --- the trainer's report --------------------------------------------------------------------------------


def test_last_sync_reaches_status_through_the_trainers_own_pod(
    sandbox: Sandbox, namespace: str, operator: OperatorProcess
) -> None:
    apply(sandbox, namespace, manifest(replicas=1))
    wait_ready(sandbox, namespace, 0, 2)
    report = {"version": 42, "tensors": 339, "bytes": 15_200_000_000, "seconds": 42.2, "gbps": 360.19,
              "acked": [1], "transport": "gloo", "epoch": 0, "time": "2026-01-01T00:00:00Z"}  # fmt: skip
    patch = json.dumps({"metadata": {"annotations": {LAST_SYNC_ANNOTATION: json.dumps(report)}}})
    as_trainer = f"--as=system:serviceaccount:{namespace}:default"
    sandbox.kubectl("patch", "pod", "ws-trainer-0", "-n", namespace, "--type=merge", "-p", patch, as_trainer)
    denied = sandbox.kubectl(
        "patch",
        "pod",
        "ws-inference-0",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        patch,
        as_trainer,
        check=False,
    )
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()
    st = wait_status(sandbox, namespace, "lastSync", lambda s: (s.get("lastSync") or {}).get("version") == 42)
    assert st["lastSync"]["gbps"] == 360.19 and st["lastSync"]["transport"] == "gloo"
    row = sandbox.kubectl("get", "ws", "ws", "-n", namespace, "--no-headers").stdout.split()
    assert row[1:6] == ["Ready", "2/2", "0", "42", "360.19"]


def test_a_bad_sync_report_is_dropped_with_one_event_and_never_blocks_a_scale(
    sandbox: Sandbox, namespace: str, operator: OperatorProcess
) -> None:
    """The trainer may write anything on its own pod: a value the API server cannot store (int64) is
    dropped with one InvalidSyncReport event, and the group still scales and reports (issue 12)."""
    apply(sandbox, namespace, manifest(replicas=3))
    wait_ready(sandbox, namespace, 0, 4)
    as_trainer = f"--as=system:serviceaccount:{namespace}:default"

    def version(st: dict[str, Any]) -> Any:
        return (st.get("lastSync") or {}).get("version")

    def report(value: str) -> None:
        patch = json.dumps({"metadata": {"annotations": {LAST_SYNC_ANNOTATION: value}}})
        sandbox.kubectl("patch", "pod", "ws-trainer-0", "-n", namespace, "--type=merge", "-p", patch, as_trainer)

    # the largest version the model admits is one the API server stores
    report(json.dumps({"version": MAX_STATUS_INT, "epoch": 0, "time": "2026-01-01T00:00:00Z"}))
    wait_status(sandbox, namespace, "the largest version", lambda s: version(s) == MAX_STATUS_INT)
    report('{"version": 99999999999999999999}')
    wait_for(
        lambda: events(sandbox, namespace, c.REASON_INVALID_REPORT), TIMEOUT_S, "an InvalidSyncReport event",
        describe=lambda: json.dumps(status(sandbox, namespace)),
    )  # fmt: skip
    (message,) = events(sandbox, namespace, c.REASON_INVALID_REPORT)
    assert "ws-trainer-0" in message and "version: Input should be less than or equal to" in message, message
    st = status(sandbox, namespace)
    assert st["lastSync"]["version"] == MAX_STATUS_INT and st["rejectedSyncReport"]["message"].startswith("version")

    sandbox.kubectl("scale", "ws/ws", "-n", namespace, "--replicas=2")
    st = wait_ready(sandbox, namespace, 1, 3)
    assert st["worldSize"] == 3 and st["lastSync"]["version"] == MAX_STATUS_INT
    wait_for(lambda: sorted(pods(sandbox, namespace)) == expected_children(2)["pods"], TIMEOUT_S, "scale-down")
    assert events(sandbox, namespace, c.REASON_SCALED)
    time.sleep(2 * RESYNC_SECONDS)  # resyncs, with the bad value still on the pod
    assert len(events(sandbox, namespace, c.REASON_INVALID_REPORT)) == 1, "announced once, not every resync"

    report(json.dumps({"version": 43, "transport": "gloo"}))
    st = wait_status(sandbox, namespace, "the next good report", lambda s: version(s) == 43)
    assert "rejectedSyncReport" not in st


# --- peering ---------------------------------------------------------------------------------------------


def test_peering_lets_only_the_highest_priority_operator_act(
    sandbox: Sandbox, namespace: str, crds: None, tmp_path: Path
) -> None:
    peering = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": c.OPERATOR_NAME}}
    apply(sandbox, namespace, peering)

    def peers() -> int:
        obj = get(sandbox, namespace, "kopfpeering", c.OPERATOR_NAME) or {}
        return len(obj.get("status") or {})

    high = OperatorProcess(sandbox, namespace, tmp_path, "high")
    low = OperatorProcess(sandbox, namespace, tmp_path, "low")
    try:
        high.start(priority=200)
        low.start(priority=100)
        wait_for(lambda: peers() == 2, TIMEOUT_S, "both operators in the KopfPeering")
        apply(sandbox, namespace, manifest(replicas=1))
        wait_ready(sandbox, namespace, 0, 2)
        assert "created headless Service" in high.log_path.read_text()
        assert "weightsync_reconciles_total 0.0" in low.metrics(), "the paused operator reconciled"

        high.stop()  # a graceful exit leaves the peering; the other one takes over
        wait_for(lambda: peers() == 1, TIMEOUT_S, "the stopped operator to leave the KopfPeering")
        sandbox.kubectl("delete", "pod", "ws-inference-0", "-n", namespace, "--wait=false")
        st = wait_ready(sandbox, namespace, 1, 2)
        assert st["restarts"] == 1
        assert "weightsync_reconciles_total 0.0" not in low.metrics()
    finally:
        low.stop()
        high.stop()


def test_a_trainer_of_two_pods_is_re_created_together_when_one_dies(
    sandbox: Sandbox, namespace: str, operator: OperatorProcess
) -> None:
    body = manifest(replicas=2)
    body["spec"]["trainer"]["pods"] = 2
    body["spec"]["trainer"]["ranksPerPod"] = 4
    apply(sandbox, namespace, body)
    st = wait_ready(sandbox, namespace, 0, 4)
    assert st["trainerReady"] == "2/2"
    before = {n: p["metadata"]["uid"] for n, p in pods(sandbox, namespace).items()}
    env = env_of(pods(sandbox, namespace)["ws-trainer-1"])
    job = ("WEIGHTSYNC_TRAINER_PODS", "WEIGHTSYNC_TRAINER_POD_INDEX", "WEIGHTSYNC_TRAINER_RANKS_PER_POD")
    assert [env[k] for k in job] == ["2", "1", "4"]
    assert env["WEIGHTSYNC_MASTER_ADDR"] == f"ws-trainer-0.ws.{namespace}.svc.cluster.local"

    sandbox.kubectl("annotate", "pod", "ws-trainer-1", "-n", namespace, f"{FAIL_ANNOTATION}=true")
    st = wait_ready(sandbox, namespace, 1, 4)
    assert st["restarts"] == 1
    after = {n: p["metadata"]["uid"] for n, p in pods(sandbox, namespace).items()}
    assert after["ws-trainer-0"] != before["ws-trainer-0"] and after["ws-trainer-1"] != before["ws-trainer-1"]
    assert {n: after[n] for n in ("ws-inference-0", "ws-inference-1")} == {
        n: before[n] for n in ("ws-inference-0", "ws-inference-1")}, "the engines re-joined in place"  # fmt: skip
    wait_for(lambda: epoch_seen(sandbox, namespace, "ws-inference-0", 1), TIMEOUT_S, "an engine to see epoch 1")
