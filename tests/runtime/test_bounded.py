"""Bounded resources: the store holds the same keys and bytes after 1,000 syncs as after 100, and a
tensor list far over one store value's limit (200,000 tensors) syncs."""

from __future__ import annotations

import multiprocessing as mp

from local_members import (
    digest,
    group_envs,
    many_tiny_tensors,
    run_many_tensors,
    run_receiver_counting,
    run_trainer_reporting_store,
)

SYNCS = 1000


def _run(ctx, targets, wait: float) -> dict[int, dict]:
    results = ctx.Queue()
    procs = [ctx.Process(target=t, args=(*a, results)) for t, a in targets]
    for p in procs:
        p.start()
    try:
        out = {}
        for _ in procs:
            r = results.get(timeout=wait)
            out[r["rank"]] = r
        return out
    finally:
        for p in procs:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()


def test_a_thousand_syncs_leave_the_store_as_large_as_it_was_after_the_first_hundred() -> None:
    ctx = mp.get_context("spawn")
    envs = group_envs(replicas=2, workers_per_replica=1, timeout=30)
    out = _run(ctx, [(run_trainer_reporting_store, (envs[0], 20, SYNCS)),
                     (run_receiver_counting, (envs[1], 20, SYNCS)),
                     (run_receiver_counting, (envs[2], 20, SYNCS))], wait=600)
    assert all("error" not in r for r in out.values()), out
    samples = out[0]["samples"]
    steady = [s for s in samples if s["version"] >= 100]
    assert len(steady) >= 9, samples
    assert len({s["keys"] for s in steady}) == 1, samples  # the same keys, however many syncs
    sizes = [s["bytes"] for s in steady]
    assert max(sizes) <= min(sizes) * 1.02, samples
    assert out[1]["digest"] == out[2]["digest"] == out[0]["digest"]


def test_two_hundred_thousand_tensors_sync() -> None:
    ctx = mp.get_context("spawn")
    count = 200_000
    envs = group_envs(replicas=1, workers_per_replica=1, timeout=120)
    out = _run(ctx, [(run_many_tensors, (envs[0], count)), (run_many_tensors, (envs[1], count))], wait=400)
    assert all("error" not in r for r in out.values()), out
    assert out[1]["tensors"] == count
    assert out[1]["digest"] == out[0]["digest"] == digest(many_tiny_tensors(count, 1))
