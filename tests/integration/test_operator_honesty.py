"""The operator never stuck in silence and never trusting what it did not make, against the real API server:
children the API server refuses, objects of our names that someone else made, a replaced token, template
roll-outs, members that cannot be scheduled."""

from __future__ import annotations

from typing import Any

import pytest
from weightsync.operator import constants as c
from weightsync.sandbox import Sandbox
from weightsync.sandbox.waiting import wait_for

from .conftest import OperatorProcess
from .test_operator import (
    RESYNC_SECONDS,
    TIMEOUT_S,
    apply,
    children,
    events,
    expected_children,
    get,
    manifest,
    pods,
    status,
    template,
    wait_ready,
    wait_status,
)

pytestmark = pytest.mark.cluster


def condition(st: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(x for x in st.get("conditions", []) if x["type"] == type_)


def reconciles(operator: OperatorProcess) -> float:
    line = next(x for x in operator.metrics().splitlines() if x.startswith("weightsync_reconciles_total "))
    return float(line.split()[1])


def wait_reconciles(operator: OperatorProcess, more: int) -> None:
    """Until the operator reconciled `more` more times (each resync is one): a state that should hold does."""
    start = reconciles(operator)
    wait_for(lambda: reconciles(operator) >= start + more, TIMEOUT_S + more * RESYNC_SECONDS, f"{more} reconciles")


def test_a_template_the_api_server_calls_invalid_creates_nothing_and_names_the_field(
    sandbox: Sandbox, namespace: str, operator: OperatorProcess
) -> None:
    no_image = template(container={"image": None})
    no_image["spec"]["containers"][0].pop("image")
    apply(sandbox, namespace, manifest(inference_template=no_image))
    st = wait_status(sandbox, namespace, "Failed", lambda s: s.get("phase") == "Failed")
    failed = condition(st, "Failed")
    assert failed["reason"] == c.REASON_INVALID_CHILD
    assert "spec.containers[0].image: Required value" in failed["message"], failed
    assert "ws-inference-0" in failed["message"]
    wait_reconciles(operator, 2)
    assert children(sandbox, namespace) == {k: [] for k in expected_children(1)}, "nothing at all is created"
    assert len(events(sandbox, namespace, c.REASON_INVALID_CHILD)) == 1, "announced once, not every resync"
    assert "Traceback" not in operator.tail()

    sandbox.kubectl("patch", "ws", "ws", "-n", namespace, "--type=merge",
                    "-p", '{"spec": {"inference": {"template": ' + _json(template()) + "}}}")  # fmt: skip
    wait_ready(sandbox, namespace, 0, 3)


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj)


def test_a_missing_service_account_is_reported_and_heals_when_it_appears(
    sandbox: Sandbox, namespace: str, operator: OperatorProcess
) -> None:
    apply(sandbox, namespace, manifest(trainer_template=template(serviceAccountName="robot")))
    st = wait_status(
        sandbox, namespace, "ChildRejected", lambda s: s.get("conditions") and condition(s, "Ready")["reason"]
        == c.REASON_CHILD_REJECTED,
    )  # fmt: skip
    ready = condition(st, "Ready")
    assert "ws-trainer-0" in ready["message"] and "robot" in ready["message"], ready
    assert st["phase"] == "Pending"
    assert pods(sandbox, namespace) == {}, "no member while one of them is refused"
    assert events(sandbox, namespace, c.REASON_CHILD_REJECTED)
    sandbox.kubectl("create", "serviceaccount", "robot", "-n", namespace)
    st = wait_ready(sandbox, namespace, 0, 3)
    assert st["restarts"] == 0


