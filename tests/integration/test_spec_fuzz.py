"""Bad input at scale: hypothesis-generated WeightSync specs applied to the real API server, with the
operator running. Every spec the models accept is admitted and reconciled; every one they refuse is refused
at admission with a message naming the field; nothing in between: a spec the API server admits but the
operator cannot carry out ends in a condition naming the field. The operator never crashes. Counts are
printed (pytest -s shows them)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from weightsync.sandbox import Sandbox
from weightsync.sandbox.waiting import wait_for

from weightsync.api.models import parse_spec

from .conftest import OperatorProcess
from .test_operator import TIMEOUT_S, template

pytestmark = pytest.mark.cluster

EXAMPLES = 40
COUNTS: dict[str, int] = {"admitted": 0, "refused": 0, "reconciled": 0, "failed-with-condition": 0}


#: Values the models accept, per field path, and values they do not (each a way a user gets it wrong).
FIELDS: dict[str, tuple[list[Any], list[Any]]] = {
    "inference.replicas": ([1, 2], [-1, 0, 513, "2"]),
    "inference.workersPerReplica": ([1, 2], [0, 65]),
    "rendezvous.port": ([1, 29500, 65535], [0, 70000]),
    "rendezvous.timeoutSeconds": ([0.5, 60, 86400], [-1, 0, 90000]),
    "transport.backend": (["gloo"], ["mpi", ""]),
    "transport.protocol": (["weightsync"], ["grpc"]),
    "transport.bufferSizeBytes": ([1 << 16, 1 << 20], [1024, 1 << 37]),
    "transport.numBuffers": ([1, 8], [0, 9]),
    "network.ncclEnv": ([{}, {"NCCL_DEBUG": "WARN"}], [{"LD_PRELOAD": "x"}]),
    "network.rdmaResource": ([], ["memory", "kubernetes.io/ib", "ib", "rdma/ib"]),  # rdma/ib: needs nccl
    "failurePolicy.maxRestarts": ([0, 3], [-1, 10001]),
    "failurePolicy.backoffSeconds": ([0, 1], [-1, 4000]),
    "failurePolicy.backoffResetSeconds": ([1, 600], [0, 700000]),
    "updateStrategy.type": (["OnDelete", "Replace"], ["Rolling"]),
    "engine.port": ([8000, 9000], [0, 70000]),
    "bogus": ([], [1]),
}
#: Specs the API server admits but the operator cannot carry out: a condition must say why.
ADMITTED_BUT_REFUSED = [
    ("trainer.template.spec.containers.0.env", [{"name": "WEIGHTSYNC_RANK_OFFSET", "value": "3"}]),
    ("inference.template.spec.containers.0.name", "Engine"),
]


def base() -> dict[str, Any]:
    return {"trainer": {"template": template()}, "inference": {"replicas": 1, "template": template()},
            "transport": {"backend": "gloo"}, "failurePolicy": {"backoffSeconds": 0}}  # fmt: skip


def put(spec: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node: Any = spec
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


@st.composite
def specs(draw: st.DrawFn) -> dict[str, Any]:
    spec = base()
    for path, (good, _) in FIELDS.items():  # a valid spec with some fields set
        if good and draw(st.booleans()):
            put(spec, path, draw(st.sampled_from(good)))
    kind = draw(st.sampled_from(["valid", "invalid", "invalid", "admitted-but-refused"]))
    if kind == "invalid":
        path = draw(st.sampled_from(sorted(FIELDS)))
        put(spec, path, draw(st.sampled_from(FIELDS[path][1])))
    elif kind == "admitted-but-refused":
        path, value = draw(st.sampled_from(ADMITTED_BUT_REFUSED))
        put(spec, path, value)
    return spec


def models_accept(spec: dict[str, Any]) -> bool:
    try:
        parse_spec(spec)
    except (ValidationError, ValueError):
        return False
    return True


@pytest.fixture(scope="module")
def counter() -> Any:
    yield COUNTS
    print(f"\nfuzzed WeightSync specs: {json.dumps(COUNTS)}")


def test_generated_specs_are_admitted_and_reconciled_or_refused_naming_the_field(
    sandbox: Sandbox, namespace: str, operator: OperatorProcess, counter: dict[str, int]
) -> None:
    seen = [0]

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(specs())
    def one(spec: dict[str, Any]) -> None:
        seen[0] += 1
        name = f"f{seen[0]}"
        obj = {"apiVersion": "weightsync.dev/v1alpha1", "kind": "WeightSync", "metadata": {"name": name}, "spec": spec}
        proc = sandbox.kubectl("create", "-n", namespace, "-f", "-", input=yaml.safe_dump(obj), check=False)
        accepted = models_accept(spec)
        if proc.returncode != 0:
            counter["refused"] += 1
            assert not accepted, f"the models accept what the API server refuses: {proc.stderr}\n{spec}"
            assert "spec." in proc.stderr or "unknown field" in proc.stderr, proc.stderr
            return
        counter["admitted"] += 1
        assert accepted, f"the API server admits what the models refuse:\n{spec}"

        def reconciled() -> dict[str, Any] | None:
            out = sandbox.kubectl("get", "ws", name, "-n", namespace, "-o", "json").stdout
            ws = json.loads(out)
            status = ws.get("status") or {}
            return status if status.get("observedGeneration") == ws["metadata"]["generation"] else None

        status = wait_for(reconciled, TIMEOUT_S, f"ws/{name} reconciled")
        if status.get("phase") == "Failed":
            counter["failed-with-condition"] += 1
            failed = next(x for x in status["conditions"] if x["type"] == "Failed")
            assert "spec." in failed["message"] or "is invalid" in failed["message"], failed
        else:
            counter["reconciled"] += 1
        sandbox.kubectl("delete", "ws", name, "-n", namespace, "--wait=false")
        assert operator.healthy()

    one()
    assert counter["admitted"] and counter["refused"], counter
    assert "Traceback" not in operator.tail(), operator.tail()
