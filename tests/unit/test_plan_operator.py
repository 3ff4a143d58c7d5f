"""plan.py: desired vs observed -> status, actions, events; epoch bumps and restart accounting.

A tiny in-memory "cluster" applies the planned actions the way the API server would, so scenarios can be
played step by step, including a crash between recording the decision and acting on it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from weightsync.operator import constants as c
from weightsync.operator.decision import Create, Decision, Delete, Patch
from weightsync.operator.observed import Observed, ObservedPod, WeightSyncObject, observe_pod
from weightsync.operator.plan import plan

from weightsync.contract import EPOCH_ANNOTATION, LAST_SYNC_ANNOTATION

UID = "ws-uid"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
TOKEN = "t" * 43


def spec(replicas: int = 2, workers: int = 1, **extra: Any) -> dict[str, Any]:
    tpl = {"spec": {"containers": [{"name": "main", "image": "x"}]}}
    return {
        "trainer": {"template": tpl},
        "inference": {"replicas": replicas, "workersPerReplica": workers, "template": tpl},
        "failurePolicy": {"backoffSeconds": 0, **extra.pop("failurePolicy", {})},
        **extra,
    }


@dataclass
class Cluster:
    spec: dict[str, Any]
    status: dict[str, Any] = field(default_factory=dict)
    generation: int = 1
    pods: dict[str, ObservedPod] = field(default_factory=dict)
    others: dict[str, dict[str, Any]] = field(default_factory=dict)  # kind -> object
    now: datetime = T0
    events: list[str] = field(default_factory=list)

    def ws(self) -> WeightSyncObject:
        return WeightSyncObject("ws", "ns", UID, self.generation, self.spec, self.status)

    def observed(self) -> Observed:
        return Observed(
            pods=dict(self.pods),
            service=self.others.get("Service"),
            secret=self.others.get("Secret"),
            role=self.others.get("Role"),
            role_binding=self.others.get("RoleBinding"),
            network_policy=self.others.get("NetworkPolicy"),
        )

    def plan(self) -> Decision:
        return plan(self.ws(), self.observed(), self.now, TOKEN)

    def record(self, p: Decision) -> None:
        """The executor's first step: write the status."""
        self.status = p.status
        self.events += [f"{e.reason}: {e.message}" for e in p.events]

    def act(self, p: Decision) -> None:
        for a in p.actions:
            if a.event is not None:
                self.events.append(f"{a.event.reason}: {a.event.message}")
            if isinstance(a, Create):
                kind = a.obj["kind"]
                if kind == "Pod":
                    name = a.obj["metadata"]["name"]
                    assert name not in self.pods, f"duplicate create of {name}"
                    self.pods[name] = observe_pod({**a.obj, "status": {"phase": "Pending"}}, UID)
                else:  # the API server gives every object a uid
                    uid = f"{kind}-uid-{len(self.events)}"
                    self.others[kind] = {**a.obj, "metadata": {**a.obj["metadata"], "uid": uid}}
            elif isinstance(a, Patch) and a.kind == "Pod":
                pod = self.pods[a.name]
                annotations = {**pod.annotations, **a.patch["metadata"]["annotations"]}
                self.pods[a.name] = replace(pod, annotations=annotations)
            elif isinstance(a, Delete):
                del self.pods[a.name]

    def step(self) -> Decision:
        p = self.plan()
        self.record(p)
        self.act(p)
        return p

    def run_all(self, phase: str = "Running", ready: bool = True) -> None:
        for name, pod in self.pods.items():
            self.pods[name] = replace(pod, phase=phase, ready=ready)

    def converge(self) -> Decision:
        for _ in range(10):
            p = self.step()
            self.run_all()
            if not p.actions:
                return self.step()
        raise AssertionError("did not converge")


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {x["type"]: (x["status"], x["reason"]) for x in status["conditions"]}


def ready_cluster(**kw: Any) -> Cluster:
    cl = Cluster(spec(**kw))
    cl.converge()
    assert cl.status["phase"] == "Ready", cl.status
    return cl


def test_fresh_object_creates_the_shared_children_then_every_member_once() -> None:
    cl = Cluster(spec(replicas=3, workers=2))
    p = cl.step()
    kinds = [a.obj["kind"] for a in p.actions if isinstance(a, Create)]
    assert kinds == ["Service", "Secret", "Role", "RoleBinding", "NetworkPolicy"]
    assert p.requeue_after == 0.0, "members follow at once, made with the new Secret's uid"
    assert p.status["phase"] == "Pending"
    p = cl.plan()
    created = [a.obj for a in p.actions if isinstance(a, Create)]
    assert [o["kind"] for o in created] == ["Pod"] * 4
    secret_uid = cl.others["Secret"]["metadata"]["uid"]
    assert {o["metadata"]["annotations"][c.TOKEN_SECRET_UID] for o in created} == {secret_uid}
    assert p.status["phase"] == "Pending"
    assert p.status["epoch"] == 0
    assert p.status["worldSize"] == 7
    assert p.status["ready"] == "0/4"
    assert p.status["selector"] == "weightsync.dev/name=ws,weightsync.dev/role=inference"
    assert conditions(p.status)["Progressing"] == ("True", c.REASON_FORMING)


