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
    transport = root_schema()["properties"]["spec"]["properties"]["transport"]
    rules = [r["rule"] for r in transport["x-kubernetes-validations"]]
    assert rules == ["self.protocol != 'vllm' || self.backend == 'nccl'", "self == oldSelf"]
