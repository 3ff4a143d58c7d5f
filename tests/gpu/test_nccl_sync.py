"""The runtime's correctness and failure tests on NCCL: one trainer GPU, every other GPU a receiver."""

from __future__ import annotations

import json

import pytest
from local_members import group_envs, run_group

pytestmark = pytest.mark.gpu

TIMEOUT = 20.0
SLACK = 8.0


def _layout() -> tuple[int, dict[int, str]]:
    import torch

    n = torch.cuda.device_count()
    return n - 1, {r: f"cuda:{r}" for r in range(n)}


@pytest.mark.parametrize("buffer_bytes", [1 << 16, 1 << 30], ids=["small-buffers", "default-buffers"])
def test_several_syncs_arrive_bit_exact_over_nccl(buffer_bytes: int) -> None:
    replicas, devices = _layout()
    envs = group_envs(replicas, 1, backend="nccl", buffer_bytes=buffer_bytes, checksums=True, timeout=60)
    results = run_group(envs, versions=3, count=300, large_numel=3_000_000, devices=devices,
                        styles=("into", "loader"))

    assert not {r: res["message"] for r, res in results.items() if "error" in res}
    for rank in range(1, replicas + 1):
        assert results[rank]["digests"] == results[0]["digests"], f"rank {rank}"
    reports = [json.loads(r) for r in results[0]["reports"]]
    assert [r["version"] for r in reports] == [0, 1, 2]
    assert all(r["transport"].startswith("nccl") and r["acked"] == list(range(1, replicas + 1)) for r in reports)


def test_a_mismatched_config_is_refused_over_nccl() -> None:
    replicas, devices = _layout()
    envs = group_envs(replicas, 1, backend="nccl", timeout=TIMEOUT)
    envs[1] = envs[1].model_copy(update={"num_buffers": 3})
    results = run_group(envs, versions=1, count=20, devices=devices)

    for rank, res in results.items():
        assert res.get("error") == "ConfigMismatchError", (rank, res)
        assert "rank 1" in res["message"] and "num_buffers" in res["message"]


def test_a_receiver_killed_mid_sync_aborts_nccl_and_is_named() -> None:
    replicas, devices = _layout()
    victim = replicas
    envs = group_envs(replicas, 1, backend="nccl", timeout=TIMEOUT, buffer_bytes=1 << 20)
    results = run_group(envs, versions=1, count=50, large_numel=50_000_000, devices=devices,
                        block_rank=victim, kill_on_first_batch=victim)

    killed_at = results[victim]["killed_at"]
    for rank, res in results.items():
        if rank == victim:
            continue
        assert res.get("error") == "PeerLostError", (rank, res)
        assert f"rank {victim}" in res["message"]
        assert res["at"] - killed_at <= TIMEOUT + SLACK


def test_the_trainer_killed_mid_sync_is_named_over_nccl() -> None:
    replicas, devices = _layout()
    envs = group_envs(replicas, 1, backend="nccl", timeout=TIMEOUT, buffer_bytes=1 << 20)
    # Rank 1 dawdles over each batch, so the trainer dies while the sync is still under way.
    results = run_group(envs, versions=1, count=50, large_numel=50_000_000, devices=devices,
                        block_rank=1, block_seconds=1.0, kill_on_first_batch=0)

    killed_at = results[0]["killed_at"]
    survivors = {r: res for r, res in results.items() if r != 0}
    assert survivors
    for rank, res in survivors.items():
        assert res.get("error") == "PeerLostError", (rank, res)
        assert "rank 0 (trainer" in res["message"]
        assert res["at"] - killed_at <= TIMEOUT + SLACK


def test_a_member_that_never_arrives_is_named_over_nccl() -> None:
    replicas, devices = _layout()
    timeout = 8.0
    envs = group_envs(replicas, 1, backend="nccl", timeout=timeout)
    results = run_group(envs, versions=1, count=10, devices=devices, skip_ranks=(replicas,))

    for rank, res in results.items():
        assert res.get("error") in ("RendezvousError", "PeerLostError"), (rank, res)
        assert f"rank {replicas}" in res["message"]
        assert res["at"] - res["began"] <= timeout + SLACK