@pytest.mark.parametrize("kind", ["service", "secret"])
def test_a_child_of_our_name_that_someone_else_made_is_never_adopted(
    sandbox: Sandbox, namespace: str, operator: OperatorProcess, kind: str
) -> None:
    if kind == "service":
        sandbox.kubectl("create", "service", "clusterip", "ws", "--tcp=80:80", "-n", namespace)
        name = "ws"
    else:
        sandbox.kubectl("create", "secret", "generic", "ws-token", "--from-literal=other=x", "-n", namespace)
        name = "ws-token"
    before = get(sandbox, namespace, kind, name)
    apply(sandbox, namespace, manifest())
    st = wait_status(
        sandbox, namespace, "ForeignChild", lambda s: s.get("conditions") and condition(s, "Ready")["reason"]
        == c.REASON_FOREIGN_CHILD,
    )  # fmt: skip
    assert f"{kind.capitalize()} {name} exists and is not this WeightSync's" in condition(st, "Ready")["message"]
    wait_reconciles(operator, 2)
    assert pods(sandbox, namespace) == {}
    after = get(sandbox, namespace, kind, name)
    assert after is not None and before is not None
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"], "left untouched"
    assert len(events(sandbox, namespace, c.REASON_FOREIGN_CHILD)) == 1
    assert status(sandbox, namespace)["phase"] != "Ready"

    sandbox.kubectl("delete", kind, name, "-n", namespace)
    wait_ready(sandbox, namespace, 0, 3)


def test_a_replaced_token_rolls_every_member_without_counting_failures(
    sandbox: Sandbox, namespace: str, operator: OperatorProcess
) -> None:
    apply(sandbox, namespace, manifest(replicas=2, failurePolicy={"maxRestarts": 0, "backoffSeconds": 0}))
    wait_ready(sandbox, namespace, 0, 3)
    before = {n: p["metadata"]["uid"] for n, p in pods(sandbox, namespace).items()}
    sandbox.kubectl("delete", "secret", "ws-token", "-n", namespace)
    st = wait_ready(sandbox, namespace, 1, 3)
    assert st["restarts"] == 0 and st["phase"] == "Ready"
    after = pods(sandbox, namespace)
    assert all(after[n]["metadata"]["uid"] != uid for n, uid in before.items()), "every member holds the new token"
    secret_uid = get(sandbox, namespace, "secret", "ws-token")["metadata"]["uid"]  # type: ignore[index]
    assert {p["metadata"]["annotations"][c.TOKEN_SECRET_UID] for p in after.values()} == {secret_uid}
    assert children(sandbox, namespace) == expected_children(2)


def test_replace_strategy_rolls_out_a_template_change_for_one_epoch(
    sandbox: Sandbox, namespace: str, operator: OperatorProcess
) -> None:
    spec = {"updateStrategy": {"type": "Replace"}, "failurePolicy": {"maxRestarts": 0, "backoffSeconds": 30}}
    apply(sandbox, namespace, manifest(replicas=2, **spec))
    wait_ready(sandbox, namespace, 0, 3)
    before = {n: p["metadata"]["uid"] for n, p in pods(sandbox, namespace).items()}
    changed = template(container={"env": [{"name": "ENGINE_FLAG", "value": "2"}]})
    apply(sandbox, namespace, manifest(replicas=2, inference_template=changed, **spec))
    st = wait_ready(sandbox, namespace, 1, 3)
    assert st["restarts"] == 0
    after = pods(sandbox, namespace)
    assert after["ws-trainer-0"]["metadata"]["uid"] == before["ws-trainer-0"], "the trainer's template is unchanged"
    for n in ("ws-inference-0", "ws-inference-1"):
        assert after[n]["metadata"]["uid"] != before[n]
        assert {"name": "ENGINE_FLAG", "value": "2"} in after[n]["spec"]["containers"][0]["env"]


