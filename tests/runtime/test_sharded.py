"""A sharded trainer: every rank of a real FSDP2 job (gloo, CPU) calls send(); receivers in other processes."""

from __future__ import annotations

import json

import pytest
import torch
from local_members import group_envs
from sharded_members import model_layout, run_sharded_group

TIMEOUT = 15.0
SLACK = 8.0


def _ok(results: dict[int, dict]) -> None:
    assert not {r: (res.get("message"), res.get("trace")) for r, res in results.items() if "error" in res}


@pytest.mark.parametrize("world", [2, 4])
def test_every_rank_of_an_fsdp2_job_sends_and_receivers_get_every_version_bit_exact(world: int) -> None:
    envs = group_envs(replicas=2, workers_per_replica=1, timeout=TIMEOUT, buffer_bytes=1 << 16)
    results = run_sharded_group(envs, world, versions=3, layers=3, width=96)

    _ok(results)
    trainer = results[0]
    assert len(set(trainer["digests"].values())) == 3  # the weights changed between versions
    for rank in (1, 2):
        assert results[rank]["digests"] == trainer["digests"], rank
    # every trainer rank returned rank 0's report
    for r in range(1, world):
        assert results[-1 - r]["reports"] == trainer["reports"]
    report = json.loads(trainer["reports"][0])
    assert report["tensors"] == len(model_layout(3, 96)) and report["acked"] == [1, 2]


def test_peak_memory_of_every_trainer_rank_stays_within_the_buffers_plus_the_largest_tensor(monkeypatch) -> None:
    # glibc hands every allocation of 64 KiB or more back to the kernel when it is freed: the peak resident
    # set is then the peak of what was live (sharded_members.py measures it around each send).
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    buffer_bytes = 1 << 20
    layers, width = 24, 1024  # 24 float32 [1024, 1024] weights: 4 MiB each, 96 MiB of the model's ~96.4 MiB
    envs = group_envs(replicas=1, workers_per_replica=1, timeout=TIMEOUT, buffer_bytes=buffer_bytes)
    results = run_sharded_group(envs, 2, versions=2, layers=layers, width=width, measure=True)

    _ok(results)
    full = sum(torch.empty(s, dtype=d).nbytes for _, s, d in model_layout(layers, width))
    largest = width * width * 4
    # numBuffers (2) packing buffers plus the largest tensor, twice: the one gathered tensor the sender holds,
    # and the gather's own staging inside torch (FSDP2's all-gather input and output; measured: rank 0's
    # first send peaks at ~10.1 MiB, later ones at ~7.5 MiB, with 2 MiB of buffers and a 4 MiB largest tensor)
    bound = 2 * buffer_bytes + 2 * largest
    slack = 2 << 20  # the interpreter's and gloo's own small allocations during a send
    assert full >= 7 * bound
    for key in (0, -2):
        peaks = results[key]["peaks"]
        print(f"trainer {key}: peak extra resident bytes per send {peaks}, bound {bound}, model {full}")
        assert max(peaks) <= bound + slack, (key, peaks, bound, full)
    assert results[1]["digests"] == results[0]["digests"]


@pytest.mark.parametrize(("world", "victim", "how"), [(2, 1, "kill"), (4, 2, "kill"), (4, 3, "raise"), (2, 0, "kill"),
                                                    (2, 1, "stop")],
                         ids=["2-ranks-rank1-killed", "4-ranks-rank2-killed", "4-ranks-rank3-raises",
                              "2-ranks-rank0-killed", "2-ranks-rank1-stopped"])
def test_a_trainer_rank_lost_mid_gather_is_named_on_every_trainer_rank_and_receiver(world: int, victim: int,
                                                                                   how: str) -> None:
    envs = group_envs(replicas=2, workers_per_replica=1, timeout=TIMEOUT, buffer_bytes=1 << 16)
    # v0 goes through; in v1 the victim stops after its 4th gather of the data pass (the others are then in
    # the 5th): killed (SIGKILL), or raising before it joins the next one.
    results = run_sharded_group(envs, world, versions=2, layers=3, width=96,
                                fault={"victim": victim, "at": 3, "how": how, "version": 1})

    victim_key = 0 if victim == 0 else -1 - victim
    survivors = {k: r for k, r in results.items() if k != victim_key}
    start = results[victim_key].get("killed_at") or results[victim_key]["at"]
    for key, res in survivors.items():
        assert res.get("error") in ("TrainerJobError", "PeerLostError", "WeightSyncError"), (key, res)
        assert f"trainer rank {victim}" in res["message"] or (victim == 0 and "rank 0" in res["message"]), \
            (key, res["message"])
        assert res["at"] - start <= TIMEOUT + SLACK, (key, res["at"] - start)
        if key <= 0:
            assert res["trainer_ranks"] == [victim], (key, res)
        else:
            assert res.get("abandoned_version") in (None, 1)
    if how == "raise":
        assert results[victim_key]["error"] == "TrainerJobError"
        assert "a bug in trainer rank 3's producer" in results[victim_key]["message"]
