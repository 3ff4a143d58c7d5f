"""Epochs and waits: a group re-forms in place when the operator publishes a new epoch, and a receiver that
polls with a timeout picks up the next sync."""

from __future__ import annotations

import multiprocessing as mp

from local_members import (
    digest,
    end_on_command,
    group_envs,
    make_tensors,
    run_polling_receiver,
    run_receiver,
    run_trainer_on_command,
    write_membership,
)


def test_a_scale_up_reforms_the_group_and_the_next_sync_reaches_the_new_member(tmp_path) -> None:
    ctx = mp.get_context("spawn")
    results, commands = ctx.Queue(), ctx.Queue()
    files = [str(tmp_path / f"annotations-{r}") for r in range(3)]
    envs = [e.model_copy(update={"annotations_file": f}) for e, f in zip(
        group_envs(replicas=2, workers_per_replica=1, timeout=30), files, strict=True)]
    for f in files[:2]:
        write_membership(f, epoch=0, world_size=2)  # only replica 0 exists at first

    trainer = ctx.Process(target=run_trainer_on_command, args=(envs[0], 40, commands, results))
    first = ctx.Process(target=run_receiver, args=(envs[1], 0, 2, "loader", results), kwargs={"count": 40})
    trainer.start()
    first.start()
    try:
        commands.put(0)
        sent0 = results.get(timeout=60)
        assert "error" not in sent0, sent0
        assert sent0["digest"] == digest(make_tensors(40, 0))

        # The operator scales to 2 replicas: epoch 1, world size 3, on every member; a new pod starts.
        for f in files:
            write_membership(f, epoch=1, world_size=3)
        second = ctx.Process(target=run_receiver, args=(envs[2], 0, 1, "into", results), kwargs={"count": 40})
        second.start()
        commands.put(1)
        out = {}
        for _ in range(3):
            r = results.get(timeout=90)
            out[(r["rank"], "version" in r)] = r
        sent1 = out[(0, True)]
        assert "error" not in sent1, sent1
        assert '"epoch":1' in sent1["report"] and '"acked":[1,2]' in sent1["report"]
        survivor, newcomer = out[(1, False)], out[(2, False)]
        assert survivor.get("error") is None and newcomer.get("error") is None, (survivor, newcomer)
        assert survivor["digests"] == {0: sent0["digest"], 1: sent1["digest"]}
        assert newcomer["digests"] == {0: sent1["digest"]}
    finally:
        end_on_command(commands, trainer, first)


def test_a_receiver_polling_with_a_timeout_gets_the_next_sync_and_leaves_no_thread_behind() -> None:
    ctx = mp.get_context("spawn")
    results, commands, signals = ctx.Queue(), ctx.Queue(), ctx.Queue()
    envs = group_envs(replicas=1, workers_per_replica=1, timeout=30)
    trainer = ctx.Process(target=run_trainer_on_command, args=(envs[0], 40, commands, results))
    engine = ctx.Process(target=run_polling_receiver, args=(envs[1], 40, signals, results))
    trainer.start()
    engine.start()
    try:
        commands.put(0)
        assert "error" not in (first := results.get(timeout=60)), first
        while signals.get(timeout=60) < 3:  # three polls ran out before the trainer had anything to send
            pass
        commands.put(1)
        out = {r["rank"]: r for r in (results.get(timeout=60), results.get(timeout=60))}
        assert "error" not in out[0] and "error" not in out[1], out
        assert out[1]["version"] == 1 and out[1]["digest"] == out[0]["digest"] == digest(make_tensors(40, 1))
        assert out[1]["timeouts"] >= 3
        assert out[1]["runtime_threads"] <= 1, "timed-out waits leave no thread behind (only the heartbeat)"
    finally:
        end_on_command(commands, trainer, engine)