def test_on_delete_a_user_rolls_members_one_by_one_without_spending_restarts(
    sandbox: Sandbox, namespace: str, operator: OperatorProcess
) -> None:
    spec = {"failurePolicy": {"maxRestarts": 0, "backoffSeconds": 30}}
    apply(sandbox, namespace, manifest(replicas=2, **spec))
    wait_ready(sandbox, namespace, 0, 3)
    changed = template(container={"env": [{"name": "ENGINE_FLAG", "value": "2"}]})
    apply(sandbox, namespace, manifest(replicas=2, inference_template=changed, trainer_template=changed, **spec))
    st = wait_status(sandbox, namespace, "members out of date",
                     lambda s: "made from an older pod template" in condition(s, "Ready")["message"])  # fmt: skip
    assert st["phase"] == "Ready", "OnDelete: nothing is killed for a template change"
    for epoch, member in enumerate(["ws-inference-0", "ws-inference-1", "ws-trainer-0"], start=1):
        sandbox.kubectl("delete", "pod", member, "-n", namespace)
        st = wait_ready(sandbox, namespace, epoch, 3)
        assert st["restarts"] == 0, "a deliberate roll is no failure"
    assert "older pod template" not in condition(st, "Ready")["message"]
    assert all(m["upToDate"] for m in st["members"])


def test_an_unschedulable_member_is_named_in_the_ready_condition(
    sandbox: Sandbox, namespace: str, operator: OperatorProcess
) -> None:
    huge = template(container={"resources": {"requests": {"cpu": "4000"}}})
    apply(sandbox, namespace, manifest(replicas=1, inference_template=huge))
    st = wait_status(
        sandbox, namespace, "MembersWaiting", lambda s: s.get("conditions") and condition(s, "Ready")["reason"]
        == c.REASON_WAITING,
    )  # fmt: skip
    message = condition(st, "Ready")["message"]
    assert "ws-inference-0 cannot start: Unschedulable" in message and "cpu" in message, message
    assert events(sandbox, namespace, c.REASON_WAITING)


def _with_container(**extra: Any) -> dict[str, Any]:
    t = template()
    t["spec"]["containers"][0].update(extra)
    return t


REFUSED_BY_THE_API_SERVER = [
    ("upper-case-container-name", {"inference_template": _with_container(name="Engine")}, "spec.containers[0].name"),
    ("two-containers-one-name", {"inference_template": {"spec": {"containers": [
        template()["spec"]["containers"][0], template()["spec"]["containers"][0]]}}}, "spec.containers[1].name"),
    ("volume-named-like-ours", {"trainer_template": {"spec": {**template()["spec"], "volumes": [
        {"name": "weightsync-podinfo", "emptyDir": {}}]}}}, "spec.volumes[1].name"),
    ("mount-over-ours", {"trainer_template": {"spec": {**template(volumes=[{"name": "v", "emptyDir": {}}])["spec"],
        "containers": [{**template()["spec"]["containers"][0],
                        "volumeMounts": [{"name": "v", "mountPath": "/etc/weightsync/podinfo"}]}]}}},
     "mountPath"),
    ("invalid-label-value", {"trainer_template": {"metadata": {"labels": {"team": "a b"}}, **template()}},
     "metadata.labels"),
    ("nccl-env-not-a-name", {"network": {"ncclEnv": {"NCCL_X=Y": "1"}}}, "Invalid value: \"NCCL_X=Y\""),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "spec", "field"), REFUSED_BY_THE_API_SERVER, ids=[c[0] for c in REFUSED_BY_THE_API_SERVER]
)
def test_each_template_the_api_server_refuses_fails_the_group_naming_the_field(
    sandbox: Sandbox, namespace: str, operator: OperatorProcess, case: str, spec: dict[str, Any], field: str
) -> None:
    apply(sandbox, namespace, manifest(**spec))
    st = wait_status(sandbox, namespace, "Failed", lambda s: s.get("phase") == "Failed")
    failed = condition(st, "Failed")
    assert failed["reason"] == c.REASON_INVALID_CHILD and field in failed["message"], failed
    assert pods(sandbox, namespace) == {}
    wait_for(lambda: events(sandbox, namespace, c.REASON_INVALID_CHILD), TIMEOUT_S, "an InvalidChild event")
