from __future__ import annotations

import json

import pytest
from weightsync.runtime.manifest import Manifest, TransferConfig, build_manifest
from weightsync.runtime.packing import TensorSpec

CONFIG = TransferConfig("weightsync", True, 1 << 20, 2, False)


def test_the_manifest_round_trips_as_json_and_rebuilds_the_same_plan() -> None:
    specs = [TensorSpec("a", "bfloat16", (3, 4), 2), TensorSpec("b", "bool", (), 1), TensorSpec("c", "int64", (0,), 8)]
    manifest, plan = build_manifest(7, CONFIG, specs, 1 << 20, (1, 2, 3))
    raw = json.dumps(manifest.to_doc())
    again = Manifest.from_doc(json.loads(raw))
    assert again == manifest
    assert again.plan() == plan


def test_a_repeated_tensor_set_travels_as_its_signature_only() -> None:
    specs = [TensorSpec(f"t{i}", "float32", (i, 3), 4) for i in range(100)]
    first, _ = build_manifest(1, CONFIG, specs, 1 << 20)
    second = first.with_version(2, ())
    compact = second.to_doc(include_tensors=False)
    assert len(json.dumps(compact)) < len(json.dumps(first.to_doc())) / 10
    assert Manifest.from_doc(compact, {first.signature: first}) == second
    with pytest.raises(ValueError, match="never received"):
        Manifest.from_doc(compact, {})


def test_config_differences_name_the_setting() -> None:
    mine = TransferConfig("weightsync", True, 1 << 21, 2, False)
    assert mine.differences(CONFIG) == ["buffer_bytes: trainer has 1048576, this member has 2097152"]
    assert CONFIG.differences(CONFIG) == []


@pytest.mark.parametrize("doc", [[], {"format": 1}, {"format": 1, "signature": "s", "tensors": [["a", "float32"]]},
                                 {"format": 1, "signature": "s", "tensors": [], "version": "x"}])
def test_a_malformed_manifest_is_a_value_error_that_says_so(doc: object) -> None:
    with pytest.raises(ValueError, match="manifest"):
        Manifest.from_doc(doc)  # type: ignore[arg-type]
