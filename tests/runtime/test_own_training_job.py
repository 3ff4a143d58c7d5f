"""weightsync's group is independent of torch.distributed's default group in the trainer."""

from __future__ import annotations

import multiprocessing as mp

from local_members import (
    free_port,
    group_envs,
    run_receiver,
    run_trainer_with_own_job,
    run_training_peer,
)


def test_a_trainer_with_its_own_distributed_job_keeps_both_working() -> None:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    envs = group_envs(replicas=1, workers_per_replica=1, timeout=60)
    job_port = free_port()
    procs = [
        ctx.Process(target=run_trainer_with_own_job, args=(envs[0], job_port, 3, results)),
        ctx.Process(target=run_training_peer, args=(job_port, 3, results)),
        ctx.Process(target=run_receiver, args=(envs[1], 0, 3, "loader", results), kwargs={"count": 30}),
    ]
    for p in procs:
        p.start()
    out = {r["rank"]: r for r in (results.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(timeout=30)

    assert not {r: res["message"] for r, res in out.items() if "error" in res}
    # The job's all-reduces summed over its two ranks, around every sync.
    assert out[0]["sums"] == out[-1]["sums"] == [[4.0] * 4, [8.0] * 4, [12.0] * 4]
    # weightsync left the job's own rendezvous variables alone and delivered every version.
    assert out[0]["env_after"] == {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(job_port), "RANK": "0",
                                   "WORLD_SIZE": "2"}
    assert out[1]["digests"] == out[0]["digests"]
