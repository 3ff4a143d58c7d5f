"""The WeightSync API models and the CRD generated from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from weightsync.api import crd, models

ROOT = Path(__file__).resolve().parents[2]


def minimal_spec(**overrides: Any) -> dict[str, Any]:
    template = {"spec": {"containers": [{"name": "main", "image": "x"}]}}
    spec: dict[str, Any] = {"trainer": {"template": template}, "inference": {"template": template}}
    spec.update(overrides)
    return spec


def schema_nodes(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, node)]
    for name, sub in node.get("properties", {}).items():
        out += schema_nodes(sub, f"{path}.{name}")
    if "items" in node:
        out += schema_nodes(node["items"], f"{path}[]")
    return out


def root_schema() -> dict[str, Any]:
    schema: dict[str, Any] = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def test_checked_in_files_match_the_models() -> None:
    assert crd.stale(ROOT) == [], "run `python -m weightsync.api.crd` and commit the result"


def test_chart_crds_are_identical_to_top_level_crds() -> None:
    for name in (crd.CRD_FILE, crd.PEERING_FILE):
        top = (ROOT / "crds" / name).read_text()
        assert (ROOT / "charts/weightsync-operator/crds" / name).read_text() == top


def test_schema_is_structural_and_every_field_is_described() -> None:
    for path, node in schema_nodes(root_schema()):
        assert "type" in node, f"{path} has no type"
        for banned in ("$ref", "anyOf", "allOf", "oneOf", "title", "$defs"):
            assert banned not in node, f"{path} has {banned}"
        if node.get("additionalProperties") is False:
            pytest.fail(f"{path} has additionalProperties: false")
        if path not in ("", ".metadata"):
            assert node.get("description"), f"{path} has no description"


def test_crd_shape() -> None:
    doc = crd.crd()
    assert doc["metadata"]["name"] == "weightsyncs.weightsync.dev"
    assert doc["spec"]["names"]["shortNames"] == ["ws"]
    version = doc["spec"]["versions"][0]
    assert version["name"] == "v1alpha1"
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.inference.replicas"
    assert version["subresources"]["scale"]["statusReplicasPath"] == ".status.replicas"
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase"
    assert columns["Ready"] == ".status.ready"
    assert columns["Epoch"] == ".status.epoch"
    assert columns["Version"] == ".status.lastSync.version"
    assert columns["GB/s"] == ".status.lastSync.gbps"
    assert columns["Age"] == ".metadata.creationTimestamp"


def test_templates_preserve_unknown_fields_with_containers_declared() -> None:
    spec = root_schema()["properties"]["spec"]["properties"]
    for role in ("trainer", "inference"):
        template = spec[role]["properties"]["template"]
        assert template["x-kubernetes-preserve-unknown-fields"] is True
        assert template["properties"]["spec"]["properties"]["containers"]["minItems"] == 1


def test_crd_defaults_equal_model_defaults() -> None:
    """What the API server fills in is exactly what the operator's models assume."""
    spec = root_schema()["properties"]["spec"]["properties"]
    parsed = models.parse_spec(minimal_spec())
    dumped = parsed.model_dump(by_alias=True, exclude_none=True, mode="json")
    for section in ("rendezvous", "transport", "network", "failurePolicy"):
        assert spec[section]["default"] == dumped[section], section
        for name, node in spec[section]["properties"].items():
            if "default" in node:
                assert node["default"] == dumped[section][name], f"{section}.{name}"
    assert spec["inference"]["properties"]["replicas"]["default"] == parsed.inference.replicas == 1


def test_world_size_and_defaults() -> None:
    spec = models.parse_spec(
        minimal_spec(inference={**minimal_spec()["inference"], "replicas": 3, "workersPerReplica": 4})
    )
    assert spec.world_size == 13
    assert spec.rendezvous.port == 29500
    assert spec.transport.backend == "nccl"
    assert spec.failure_policy.max_restarts == 10


