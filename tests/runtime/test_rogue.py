"""A rogue client that reaches the trainer's store port without the token: while a real group syncs, it
tries every attack a TCPStore client could (list keys, read the group record and the manifest, publish a
manifest, inject an abort, grow the trainer's memory), plus garbage, oversized frames and a flood of silent
connections. Nothing it does is acted on; the group syncs on, bit-exact."""

from __future__ import annotations

import multiprocessing as mp

from local_members import (
    digest,
    end_on_command,
    group_envs,
    make_tensors,
    rss_bytes,
    run_receiver_until,
    run_rogue,
    run_trainer_on_command,
)

COUNT = 40


def test_a_rogue_client_without_the_token_can_neither_read_nor_inject_and_the_group_syncs_on() -> None:
    ctx = mp.get_context("spawn")
    results, commands = ctx.Queue(), ctx.Queue()
    envs = group_envs(replicas=2, workers_per_replica=1, timeout=20)
    trainer = ctx.Process(target=run_trainer_on_command, args=(envs[0], COUNT, commands, results))
    receivers = [ctx.Process(target=run_receiver_until, args=(envs[r], 0, COUNT, 3, results, style))
                 for r, style in ((1, "into"), (2, "loader"))]
    rogue = ctx.Process(target=run_rogue, args=("127.0.0.1", envs[0].master_port, results))
    for p in (trainer, *receivers):
        p.start()
    try:
        got: dict[tuple[int, int], dict] = {}

        def collect(version: int) -> None:
            commands.put(version)
            while not all((r, version) in got for r in (0, 1, 2)):
                r = results.get(timeout=90)
                assert "error" not in r, r
                if "version" in r:
                    got[(r["rank"], r["version"])] = r

        collect(0)
        before = rss_bytes(trainer.pid)
        rogue.start()
        attack = results.get(timeout=120)
        assert attack["rank"] == -2, attack
        outcome = attack["outcome"]
        assert outcome.get("tcpstore_connect", "").startswith("refused"), outcome
        assert "list_keys" not in outcome and "inject" not in outcome, outcome
        for name in ("garbage", "huge_frame", "huge_frame_32"):
            assert outcome[name].startswith("cut off"), outcome  # within the kernel's socket buffers
        for version in (1, 2, 3):  # while the flood of silent connections stays open
            collect(version)
            want = digest(make_tensors(COUNT, version))
            assert got[(0, version)]["digest"] == want
            assert got[(1, version)]["digest"] == got[(2, version)]["digest"] == want
        grown = rss_bytes(trainer.pid) - before
        assert grown < 64 << 20, f"the trainer's memory grew by {grown / 1e6:.0f} MB under attack"
    finally:
        if rogue.is_alive():
            rogue.kill()
        end_on_command(commands, trainer, *receivers, wait=20)
