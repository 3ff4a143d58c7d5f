"""The operator reacts to its children through watches, not GETs: a deleted child is back at once, and an
idle group costs the API server nothing however often it is resynced."""

from __future__ import annotations

import re

import pytest
import yaml
from weightsync.sandbox import Sandbox
from weightsync.sandbox.waiting import wait_for

from .conftest import OperatorProcess
from .test_operator import get, manifest, wait_ready

pytestmark = pytest.mark.cluster

#: Far below the resync (600 s), so only a watch can bring a child back in time; kubectl's polling on a loaded
#: machine takes most of it. bench/operator_scale.py measures the time itself.
BACK_WITHIN_S = 10.0


def counters(operator: OperatorProcess, name: str) -> dict[str, float]:
    out = {}
    for line in operator.metrics().splitlines():
        m = re.match(rf'{name}_total\{{\w+="([^"]+)"\}} (\S+)', line)
        if m:
            out[m[1]] = float(m[2])
    return out


def reconciles(operator: OperatorProcess) -> float:
    return next(
        float(x.split()[1]) for x in operator.metrics().splitlines() if x.startswith("weightsync_reconciles_total ")
    )


def test_an_idle_group_costs_no_requests_per_resync(
    sandbox: Sandbox, namespace: str, operator: OperatorProcess
) -> None:
    operator.stop()
    operator.start(resync_seconds=0.5)
    sandbox.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest(replicas=2)))
    wait_ready(sandbox, namespace, 0, 3)
    # settled: the last writes of forming are done once two reconciles in a row write nothing
    start_reconciles = reconciles(operator)
    wait_for(lambda: reconciles(operator) >= start_reconciles + 4, 60, "the resync to run")
    before = counters(operator, "weightsync_api_requests")
    start = reconciles(operator)
    wait_for(lambda: reconciles(operator) >= start + 10, 60, "ten resyncs")
    after = counters(operator, "weightsync_api_requests")
    spent = {verb: after.get(verb, 0) - before.get(verb, 0) for verb in after}
    assert {verb: n for verb, n in spent.items() if verb != "WATCH" and n} == {}, spent
    assert after.get("WATCH", 0) >= 5, "every child kind is watched"


@pytest.mark.parametrize(
    ("kind", "name"),
    [("role", "ws-trainer-report"), ("rolebinding", "ws-trainer-report"), ("service", "ws"), ("secret", "ws-token")],
)
def test_a_deleted_child_is_back_at_once(
    sandbox: Sandbox, namespace: str, operator: OperatorProcess, kind: str, name: str
) -> None:
    operator.stop()
    operator.start(resync_seconds=600)  # only a watch can bring it back in time
    sandbox.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest(replicas=1)))
    wait_ready(sandbox, namespace, 0, 2)
    old = get(sandbox, namespace, kind, name)["metadata"]["uid"]  # type: ignore[index]
    sandbox.kubectl("delete", kind, name, "-n", namespace, "--wait=false")
    wait_for(
        lambda: (o := get(sandbox, namespace, kind, name)) and o["metadata"]["uid"] != old,
        BACK_WITHIN_S,
        f"{kind} {name} to come back",
    )