def test_steady_state_is_a_fixed_point() -> None:
    cl = ready_cluster()
    p = cl.plan()
    assert p.actions == [] and p.events == []
    assert p.status == cl.status
    assert cl.status["ready"] == "3/3"
    assert cl.status["members"] == [
        {"pod": "ws-trainer-0", "role": "trainer", "rankOffset": 0, "localWorldSize": 1, "ready": True,
         "upToDate": True},
        {"pod": "ws-inference-0", "role": "inference", "rankOffset": 1, "localWorldSize": 1, "ready": True,
         "upToDate": True},
        {"pod": "ws-inference-1", "role": "inference", "rankOffset": 2, "localWorldSize": 1, "ready": True,
         "upToDate": True},
    ]
    assert conditions(cl.status) == {
        "Ready": ("True", c.REASON_READY),
        "Progressing": ("False", "Ready"),
        "Degraded": ("False", c.REASON_AS_EXPECTED),
        "Failed": ("False", c.REASON_AS_EXPECTED),
    }


def test_forming_when_running_but_not_ready() -> None:
    cl = Cluster(spec())
    cl.step()  # the shared children
    cl.step()  # the members
    cl.run_all(ready=False)
    p = cl.step()
    assert p.status["phase"] == "Forming"
    assert p.status["ready"] == "0/3"


def test_failed_member_bumps_epoch_once_even_across_a_crash() -> None:
    cl = ready_cluster()
    cl.pods["ws-inference-1"] = replace(
        cl.pods["ws-inference-1"], phase="Failed", ready=False, detail="exit 3"
    )
    p = cl.plan()
    assert p.status["epoch"] == 1 and p.status["restarts"] == 1
    assert p.status["phase"] == "Degraded"
    assert conditions(p.status)["Degraded"] == ("True", c.REASON_MEMBER_FAILED)
    assert [a.name for a in p.actions if isinstance(a, Delete)] == ["ws-inference-1"]
    patched = {a.name: a.patch for a in p.actions if isinstance(a, Patch)}
    assert set(patched) == {"ws-trainer-0", "ws-inference-0"}
    assert patched["ws-inference-0"]["metadata"]["annotations"] == {EPOCH_ANNOTATION: "1"}
    assert any("exit 3" in e.message for e in p.events)

    cl.record(p)  # the operator dies here: decision recorded, nothing done
    again = cl.plan()
    assert again.status["epoch"] == 1 and again.status["restarts"] == 1, "counted twice"
    cl.record(again)
    cl.act(again)
    third = cl.step()  # the failed pod is gone: re-create it at the new epoch
    created = [a.obj for a in third.actions if isinstance(a, Create)]
    assert [o["metadata"]["name"] for o in created] == ["ws-inference-1"]
    assert created[0]["metadata"]["annotations"][EPOCH_ANNOTATION] == "1"
    cl.run_all()
    final = cl.converge()
    assert final.status["phase"] == "Ready"
    assert final.status["epoch"] == 1 and final.status["restarts"] == 1
    assert conditions(final.status)["Degraded"] == ("False", c.REASON_RECOVERED)
    assert {p.annotations[EPOCH_ANNOTATION] for p in cl.pods.values()} == {"1"}


def test_vanished_member_bumps_epoch_and_is_recreated_once() -> None:
    cl = ready_cluster()
    del cl.pods["ws-trainer-0"]
    p = cl.plan()
    assert p.status["epoch"] == 1 and p.status["restarts"] == 1
    assert [a.obj["metadata"]["name"] for a in p.actions if isinstance(a, Create)] == ["ws-trainer-0"]
    cl.record(p)  # crash before the create
    again = cl.step()
    assert again.status["epoch"] == 1 and again.status["restarts"] == 1
    assert [a.obj["metadata"]["name"] for a in again.actions if isinstance(a, Create)] == ["ws-trainer-0"]


def test_terminating_member_counts_once_and_waits_until_gone() -> None:
    cl = ready_cluster()
    cl.pods["ws-inference-0"] = replace(cl.pods["ws-inference-0"], terminating=True)
    p = cl.step()
    assert p.status["epoch"] == 1
    assert not [a for a in p.actions if isinstance(a, Create)], "same name still exists"
    p = cl.step()
    assert p.status["epoch"] == 1 and p.status["restarts"] == 1
    del cl.pods["ws-inference-0"]
    p = cl.step()
    assert p.status["epoch"] == 1
    assert [a.obj["metadata"]["name"] for a in p.actions if isinstance(a, Create)] == ["ws-inference-0"]