@pytest.mark.parametrize(
    ("patch", "where"),
    [
        ({"inference": {"replicas": 0}}, "replicas"),
        ({"inference": {"workersPerReplica": 65}}, "workers_per_replica"),
        ({"rendezvous": {"port": 70000}}, "port"),
        ({"transport": {"backend": "mpi"}}, "backend"),
        ({"transport": {"numBuffers": 9}}, "num_buffers"),
        ({"trainer": {"template": {"spec": {"containers": []}}}}, "template"),
    ],
)
def test_models_reject_what_the_crd_rejects(patch: dict[str, Any], where: str) -> None:
    spec = minimal_spec()
    for key, value in patch.items():
        spec[key] = {**spec.get(key, {}), **value}
    with pytest.raises(ValidationError):
        models.parse_spec(spec)


def test_backoff_doubles_and_is_capped() -> None:
    policy = models.FailurePolicy(backoff_seconds=2, max_backoff_seconds=10)
    assert [policy.backoff(n) for n in range(6)] == [0, 2, 4, 8, 10, 10]
    assert models.FailurePolicy(backoff_seconds=0).backoff(5) == 0


def test_name_rules_fit_pod_hostnames() -> None:
    longest = "a" * models.MAX_NAME_LENGTH
    assert len(f"{longest}-inference-{models.MAX_REPLICAS - 1}") == 63
    rules = [r["rule"] for r in root_schema()["x-kubernetes-validations"]]
    assert any("size(self.metadata.name)" in r for r in rules)


def test_every_cel_message_names_its_field() -> None:
    for path, node in schema_nodes(root_schema()):
        for rule in node.get("x-kubernetes-validations", []):
            leaf = path.rsplit(".", 1)[-1] or "metadata.name"
            assert leaf in rule["message"] or "metadata.name" in rule["message"], (path, rule)


def test_generated_yaml_parses_and_has_header() -> None:
    text = crd.crd_yaml()
    assert text.startswith("# Generated by")
    assert yaml.safe_load(text) == crd.crd()
    peering = list(yaml.safe_load_all(crd.peering_yaml()))
    assert {d["spec"]["names"]["kind"] for d in peering} == {"KopfPeering", "ClusterKopfPeering"}


def test_markdown_reference_lists_every_field() -> None:
    text = crd.markdown()
    for path, _ in schema_nodes(root_schema()["properties"]["spec"], "spec"):
        if path != "spec" and (".template." not in path or path.endswith(".template")):
            assert f"`{path}`" in text, path


def test_type_level_and_field_level_rules_are_both_kept() -> None:
    from pydantic import BaseModel, ConfigDict, Field

    class Inner(BaseModel):
        model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [models.cel("self.a > 0", "a")]})
        a: int = 1

    class Outer(BaseModel):
        inner: Inner = Field(default_factory=Inner, json_schema_extra=models.immutable("spec.inner"))

    inner = crd.structural(Outer.model_json_schema())["properties"]["inner"]
    assert [r["rule"] for r in inner["x-kubernetes-validations"]] == ["self.a > 0", "self == oldSelf"]


# --- spec.network.rdmaResource: extended resource names only ---------------------------------------------

EXTENDED = ["rdma/ib", "nvidia.com/gpu", "rdma/hca_shared_devices_a", "example.com/Mellanox.ConnectX-7",
            "k8s.io/x", f"{'a' * models.MAX_RESOURCE_DOMAIN_LENGTH}/ib", f"rdma/{'x' * 63}"]  # fmt: skip
