from __future__ import annotations

import pytest
from weightsync.runtime.manifest import Manifest, TransferConfig, build_manifest
from weightsync.runtime.plan import TensorSpec

CONFIG = TransferConfig("weightsync", True, 1 << 20, 2, False)


def test_the_manifest_round_trips_as_json_and_rebuilds_the_same_plan() -> None:
    specs = [TensorSpec("a", "bfloat16", (3, 4), 2), TensorSpec("b", "bool", (), 1), TensorSpec("c", "int64", (0,), 8)]
    manifest, plan = build_manifest(7, CONFIG, specs, 1 << 20, (1, 2, 3))
    raw = manifest.to_json()
    assert b"pickle" not in raw and raw.startswith(b"{")
    again = Manifest.from_json(raw)
    assert again == manifest
    assert again.plan() == plan


def test_a_repeated_tensor_set_travels_as_its_signature_only() -> None:
    specs = [TensorSpec(f"t{i}", "float32", (i, 3), 4) for i in range(100)]
    first, _ = build_manifest(1, CONFIG, specs, 1 << 20)
    second = first.with_version(2, ())
    compact = second.to_json(include_tensors=False)
    assert len(compact) < len(first.to_json()) / 10
    assert Manifest.from_json(compact, {first.signature: first}) == second
    with pytest.raises(ValueError, match="never received"):
        Manifest.from_json(compact, {})


def test_config_differences_name_the_setting() -> None:
    mine = TransferConfig("weightsync", True, 1 << 21, 2, False)
    assert mine.differences(CONFIG) == ["buffer_bytes: trainer has 1048576, this member has 2097152"]
    assert CONFIG.differences(CONFIG) == []