def test_stale_failed_pod_is_deleted_without_counting() -> None:
    cl = ready_cluster()
    cl.status = {**cl.status, "epoch": 5, "members": []}
    cl.pods["ws-inference-0"] = replace(cl.pods["ws-inference-0"], phase="Failed")
    p = cl.plan()
    assert p.status["restarts"] == 0
    assert [a.name for a in p.actions if isinstance(a, Delete)] == ["ws-inference-0"]


def test_scale_up_and_down_bump_epoch_without_restarts() -> None:
    cl = ready_cluster()
    cl.spec = spec(replicas=4)
    cl.generation = 2
    p = cl.step()
    assert p.status["epoch"] == 1 and p.status["worldSize"] == 5 and p.status["restarts"] == 0
    assert sorted(a.obj["metadata"]["name"] for a in p.actions if isinstance(a, Create)) == [
        "ws-inference-2",
        "ws-inference-3",
    ]
    assert any(e.reason == c.REASON_SCALED for e in p.events)
    cl.run_all()
    assert cl.converge().status["ready"] == "5/5"

    cl.spec = spec(replicas=1)
    p = cl.step()
    assert p.status["epoch"] == 2 and p.status["worldSize"] == 2 and p.status["restarts"] == 0
    assert sorted(a.name for a in p.actions if isinstance(a, Delete)) == [
        "ws-inference-1",
        "ws-inference-2",
        "ws-inference-3",
    ]
    final = cl.converge()
    assert final.status["replicas"] == 1 and final.status["ready"] == "2/2" and final.status["epoch"] == 2


def test_max_restarts_fails_the_object_and_stops_acting() -> None:
    cl = ready_cluster(failurePolicy={"maxRestarts": 1})
    cl.pods["ws-inference-0"] = replace(cl.pods["ws-inference-0"], phase="Failed")
    cl.step()
    cl.run_all()
    assert cl.converge().status["phase"] == "Ready"
    cl.pods["ws-inference-1"] = replace(cl.pods["ws-inference-1"], phase="Failed")
    p = cl.step()
    assert p.status["phase"] == "Failed" and p.status["restarts"] == 2
    assert conditions(p.status)["Failed"] == ("True", c.REASON_MAX_RESTARTS)
    assert "maxRestarts=1" in next(x["message"] for x in p.status["conditions"] if x["type"] == "Failed")
    assert p.actions == []
    assert any(e.reason == c.REASON_MAX_RESTARTS for e in p.events)
    # raising the bound resumes
    cl.spec = spec(failurePolicy={"maxRestarts": 5})
    p = cl.step()
    assert p.status["phase"] != "Failed"
    assert [a.name for a in p.actions if isinstance(a, Delete)] == ["ws-inference-1"]


def test_reserved_env_refuses_everything_with_one_event() -> None:
    s = spec()
    s["trainer"]["template"] = {
        "spec": {"containers": [{"name": "main", "env": [{"name": "WEIGHTSYNC_WORLD_SIZE", "value": "9"}]}]}
    }
    cl = Cluster(s)
    p = cl.step()
    assert p.actions == []
    assert p.status["phase"] == "Failed"
    failed = next(x for x in p.status["conditions"] if x["type"] == "Failed")
    assert failed["reason"] == c.REASON_RESERVED_ENV
    assert "WEIGHTSYNC_WORLD_SIZE" in failed["message"] and "spec.trainer.template" in failed["message"]
    assert [e.reason for e in p.events] == [c.REASON_RESERVED_ENV]
    assert cl.plan().events == [], "the same refusal is not announced twice"


def test_backoff_delays_recreation() -> None:
    cl = ready_cluster(failurePolicy={"backoffSeconds": 10, "maxBackoffSeconds": 60})
    del cl.pods["ws-inference-0"]
    p = cl.step()
    assert not [a for a in p.actions if isinstance(a, Create)]
    assert p.requeue_after == 10
    cl.now = T0 + timedelta(seconds=4)
    p = cl.step()
    assert p.requeue_after == 6 and not [a for a in p.actions if isinstance(a, Create)]
    cl.now = T0 + timedelta(seconds=10)
    p = cl.step()
    assert [a.obj["metadata"]["name"] for a in p.actions if isinstance(a, Create)] == ["ws-inference-0"]


def _recreate_after_backoff(cl: Cluster) -> float:
    """Lose inference-0, step until it is re-created (advancing the clock by each backoff); the first delay."""
    del cl.pods["ws-inference-0"]
    p = cl.step()
    first = p.requeue_after or 0.0
    while "ws-inference-0" not in cl.pods:
        cl.now += timedelta(seconds=p.requeue_after or 0.0)
        p = cl.step()
    cl.converge()
    assert cl.status["phase"] == "Ready", cl.status
    return first


