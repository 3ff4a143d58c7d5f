"""Bad WeightSyncs are rejected at admission by the CRD's schema and CEL rules, naming the field.

Only the API server is involved: a rejected object is never stored, so nothing can be created for it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from weightsync.sandbox import Sandbox

pytestmark = pytest.mark.cluster

Spec = dict[str, Any]


def good(name: str = "ws") -> dict[str, Any]:
    template = {"spec": {"containers": [{"name": "main", "image": "x", "command": ["sleep", "1"]}]}}
    return {
        "apiVersion": "weightsync.dev/v1alpha1",
        "kind": "WeightSync",
        "metadata": {"name": name},
        "spec": {
            "trainer": {"template": copy.deepcopy(template)},
            "inference": {"replicas": 2, "template": copy.deepcopy(template)},
        },
    }


def edit(fn: Callable[[dict[str, Any]], None], name: str = "ws") -> dict[str, Any]:
    obj = good(name)
    fn(obj)
    return obj


def spec_set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def fn(obj: dict[str, Any]) -> None:
        node = obj["spec"]
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value

    return fn


def spec_del(path: str) -> Callable[[dict[str, Any]], None]:
    def fn(obj: dict[str, Any]) -> None:
        node = obj["spec"]
        *parents, leaf = path.split(".")
        for key in parents:
            node = node[key]
        del node[leaf]

    return fn


def both(*fns: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def fn(obj: dict[str, Any]) -> None:
        for f in fns:
            f(obj)

    return fn


BAD = [
    ("replicas-zero", edit(spec_set("inference.replicas", 0)), "spec.inference.replicas"),
    ("replicas-too-many", edit(spec_set("inference.replicas", 513)), "spec.inference.replicas"),
    ("workers-zero", edit(spec_set("inference.workersPerReplica", 0)), "spec.inference.workersPerReplica"),
    ("port-out-of-range", edit(spec_set("rendezvous.port", 70000)), "spec.rendezvous.port"),
    ("timeout-zero", edit(spec_set("rendezvous.timeoutSeconds", 0)), "spec.rendezvous.timeoutSeconds"),
    ("backend-unknown", edit(spec_set("transport.backend", "mpi")), "spec.transport.backend"),
    ("protocol-unknown", edit(spec_set("transport.protocol", "grpc")), "spec.transport.protocol"),
    ("engine-port-out-of-range", edit(spec_set("engine.port", 0)), "spec.engine.port"),
    ("engine-pause-mode-unknown", edit(spec_set("engine.pauseMode", "drain")), "spec.engine.pauseMode"),
    ("engine-rendezvous-unknown", edit(spec_set("engine.rendezvous", "etcd")), "spec.engine.rendezvous"),
    ("update-strategy-unknown", edit(spec_set("updateStrategy.type", "Rolling")), "spec.updateStrategy.type"),
    ("buffer-too-small", edit(spec_set("transport.bufferSizeBytes", 1024)), "spec.transport.bufferSizeBytes"),
    ("num-buffers-too-many", edit(spec_set("transport.numBuffers", 9)), "spec.transport.numBuffers"),
    ("nccl-env-not-nccl", edit(spec_set("network.ncclEnv", {"LD_PRELOAD": "x"})), "spec.network.ncclEnv"),
    (
        "rdma-needs-nccl",
        edit(both(spec_set("network.rdmaResource", "rdma/ib"), spec_set("transport.backend", "gloo"))),
        "spec.network.rdmaResource needs spec.transport.backend 'nccl'",
    ),
    (
        "rdma-kubernetes-io",
        edit(spec_set("network.rdmaResource", "kubernetes.io/ib")),
        "spec.network.rdmaResource must not be in the kubernetes.io domain",
    ),
    (
        "rdma-sub-kubernetes-io",
        edit(spec_set("network.rdmaResource", "rdma.kubernetes.io/ib")),
        "spec.network.rdmaResource must not be in the kubernetes.io domain",
    ),
    (
        "rdma-memory",
        edit(spec_set("network.rdmaResource", "memory")),
        "spec.network.rdmaResource must be an extended resource name",
    ),
    (
        "rdma-unprefixed",
        edit(spec_set("network.rdmaResource", "ib")),
        "spec.network.rdmaResource must be an extended resource name",
    ),
    (
        "rdma-quota-prefix",
        edit(spec_set("network.rdmaResource", "requests.rdma/ib")),
        "spec.network.rdmaResource must not start with 'requests.'",
    ),
    (
        "rdma-long-domain",
        edit(spec_set("network.rdmaResource", "a" * 245 + "/ib")),
        "spec.network.rdmaResource: the domain before '/' must be at most 244 characters",
    ),
    (
        "backoff-bounds",
        edit(spec_set("failurePolicy", {"backoffSeconds": 30, "maxBackoffSeconds": 10})),
        "spec.failurePolicy.maxBackoffSeconds must be at least spec.failurePolicy.backoffSeconds",
    ),
    (
        "max-restarts-negative",
        edit(spec_set("failurePolicy.maxRestarts", -1)),
        "spec.failurePolicy.maxRestarts",
    ),
    (
        "no-containers",
        edit(spec_set("trainer.template.spec.containers", [])),
        "spec.trainer.template.spec.containers",
    ),
    ("template-without-spec", edit(spec_del("inference.template.spec")), "spec.inference.template.spec"),
    ("no-inference", edit(spec_del("inference")), "spec.inference"),
    (
        "restart-policy-always",
        edit(spec_set("inference.template.spec.restartPolicy", "Always")),
        "spec.inference.template.spec.restartPolicy",
    ),
    (
        "hostname-set",
        edit(spec_set("trainer.template.spec.hostname", "mine")),
        "template.spec.hostname and template.spec.subdomain of the trainer pod are set by the operator",
    ),
    ("name-too-long", good("a" * 50), "metadata.name must be at most 49 characters"),
    ("name-starts-with-digit", good("1ws"), "metadata.name must start with a lowercase letter"),
]


@pytest.mark.parametrize(("obj", "field"), [(obj, field) for _, obj, field in BAD], ids=[i for i, _, _ in BAD])
def test_bad_spec_is_rejected_naming_the_field(
    sandbox: Sandbox, namespace: str, crds: None, obj: dict[str, Any], field: str
) -> None:
    proc = sandbox.kubectl("create", "-n", namespace, "-f", "-", input=yaml.safe_dump(obj), check=False)
    assert proc.returncode != 0, f"accepted: {json.dumps(obj['spec'])}"
    assert "is invalid" in proc.stderr, proc.stderr
    assert field in proc.stderr, proc.stderr
    stored = sandbox.kubectl("get", "weightsyncs,pods,services,secrets", "-n", namespace, "-o", "name").stdout
    assert "weightsync" not in stored and "pod/" not in stored, stored


@pytest.mark.parametrize("resource", ["nvidia.com/gpu", "rdma/ib", "a" * 244 + "/" + "b" * 63])
def test_extended_resource_names_are_admitted(sandbox: Sandbox, namespace: str, crds: None, resource: str) -> None:
    obj = edit(spec_set("network.rdmaResource", resource))
    sandbox.kubectl("create", "-n", namespace, "-f", "-", input=yaml.safe_dump(obj))
    spec = json.loads(sandbox.kubectl("get", "ws", "ws", "-n", namespace, "-o", "json").stdout)["spec"]
    assert spec["network"]["rdmaResource"] == resource


IMMUTABLE = [
    ("inference.workersPerReplica", 4, "spec.inference.workersPerReplica is immutable"),
    ("transport.numBuffers", 4, "spec.transport is immutable"),
    ("rendezvous.port", 30000, "spec.rendezvous is immutable"),
    ("network.hostNetwork", True, "spec.network is immutable"),
    ("engine.port", 8001, "spec.engine is immutable"),
]


@pytest.mark.parametrize(("path", "value", "message"), IMMUTABLE, ids=[p for p, _, _ in IMMUTABLE])
def test_group_wiring_is_immutable(
    *, sandbox: Sandbox, namespace: str, crds: None, path: str, value: Any, message: str
) -> None:
    sandbox.kubectl("create", "-n", namespace, "-f", "-", input=yaml.safe_dump(good()))
    changed = edit(spec_set(path, value))
    proc = sandbox.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(changed), check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    # scale and failurePolicy stay mutable
    sandbox.kubectl("scale", "ws/ws", "-n", namespace, "--replicas=3")
    sandbox.kubectl(
        "patch",
        "ws",
        "ws",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec":{"failurePolicy":{"maxRestarts":3}}}',
    )


def test_defaults_are_filled_in_by_the_api_server(sandbox: Sandbox, namespace: str, crds: None) -> None:
    sandbox.kubectl("create", "-n", namespace, "-f", "-", input=yaml.safe_dump(good()))
    spec = json.loads(sandbox.kubectl("get", "ws", "ws", "-n", namespace, "-o", "json").stdout)["spec"]
    assert spec["rendezvous"] == {"port": 29500, "timeoutSeconds": 300}
    assert spec["transport"]["backend"] == "nccl" and spec["transport"]["bufferSizeBytes"] == 1 << 30
    assert spec["inference"]["workersPerReplica"] == 1
    assert spec["failurePolicy"]["maxRestarts"] == 10
    explain = sandbox.kubectl("explain", "ws.spec.inference.workersPerReplica").stdout
    assert "tensor x pipeline parallel size" in explain
