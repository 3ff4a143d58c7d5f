"""A real sync group of local processes over loopback (gloo): 1 trainer and 3 receivers."""

from __future__ import annotations

import json

import pytest
from local_members import group_envs, run_group


@pytest.mark.parametrize("buffer_bytes", [1 << 16, 1 << 30], ids=["small-buffers", "default-buffers"])
def test_several_syncs_arrive_bit_exact_in_both_receiver_styles(buffer_bytes: int) -> None:
    envs = group_envs(replicas=3, workers_per_replica=1, buffer_bytes=buffer_bytes, timeout=60)
    results = run_group(envs, versions=3, count=300, large_numel=50_000, styles=("into", "loader"))

    errors = {r: res["message"] for r, res in results.items() if "error" in res}
    assert not errors, errors
    trainer = results[0]
    for rank in (1, 2, 3):
        assert results[rank]["digests"] == trainer["digests"], f"rank {rank} differs from the trainer"
    reports = [json.loads(r) for r in trainer["reports"]]
    assert [r["version"] for r in reports] == [0, 1, 2]
    assert all(r["tensors"] == 301 and r["acked"] == [1, 2, 3] and r["bytes"] > 200_000 for r in reports)
    assert all(r["gbps"] > 0 and r["transport"] == "gloo/tcp" for r in reports)


def test_pods_with_several_workers_each_get_every_tensor() -> None:
    envs = group_envs(replicas=2, workers_per_replica=2, buffer_bytes=1 << 16, timeout=60)
    results = run_group(envs, versions=2, count=120, styles=("loader", "into"))

    assert not {r: res["message"] for r, res in results.items() if "error" in res}
    assert sorted(results) == [0, 1, 2, 3, 4]
    for rank in (1, 2, 3, 4):
        assert results[rank]["digests"] == results[0]["digests"]


def test_checksums_are_verified_on_every_receiver() -> None:
    envs = group_envs(replicas=2, workers_per_replica=1, buffer_bytes=1 << 16, checksums=True, timeout=60)
    results = run_group(envs, versions=2, count=80, large_numel=20_000)

    assert not {r: res["message"] for r, res in results.items() if "error" in res}
    assert results[1]["digests"] == results[2]["digests"] == results[0]["digests"]