def test_backoff_doubles_within_a_streak_and_starts_again_after_a_quiet_period() -> None:
    cl = ready_cluster(failurePolicy={"backoffSeconds": 2, "maxBackoffSeconds": 60, "backoffResetSeconds": 300,
                                      "maxRestarts": 100})
    delays = []
    for _ in range(4):  # failures in quick succession: 2, 4, 8, 16 s
        delays.append(_recreate_after_backoff(cl))
        cl.now += timedelta(seconds=30)
    assert delays == [2, 4, 8, 16]
    assert cl.status["restarts"] == 4 and cl.status["restartStreak"] == 4
    cl.now += timedelta(seconds=300)  # five quiet minutes since the last failure
    assert _recreate_after_backoff(cl) == 2, "a failure after backoffResetSeconds starts a new streak"
    assert cl.status["restarts"] == 5 and cl.status["restartStreak"] == 1, "maxRestarts still counts every one"
    assert any("backoff step 1" in e and "restart 5" in e for e in cl.events)


def test_the_backoff_is_announced_when_the_failure_is_counted_even_while_the_pod_terminates() -> None:
    cl = ready_cluster(failurePolicy={"backoffSeconds": 4})
    cl.pods["ws-inference-0"] = replace(cl.pods["ws-inference-0"], terminating=True)  # kubectl delete --wait=false
    p = cl.step()
    assert [e.message for e in p.events if e.reason == c.REASON_BACKOFF] == [
        "lost members are re-created 4s after the failure (restart 1, backoff step 1)"]
    del cl.pods["ws-inference-0"]  # gone: the backoff is waited out, and not announced again
    p = cl.step()
    assert p.requeue_after == 4 and not [e for e in p.events if e.reason == c.REASON_BACKOFF]


def test_a_status_from_before_streaks_keeps_its_backoff() -> None:
    cl = ready_cluster(failurePolicy={"backoffSeconds": 2, "maxBackoffSeconds": 60, "maxRestarts": 100})
    cl.status = {**cl.status, "restarts": 3, "lastFailureTime": "2026-01-01T00:00:00Z"}
    cl.status.pop("restartStreak", None)
    cl.now = T0 + timedelta(seconds=10)
    assert _recreate_after_backoff(cl) == 16  # the 4th failure of the streak


def test_last_sync_is_copied_from_the_trainer_annotation() -> None:
    cl = ready_cluster()
    report = {"version": 7, "tensors": 3, "bytes": 10, "seconds": 0.5, "gbps": 2.5, "transport": "gloo",
              "time": "2026-01-01T00:00:00Z", "acked": [1, 2], "epoch": 0}  # fmt: skip
    trainer = cl.pods["ws-trainer-0"]
    cl.pods["ws-trainer-0"] = replace(
        trainer, annotations={**trainer.annotations, LAST_SYNC_ANNOTATION: json.dumps(report)}
    )
    p = cl.step()
    assert p.status["lastSync"] == {k: v for k, v in report.items() if k != "acked"}
    assert p.actions == []
    cl.pods["ws-trainer-0"] = replace(trainer, annotations={**trainer.annotations, LAST_SYNC_ANNOTATION: "not json"})
    p = cl.step()
    assert p.status["lastSync"]["version"] == 7, "a bad report keeps the last good one"
    assert [e.reason for e in p.events] == [c.REASON_INVALID_REPORT]


def annotate_trainer(cl: Cluster, raw: str) -> None:
    trainer = cl.pods["ws-trainer-0"]
    cl.pods["ws-trainer-0"] = replace(trainer, annotations={**trainer.annotations, LAST_SYNC_ANNOTATION: raw})


def invalid_reports(p: Decision) -> list[str]:
    return [e.message for e in p.events if e.reason == c.REASON_INVALID_REPORT]


GOOD_REPORT = json.dumps({"version": 41, "epoch": 0, "time": "2026-01-01T00:00:00Z"})
OVERFLOW = '{"version": 99999999999999999999}'


def test_an_out_of_bounds_report_is_dropped_with_one_event_and_never_blocks_a_scale() -> None:
    cl = ready_cluster(replicas=3)
    annotate_trainer(cl, GOOD_REPORT)
    cl.step()
    annotate_trainer(cl, OVERFLOW)
    p = cl.step()
    (message,) = invalid_reports(p)
    assert "ws-trainer-0" in message and "version: Input should be less than or equal to" in message
    assert "status.lastSync keeps version 41" in message
    assert next(e for e in p.events if e.reason == c.REASON_INVALID_REPORT).type == "Warning"
    assert p.status["lastSync"]["version"] == 41, "the previous report stays"
    rejected = p.status["rejectedSyncReport"]
    assert rejected["message"].startswith("version: ") and rejected["time"] == "2026-01-01T00:00:00Z"
    assert "99999999999999999999" not in json.dumps(p.status), "nothing of it reaches the status write"

    # every resync after: the same value is not announced again, and the status is a fixed point
    again = cl.plan()
    assert invalid_reports(again) == [] and again.status == cl.status and again.actions == []

    # a scale 3 -> 2 is carried out as if the report were not there
    cl.spec["inference"]["replicas"] = 2
    cl.generation += 1
    p = cl.step()
    assert [a.name for a in p.actions if isinstance(a, Delete)] == ["ws-inference-2"]
    assert p.status["epoch"] == 1 and p.status["worldSize"] == 3
    assert invalid_reports(p) == []
    p = cl.converge()
    assert p.status["phase"] == "Ready" and p.status["ready"] == "3/3" and p.status["lastSync"]["version"] == 41
    assert sum(1 for e in cl.events if e.startswith(c.REASON_INVALID_REPORT)) == 1


