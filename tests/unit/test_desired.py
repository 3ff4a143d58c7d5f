"""desired.py: the exact children of a WeightSync, for several shapes of spec."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from weightsync.operator import constants as c
from weightsync.operator import desired

from weightsync.api.models import parse_spec
from weightsync.contract import (
    ENDPOINTS_ANNOTATION,
    EPOCH_ANNOTATION,
    PODINFO_MOUNT_PATH,
    WORLD_SIZE_ANNOTATION,
    MemberEnv,
    reserved_env_names,
)

NS = "team-a"
UID = "1234-uid"


def template(**spec: Any) -> dict[str, Any]:
    return {"spec": {"containers": [{"name": "main", "image": "img", "command": ["run"]}], **spec}}


def group(replicas: int = 2, workers: int = 1, epoch: int = 0, **extra: Any) -> desired.Group:
    spec = {
        "trainer": {"template": extra.pop("trainer_template", template())},
        "inference": {
            "replicas": replicas,
            "workersPerReplica": workers,
            "template": extra.pop("inference_template", template()),
        },
        **extra,
    }
    return desired.Group("ws", NS, UID, parse_spec(spec), epoch)


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize(("replicas", "workers"), [(1, 1), (2, 2), (3, 4), (5, 8)])
def test_slots_follow_the_rank_convention(replicas: int, workers: int) -> None:
    g = group(replicas, workers)
    slots = desired.slots("ws", g.spec)
    assert [s.pod for s in slots] == ["ws-trainer-0"] + [f"ws-inference-{r}" for r in range(replicas)]
    assert [(s.rank_offset, s.local_world_size) for s in slots] == [(0, 1)] + [
        (1 + r * workers, workers) for r in range(replicas)
    ]
    ranks = [s.rank_offset + k for s in slots for k in range(s.local_world_size)]
    assert ranks == list(range(g.spec.world_size))


@pytest.mark.parametrize(("replicas", "workers"), [(1, 1), (2, 2), (3, 4)])
def test_exact_env_for_every_member(replicas: int, workers: int) -> None:
    g = group(replicas, workers, epoch=3, transport={"backend": "gloo", "numBuffers": 3})
    master = "ws-trainer-0.ws.team-a.svc.cluster.local"
    endpoints = tuple(f"ws-inference-{r}.ws.team-a.svc.cluster.local" for r in range(replicas))
    for slot in desired.slots("ws", g.spec):
        pod = desired.pod(g, slot)
        env = env_of(pod["spec"]["containers"][0])
        expected = MemberEnv(
            name="ws",
            namespace=NS,
            role="trainer" if slot.role == "trainer" else "inference",
            master_addr=master,
            world_size=1 + replicas * workers,
            rank_offset=slot.rank_offset,
            local_world_size=slot.local_world_size,
            backend="gloo",
            num_buffers=3,
            token="x" * 16,
            epoch=3,
            endpoints=endpoints if slot.role == "trainer" else (),
        ).to_env()
        del expected[c.TOKEN_ENV]
        assert {k: v for k, v in env.items() if k != c.TOKEN_ENV} == expected
        assert env[c.TOKEN_ENV] == {"secretKeyRef": {"name": "ws-token", "key": "token"}}
        assert set(env) == reserved_env_names()


def test_token_never_appears_literally() -> None:
    g = group()
    secret = desired.secret(g, "s3cr3t-token-value-0123456789abcdef")
    assert secret["stringData"] == {"token": "s3cr3t-token-value-0123456789abcdef"}
    for pod in desired.pods(g).values():
        assert "s3cr3t" not in str(pod)
        assert "<from-secret-key-ref>" not in str(pod)


def test_user_template_is_respected() -> None:
    user = template(
        nodeSelector={"gpu": "h200"},
        tolerations=[{"key": "gpu", "operator": "Exists"}],
        affinity={"nodeAffinity": {"x": 1}},
        serviceAccountName="trainer-sa",
        volumes=[{"name": "data", "emptyDir": {}}],
    )
    user["metadata"] = {"labels": {"team": "rl", c.NAME_LABEL: "spoof"}, "annotations": {"note": "hi"}}
    main = user["spec"]["containers"][0]
    main["env"] = [{"name": "MY_VAR", "value": "1"}, {"name": "WEIGHTSYNC_LOG_LEVEL", "value": "debug"}]
    main["resources"] = {"limits": {"nvidia.com/gpu": "1"}}
    main["volumeMounts"] = [{"name": "data", "mountPath": "/data"}]
    user["spec"]["containers"].append({"name": "sidecar", "image": "s"})
    original = copy.deepcopy(user)
    g = group(trainer_template=user)
    pod = desired.pod(g, desired.slots("ws", g.spec)[0])
    assert user == original, "the spec must not be mutated"
    spec = pod["spec"]
    assert spec["nodeSelector"] == {"gpu": "h200"}
    assert spec["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    assert spec["affinity"] == {"nodeAffinity": {"x": 1}}
    assert spec["serviceAccountName"] == "trainer-sa"
    assert spec["volumes"][0] == {"name": "data", "emptyDir": {}}
    assert spec["volumes"][-1]["name"] == c.PODINFO_VOLUME
    assert pod["metadata"]["labels"]["team"] == "rl"
    assert pod["metadata"]["labels"][c.NAME_LABEL] == "ws"
    assert pod["metadata"]["annotations"]["note"] == "hi"
    assert pod["metadata"]["annotations"][EPOCH_ANNOTATION] == "0"
    first, sidecar = spec["containers"]
    assert first["resources"] == {"limits": {"nvidia.com/gpu": "1"}}
    assert first["env"][-2:] == main["env"], "user env comes after ours (it may reference it)"
    for container in (first, sidecar):
        assert {"name": c.PODINFO_VOLUME, "mountPath": PODINFO_MOUNT_PATH, "readOnly": True} in container[
            "volumeMounts"
        ]
        assert reserved_env_names() <= set(env_of(container))
    assert first["volumeMounts"][0] == {"name": "data", "mountPath": "/data"}


def test_pod_identity_and_restart_policy() -> None:
    g = group(2, 2)
    for slot in desired.slots("ws", g.spec):
        pod = desired.pod(g, slot)
        assert pod["metadata"]["name"] == slot.pod
        assert pod["spec"]["hostname"] == slot.pod
        assert pod["spec"]["subdomain"] == "ws"
        assert pod["spec"]["restartPolicy"] == "Never"
        assert pod["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "weightsync.dev/v1alpha1",
                "kind": "WeightSync",
                "name": "ws",
                "uid": UID,
                "controller": True,
            }
        ]
        assert pod["metadata"]["labels"][c.ROLE_LABEL] == slot.role
        assert pod["metadata"]["labels"][c.REPLICA_LABEL] == str(slot.replica)
        assert "hostNetwork" not in pod["spec"]


def test_network_section_is_identical_on_every_member() -> None:
    g = group(
        3,
        2,
        network={
            "hostNetwork": True,
            "ncclEnv": {"NCCL_IB_HCA": "mlx5", "NCCL_SOCKET_IFNAME": "eth"},
            "rdmaResource": "rdma/ib",
            "rdmaCount": 2,
        },
    )
    seen = []
    for pod in desired.pods(g).values():
        env = env_of(pod["spec"]["containers"][0])
        seen.append({k: v for k, v in env.items() if k.startswith("NCCL_")})
        assert pod["spec"]["hostNetwork"] is True
        assert pod["spec"]["dnsPolicy"] == "ClusterFirstWithHostNet"
        resources = pod["spec"]["containers"][0]["resources"]
        assert resources["limits"]["rdma/ib"] == resources["requests"]["rdma/ib"] == "2"
    assert seen == [{"NCCL_IB_HCA": "mlx5", "NCCL_SOCKET_IFNAME": "eth"}] * 4


def resources_template(*containers: dict[str, Any]) -> dict[str, Any]:
    return {"spec": {"containers": [{"name": f"c{i}", "image": "img", **x} for i, x in enumerate(containers)]}}


def member_resources(g: desired.Group) -> list[list[Any]]:
    """Every member's containers' resources, in container order."""
    return [[ct.get("resources") for ct in pod["spec"]["containers"]] for pod in desired.pods(g).values()]


def test_rdma_resource_is_added_beside_the_templates_own_resources_never_over_them() -> None:
    own = {"requests": {"memory": "8Gi", "cpu": "4", "nvidia.com/gpu": "4"}, "limits": {"nvidia.com/gpu": "4"}}
    tpl = resources_template({"resources": own}, {"resources": {"requests": {"memory": "1Gi"}}})
    before = copy.deepcopy(tpl)
    g = group(trainer_template=tpl, inference_template=tpl, network={"rdmaResource": "rdma/ib", "rdmaCount": 2})
    for first, second in member_resources(g):
        assert first == {
            "requests": {"memory": "8Gi", "cpu": "4", "nvidia.com/gpu": "4", "rdma/ib": "2"},
            "limits": {"nvidia.com/gpu": "4", "rdma/ib": "2"},
        }
        assert second == {"requests": {"memory": "1Gi"}}, "only the first container gets the device"
    assert tpl == before and g.spec.trainer.template == before, "the spec's template is not mutated"


@pytest.mark.parametrize(
    ("containers", "why"),
    [
        ([{"resources": {"requests": {"nvidia.com/gpu": "4"}, "limits": {"nvidia.com/gpu": "4"}}}], "both"),
        ([{"resources": {"limits": {"nvidia.com/gpu": "4"}}}], "limits only (requests default to limits)"),
        ([{"resources": {"requests": {"nvidia.com/gpu": "2"}}}], "requests only"),
        ([{}, {"resources": {"limits": {"nvidia.com/gpu": "1"}}}], "another container"),
    ],
    ids=["both", "limits", "requests", "second-container"],
)
def test_a_resource_the_template_sets_is_left_exactly_as_it_is(containers: list[dict[str, Any]], why: str) -> None:
    tpl = resources_template(*containers)
    g = group(trainer_template=tpl, inference_template=tpl, network={"rdmaResource": "nvidia.com/gpu"})
    expected = [ct.get("resources") for ct in resources_template(*containers)["spec"]["containers"]]
    assert member_resources(g) == [expected] * 3, why


@pytest.mark.parametrize("resources", [None, {"requests": None, "limits": None}, {}])
def test_rdma_resource_fills_empty_or_null_resources(resources: dict[str, Any] | None) -> None:
    tpl = resources_template({"resources": resources})
    g = group(trainer_template=tpl, inference_template=tpl, network={"rdmaResource": "example.com/rdma"})
    assert member_resources(g) == [[{"limits": {"example.com/rdma": "1"}, "requests": {"example.com/rdma": "1"}}]] * 3


def test_no_rdma_resource_touches_no_resources() -> None:
    tpl = resources_template({"resources": {"requests": {"memory": "8Gi"}}}, {})
    assert member_resources(group(trainer_template=tpl, inference_template=tpl)) == [
        [{"requests": {"memory": "8Gi"}}, None]
    ] * 3


def test_service_is_headless_and_publishes_not_ready_addresses() -> None:
    svc = desired.service(group(rendezvous={"port": 31000}))
    assert svc["metadata"]["name"] == "ws"
    assert svc["spec"] == {
        "clusterIP": "None",
        "publishNotReadyAddresses": True,
        "selector": {c.NAME_LABEL: "ws"},
        "ports": [{"name": "rendezvous", "port": 31000, "targetPort": 31000, "protocol": "TCP"}],
    }


def test_report_role_allows_only_the_trainer_pod() -> None:
    g = group(trainer_template=template(serviceAccountName="trainer-sa"))
    role = desired.report_role(g)
    assert role["metadata"]["name"] == "ws-trainer-report"
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["pods"],
            "resourceNames": ["ws-trainer-0"],
            "verbs": ["get", "patch"],
        }
    ]
    binding = desired.report_role_binding(g)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "trainer-sa", "namespace": NS}]
    assert binding["roleRef"]["name"] == "ws-trainer-report"
    assert desired.report_role_binding(group())["subjects"][0]["name"] == "default"


def test_trainer_annotations_carry_endpoints_and_world_size() -> None:
    g = group(2, 2, epoch=4)
    trainer = desired.slots("ws", g.spec)[0]
    assert desired.member_annotations(g, trainer, 4) == {
        EPOCH_ANNOTATION: "4",
        WORLD_SIZE_ANNOTATION: "5",
        ENDPOINTS_ANNOTATION: "ws-inference-0.ws.team-a.svc.cluster.local,ws-inference-1.ws.team-a.svc.cluster.local",
    }


def test_env_conflicts_name_the_field_and_variable() -> None:
    bad = template()
    bad["spec"]["containers"][0]["env"] = [
        {"name": "WEIGHTSYNC_RANK_OFFSET", "value": "7"},
        {"name": "NCCL_IB_HCA", "value": "x"},
        {"name": "WEIGHTSYNC_LOG_LEVEL", "value": "debug"},  # not reserved: allowed
    ]
    g = group(inference_template=bad, network={"ncclEnv": {"NCCL_IB_HCA": "mlx5"}})
    problems = desired.env_conflicts(g.spec)
    assert len(problems) == 2
    assert "spec.inference.template.spec.containers[main].env sets WEIGHTSYNC_RANK_OFFSET" in problems[0]
    assert "NCCL_IB_HCA" in problems[1]
    assert desired.env_conflicts(group().spec) == []