NOT_EXTENDED = [
    ("memory", "must be an extended resource name"),
    ("cpu", "must be an extended resource name"),
    ("ephemeral-storage", "must be an extended resource name"),
    ("hugepages-2Mi", "must be an extended resource name"),
    ("ib", "must be an extended resource name"),
    ("kubernetes.io/ib", "must not be in the kubernetes.io domain"),
    ("rdma.kubernetes.io/ib", "must not be in the kubernetes.io domain"),
    ("requests.rdma/ib", "must not start with 'requests.'"),
    ("RDMA/ib", "must be an extended resource name"),
    ("rdma/ib/x", "must be an extended resource name"),
    ("rdma/-ib", "must be an extended resource name"),
    ("rdma/", "must be an extended resource name"),
    ("/ib", "must be an extended resource name"),
    ("rdma/ib\n", "must be an extended resource name"),
    (f"rdma/{'x' * 64}", "must be an extended resource name"),
    (f"{'a' * (models.MAX_RESOURCE_DOMAIN_LENGTH + 1)}/ib", "the domain before '/' must be at most 244"),
]


def with_rdma(name: str) -> dict[str, Any]:
    return minimal_spec(network={"rdmaResource": name})


@pytest.mark.parametrize("name", EXTENDED)
def test_extended_resource_names_are_accepted(name: str) -> None:
    assert models.extended_resource_problem(name) is None
    assert models.parse_spec(with_rdma(name)).network.rdma_resource == name


@pytest.mark.parametrize(("name", "why"), NOT_EXTENDED, ids=[n[:40] for n, _ in NOT_EXTENDED])
def test_other_resource_names_are_refused_naming_the_field(name: str, why: str) -> None:
    with pytest.raises(ValidationError) as err:
        models.parse_spec(with_rdma(name))
    assert "spec.network.rdmaResource" in str(err.value) and why in str(err.value)


def test_the_crd_applies_the_same_rdma_rules_as_the_model() -> None:
    node = root_schema()["properties"]["spec"]["properties"]["network"]["properties"]["rdmaResource"]
    rules = {r["rule"]: r["message"] for r in node["x-kubernetes-validations"]}
    assert len(rules) == len(models._RDMA_RULES)
    for rule, message, _ in models._RDMA_RULES:
        assert rules[rule] == message
    assert "\\" not in next(iter(rules)), "a backslash would be a CEL escape"
    assert node["maxLength"] == models.MAX_RESOURCE_NAME_LENGTH and "pattern" not in node


# --- status.lastSync: the trainer's report, within bounds the API server stores ---------------------------


def test_last_sync_bounds_are_in_the_crd() -> None:
    node = root_schema()["properties"]["status"]["properties"]["lastSync"]["properties"]
    for name in ("version", "tensors", "bytes", "epoch"):
        assert (node[name]["minimum"], node[name]["maximum"]) == (0, models.MAX_STATUS_INT), name
        assert float(node[name]["maximum"]) == node[name]["maximum"] < 2**63, "exact as a float64, in int64"
    for name in ("seconds", "gbps"):
        assert node[name]["minimum"] == 0, name
    assert node["transport"]["maxLength"] == models.MAX_TRANSPORT_LENGTH
    assert node["time"] == {**node["time"], "format": "date-time", "maxLength": models.MAX_TIME_LENGTH}
    status = root_schema()["properties"]["status"]["properties"]
    assert set(status["rejectedSyncReport"]["properties"]) == {"digest", "message", "time"}


@pytest.mark.parametrize(
    "report",
    [
        {"version": "1"},
        {"version": 1.0},
        {"version": 2**63},
        {"version": 1, "gbps": float("inf")},
        {"version": 1, "seconds": float("nan")},
        {"version": 1, "time": "2026-01-01"},
    ],
)
def test_last_sync_model_is_strict(report: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        models.LastSync.model_validate(report)


def test_the_models_refuse_what_the_crd_refuses_in_nccl_env() -> None:
    """Found by tests/integration/test_spec_fuzz.py: the CRD's CEL rule refused it, the models did not."""
    spec = {"trainer": {"template": {"spec": {"containers": [{"name": "a"}]}}},
            "inference": {"template": {"spec": {"containers": [{"name": "a"}]}}},
            "network": {"ncclEnv": {"NCCL_DEBUG": "WARN", "LD_PRELOAD": "x"}}}  # fmt: skip
    with pytest.raises(ValidationError, match="NCCL_\\* variables only, not LD_PRELOAD"):
        models.parse_spec(spec)