def test_each_distinct_bad_report_is_announced_once_and_a_good_one_clears_the_record() -> None:
    cl = ready_cluster()
    annotate_trainer(cl, OVERFLOW)
    (message,) = invalid_reports(cl.step())
    assert "no status.lastSync yet" in message
    assert invalid_reports(cl.step()) == []
    assert "lastSync" not in cl.status and "rejectedSyncReport" in cl.status
    annotate_trainer(cl, '{"version": 1, "transport": "' + "x" * 200 + '"}')
    (message,) = invalid_reports(cl.step())
    assert "transport: String should have at most 128 characters" in message
    assert invalid_reports(cl.step()) == []

    annotate_trainer(cl, GOOD_REPORT)
    p = cl.step()
    assert p.events == [] and p.status["lastSync"]["version"] == 41
    assert p.status["rejectedSyncReport"] is None, "sent as null: the status is written as a merge patch"
    cl.status = {k: v for k, v in p.status.items() if v is not None}  # what the API server keeps
    p = cl.plan()
    assert "rejectedSyncReport" not in p.status and p.status == cl.status


def test_a_stored_last_sync_out_of_bounds_is_dropped_not_fatal() -> None:
    """A status written before the bounds existed (a negative version, say) must not stop planning."""
    cl = ready_cluster()
    cl.status = {**cl.status, "lastSync": {"version": -3, "gbps": "fast"}}
    p = cl.plan()
    assert p.status["lastSync"] is None and p.actions == []
    annotate_trainer(cl, GOOD_REPORT)
    assert cl.plan().status["lastSync"]["version"] == 41


def test_children_of_another_owner_are_left_alone() -> None:
    cl = Cluster(spec())
    foreign = observe_pod(
        {"metadata": {"name": "ws-trainer-0", "ownerReferences": [{"uid": "old", "controller": True}]}}, UID
    )
    cl.pods["ws-trainer-0"] = foreign
    p = cl.plan()
    assert "ws-trainer-0" not in [a.obj["metadata"]["name"] for a in p.actions if isinstance(a, Create)]
    assert not [a for a in p.actions if isinstance(a, (Delete, Patch))]
    assert any(e.reason == c.REASON_STALE_CHILD for e in p.events)


def test_deleted_service_is_recreated_and_drift_repaired() -> None:
    cl = ready_cluster()
    del cl.others["Service"]
    p = cl.plan()
    assert [a.obj["kind"] for a in p.actions if isinstance(a, Create)] == ["Service"]
    cl.act(p)
    svc = cl.others["Service"]
    cl.others["Service"] = {**svc, "spec": {**svc["spec"], "publishNotReadyAddresses": False}}
    p = cl.plan()
    assert [(a.kind, a.patch) for a in p.actions if isinstance(a, Patch)] == [
        ("Service", {"spec": {"publishNotReadyAddresses": True}})
    ]


def test_missing_secret_warns_when_members_already_exist() -> None:
    cl = ready_cluster()
    del cl.others["Secret"]
    p = cl.plan()
    (create,) = [a for a in p.actions if isinstance(a, Create)]
    assert create.obj["stringData"] == {"token": TOKEN}
    assert create.event is not None and create.event.reason == c.REASON_TOKEN_RECREATED


def test_observe_pod_reads_readiness_and_exit_codes() -> None:
    pod = observe_pod(
        {
            "metadata": {
                "name": "p",
                "uid": "u",
                "annotations": {EPOCH_ANNOTATION: "4"},
                "ownerReferences": [{"uid": UID, "controller": True}],
            },
            "status": {
                "phase": "Failed",
                "conditions": [{"type": "Ready", "status": "False"}],
                "containerStatuses": [
                    {"name": "main", "state": {"terminated": {"exitCode": 2, "reason": "Error"}}}
                ],
            },
        },
        UID,
    )
    assert pod.owned and pod.terminated and not pod.ready and pod.epoch == 4
    assert pod.detail == "container main exited with code 2 (Error)"


# --- property: any interleaving of failures, scales and crashes converges, counting each failure once ------

Step = tuple[str, int]
steps = st.lists(
    st.tuples(
        st.sampled_from(["fail", "vanish", "scale", "crash", "settle"]), st.integers(min_value=0, max_value=5)
    ),
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(steps)
def test_any_history_converges_and_counts_each_failure_once(history: list[Step]) -> None:
    cl = Cluster(spec(replicas=2, failurePolicy={"maxRestarts": 1000}))
    cl.converge()
    injected, shrunk = 0, False
    for kind, n in history:
        names = sorted(cl.pods)
        if kind in ("fail", "vanish") and names:
            victim = names[n % len(names)]
            pod = cl.pods[victim]
            members = {m["pod"] for m in cl.status.get("members", [])}
            if pod.phase == "Running" and victim in members:  # a recorded member that is up
                injected += 1
                if kind == "fail":
                    cl.pods[victim] = replace(pod, phase="Failed", ready=False)
                else:
                    del cl.pods[victim]
        elif kind == "scale":
            shrunk = shrunk or 1 + n % 4 < cl.spec["inference"]["replicas"]
            cl.spec = spec(replicas=1 + n % 4, failurePolicy={"maxRestarts": 1000})
        elif kind == "crash":
            cl.record(cl.plan())  # the decision is recorded, the operator dies before acting
        else:
            cl.step()
            cl.run_all()
    final = cl.converge()
    assert final.status["phase"] == "Ready"
    replicas = cl.spec["inference"]["replicas"]
    assert sorted(cl.pods) == sorted(["ws-trainer-0"] + [f"ws-inference-{r}" for r in range(replicas)])
    # a failed member that a scale-down removes is not re-created, so it is not a restart
    assert final.status["restarts"] == injected if not shrunk else final.status["restarts"] <= injected
    epoch = str(final.status["epoch"])
    assert {p.annotations[EPOCH_ANNOTATION] for p in cl.pods.values()} == {epoch}


# --- children we did not make, the token, templates, the API server's refusals ----------------------------


def foreign(obj: dict[str, Any], owner: str = "someone-else") -> dict[str, Any]:
    refs = [{"apiVersion": "v1", "kind": "ConfigMap", "name": owner, "uid": "other", "controller": True}]
    return {**obj, "metadata": {**obj["metadata"], "ownerReferences": refs}}


def ready_reason(status: dict[str, Any]) -> tuple[str, str]:
    ready = next(x for x in status["conditions"] if x["type"] == "Ready")
    return ready["reason"], ready["message"]


@pytest.mark.parametrize("kind", ["Service", "Secret", "Role", "RoleBinding", "NetworkPolicy"])
def test_a_shared_child_we_did_not_make_is_never_adopted_and_holds_the_members(kind: str) -> None:
    cl = Cluster(spec())
    cl.step()
    cl.others[kind] = foreign(cl.others[kind], owner="theirs")
    cl.others[kind] = {**cl.others[kind], "spec": {"clusterIP": "10.0.0.9"}} if kind == "Service" else cl.others[kind]
    p = cl.step()
    assert not [a for a in p.actions if isinstance(a, Create) and a.kind == "Pod"], "no member while it stands"
    assert not [a for a in p.actions if getattr(a, "name", "") == cl.others[kind]["metadata"]["name"]
                and not isinstance(a, Create)], "never patched or deleted"
    reason, message = ready_reason(p.status)
    assert reason == c.REASON_FOREIGN_CHILD and p.status["phase"] == "Pending"
    assert f"{kind} {cl.others[kind]['metadata']['name']} exists and is not this WeightSync's" in message
    assert "ConfigMap/theirs" in message
    assert [e.reason for e in p.events] == [c.REASON_FOREIGN_CHILD]
    assert cl.step().events == [], "announced once"
    # the user deletes it: it is re-created as ours and the members follow
    del cl.others[kind]
    assert cl.converge().status["phase"] == "Ready"


def test_a_replaced_token_secret_rolls_the_members_that_hold_the_old_token() -> None:
    cl = ready_cluster()
    old_uid = cl.others["Secret"]["metadata"]["uid"]
    del cl.others["Secret"]
    p = cl.step()
    (create,) = [a for a in p.actions if isinstance(a, Create)]
    assert create.obj["kind"] == "Secret" and create.event is not None
    assert create.event.reason == c.REASON_TOKEN_RECREATED
    assert p.status["phase"] != "Ready", "members hold a token the group no longer has"
    new_uid = cl.others["Secret"]["metadata"]["uid"]
    assert new_uid != old_uid
    members = sorted(cl.pods)
    p = cl.step()
    assert sorted(a.name for a in p.actions if isinstance(a, Delete)) == members
    assert p.status["epoch"] == 1 and p.status["restarts"] == 0, "a roll, not a failure"
    assert all(e.reason != c.REASON_MEMBER_LOST for e in p.events)
    final = cl.converge()
    assert final.status["phase"] == "Ready" and final.status["restarts"] == 0 and final.status["epoch"] == 1
    assert {pod.annotations[c.TOKEN_SECRET_UID] for pod in cl.pods.values()} == {new_uid}


def change_inference_template(cl: Cluster, image: str) -> None:
    cl.spec["inference"]["template"] = {"spec": {"containers": [{"name": "main", "image": image}]}}
    cl.generation += 1


def test_on_delete_a_changed_template_waits_and_a_deleted_stale_member_is_a_change() -> None:
    cl = ready_cluster(replicas=2, failurePolicy={"backoffSeconds": 30, "maxRestarts": 0})
    change_inference_template(cl, "engine:v2")
    p = cl.step()
    assert not [a for a in p.actions if isinstance(a, Delete)], "OnDelete: nothing is killed"
    assert p.status["phase"] == "Ready"
    _, message = ready_reason(p.status)
    assert "ws-inference-0, ws-inference-1 made from an older pod template" in message
    assert [m["upToDate"] for m in p.status["members"]] == [True, False, False]
    del cl.pods["ws-inference-0"]  # the user rolls one
    p = cl.step()
    assert p.status["restarts"] == 0 and p.status["epoch"] == 1 and p.status["phase"] != "Failed"
    created = [a.obj for a in p.actions if isinstance(a, Create)]
    assert [o["metadata"]["name"] for o in created] == ["ws-inference-0"], "no backoff for a change"
    assert [e.reason for e in p.events if e.reason == c.REASON_REPLACED] == [c.REASON_REPLACED]
    assert created[0]["spec"]["containers"][0]["image"] == "engine:v2"


def test_replace_strategy_rolls_every_stale_member_at_once_for_one_epoch() -> None:
    cl = ready_cluster(replicas=2, failurePolicy={"maxRestarts": 0})
    cl.spec["updateStrategy"] = {"type": "Replace"}
    change_inference_template(cl, "engine:v2")
    p = cl.step()
    assert sorted(a.name for a in p.actions if isinstance(a, Delete)) == ["ws-inference-0", "ws-inference-1"]
    assert p.status["epoch"] == 1 and p.status["restarts"] == 0
    final = cl.converge()
    assert final.status["phase"] == "Ready" and final.status["epoch"] == 1 and final.status["restarts"] == 0


@pytest.mark.parametrize("kind", ["Service", "Role", "RoleBinding", "NetworkPolicy"])
def test_recreating_a_shared_child_does_not_flap_a_ready_group(kind: str) -> None:
    cl = ready_cluster()
    del cl.others[kind]
    p = cl.step()
    assert [a.obj["kind"] for a in p.actions if isinstance(a, Create)] == [kind]
    assert p.status["phase"] == "Ready" and p.events == []


def rejection(code: int, kind: str = "Pod", name: str = "ws-inference-0") -> Any:
    from weightsync.operator.observed import Rejection

    return Rejection(kind, name, code, "Invalid" if code == 422 else "Forbidden",
                     'Pod "ws-inference-0" is invalid: spec.containers[0].image: Required value')


def test_a_child_the_api_server_calls_invalid_fails_the_group_and_creates_nothing() -> None:
    cl = Cluster(spec())
    cl.step()
    p = plan(cl.ws(), replace(cl.observed(), rejections=(rejection(422),)), cl.now, TOKEN)
    assert p.actions == [] and p.status["phase"] == "Failed"
    failed = next(x for x in p.status["conditions"] if x["type"] == "Failed")
    assert failed["reason"] == c.REASON_INVALID_CHILD
    assert "spec.containers[0].image: Required value" in failed["message"]
    assert [e.reason for e in p.events] == [c.REASON_INVALID_CHILD]
    cl.record(p)
    again = plan(cl.ws(), replace(cl.observed(), rejections=(rejection(422),)), cl.now, TOKEN)
    assert again.events == [], "announced once"


def test_a_child_refused_for_now_holds_every_member_and_says_why() -> None:
    cl = Cluster(spec())
    cl.step()
    p = plan(cl.ws(), replace(cl.observed(), rejections=(rejection(403),)), cl.now, TOKEN)
    assert not [a for a in p.actions if isinstance(a, Create)], "not even the members the server accepts"
    assert p.status["phase"] == "Pending"
    reason, message = ready_reason(p.status)
    assert reason == c.REASON_CHILD_REJECTED and "spec.containers[0].image" in message
    assert conditions(p.status)["Progressing"] == ("False", c.REASON_CHILD_REJECTED)
    assert [e.reason for e in p.events] == [c.REASON_CHILD_REJECTED]


def test_an_unschedulable_member_shows_in_the_ready_condition() -> None:
    cl = Cluster(spec())
    cl.converge()
    pod = cl.pods["ws-inference-1"]
    cl.pods["ws-inference-1"] = replace(pod, phase="Pending", ready=False,
                                        waiting="Unschedulable: 0/1 nodes are available: 1 Insufficient nvidia.com/gpu")
    p = cl.step()
    reason, message = ready_reason(p.status)
    assert reason == c.REASON_WAITING
    assert "ws-inference-1 cannot start: Unschedulable: 0/1 nodes are available" in message
    assert [e.reason for e in p.events] == [c.REASON_WAITING]
    assert cl.step().events == []


def test_observe_pod_reads_why_a_pod_cannot_start() -> None:
    unschedulable = observe_pod({"metadata": {"name": "p"}, "status": {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/1 nodes"}]}}, UID)
    assert unschedulable.waiting == "Unschedulable: 0/1 nodes"
    config = observe_pod({"metadata": {"name": "p"}, "status": {"phase": "Pending", "containerStatuses": [
        {"name": "main", "state": {"waiting": {"reason": "CreateContainerConfigError",
                                               "message": 'secret "x" not found'}}}]}}, UID)
    assert config.waiting == 'container main: CreateContainerConfigError: secret "x" not found'
    starting = observe_pod({"metadata": {"name": "p"}, "status": {"phase": "Pending", "containerStatuses": [
        {"name": "main", "state": {"waiting": {"reason": "ContainerCreating"}}}]}}, UID)
    assert starting.waiting == ""


def test_members_waiting_for_the_secret_are_dry_run_with_it() -> None:
    p = Cluster(spec(replicas=2)).plan()
    assert [a.kind for a in p.actions if isinstance(a, Create)] == [
        "Service", "Secret", "Role", "RoleBinding", "NetworkPolicy"]  # fmt: skip
    assert sorted(x.name for x in p.probes) == ["ws-inference-0", "ws-inference-1", "ws-trainer-0"]


# --- a trainer of several pods ---------------------------------------------------------------------------


def test_a_trainer_job_of_several_pods_gets_its_torchrun_env() -> None:
    from weightsync.operator import desired

    from weightsync.api.models import parse_spec

    body = spec(replicas=2)
    body["trainer"] = {**body["trainer"], "pods": 3, "ranksPerPod": 8}
    group = desired.Group("ws", "ns", UID, parse_spec(body))
    made = desired.pods(group)
    assert sorted(made) == ["ws-inference-0", "ws-inference-1", "ws-trainer-0", "ws-trainer-1", "ws-trainer-2"]
    env = {e["name"]: e.get("value") for e in made["ws-trainer-2"]["spec"]["containers"][0]["env"]}
    job = ("WEIGHTSYNC_TRAINER_PODS", "WEIGHTSYNC_TRAINER_POD_INDEX", "WEIGHTSYNC_TRAINER_RANKS_PER_POD")
    assert [env[k] for k in job] == ["3", "2", "8"]
    assert env["WEIGHTSYNC_MASTER_ADDR"] == "ws-trainer-0.ws.ns.svc.cluster.local", "pod 0 is the job's endpoint"
    pod_spec = made["ws-trainer-2"]["spec"]
    assert (pod_spec["hostname"], pod_spec["subdomain"]) == ("ws-trainer-2", "ws")
    assert env["WEIGHTSYNC_WORLD_SIZE"] == "3", "the sync group: the trainer's rank 0 plus the engines"
    inference = {e["name"]: e.get("value") for e in made["ws-inference-1"]["spec"]["containers"][0]["env"]}
    assert inference["WEIGHTSYNC_RANK_OFFSET"] == "2"


def test_a_lost_trainer_pod_re_creates_the_whole_trainer_job_and_the_engines_stay() -> None:
    body = spec(replicas=2, failurePolicy={"maxRestarts": 5})
    body["trainer"] = {**body["trainer"], "pods": 2}
    cl = Cluster(body)
    cl.converge()
    assert cl.status["phase"] == "Ready" and cl.status["trainerReady"] == "2/2"
    seen = len(cl.events)
    cl.pods["ws-trainer-1"] = replace(cl.pods["ws-trainer-1"], phase="Failed", ready=False)
    p = cl.step()
    assert sorted(a.name for a in p.actions if isinstance(a, Delete)) == ["ws-trainer-0", "ws-trainer-1"]
    assert p.status["restarts"] == 1, "one failure, however many pods the job loses with it"
    assert p.status["epoch"] == 1
    final = cl.converge()
    assert final.status["phase"] == "Ready" and final.status["restarts"] == 1 and final.status["epoch"] == 1
    acted_on = [e for e in cl.events[seen:] if "inference" in e and ("created" in e or "deleted" in e)]
    assert acted_on == [], "the engines re-joined in place"
    assert {p.annotations[EPOCH_ANNOTATION] for p in cl.pods.values()} == {"1"}


def test_trainer_pods_that_all_ended_together_count_one_failure() -> None:
    # A job of two pods: pod 1 is killed and pod 0's ranks, whose collectives fail with it, exit too, before
    # the operator's next pass. The job was lost once.
    body = spec(replicas=2, failurePolicy={"maxRestarts": 5})
    body["trainer"] = {**body["trainer"], "pods": 2}
    cl = Cluster(body)
    cl.converge()
    for name in ("ws-trainer-0", "ws-trainer-1"):
        cl.pods[name] = replace(cl.pods[name], phase="Failed", ready=False)
    p = cl.step()
    assert sorted(a.name for a in p.actions if isinstance(a, Delete)) == ["ws-trainer-0", "ws-trainer-1"]
    assert (p.status["restarts"], p.status["epoch"]) == (1, 1), "one failure of the trainer's job"
    final = cl.converge()
    assert (final.status["phase"], final.status["restarts"], final.status["epoch"]) == ("Ready", 1, 1)
