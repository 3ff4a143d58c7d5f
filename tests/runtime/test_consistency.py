"""The consistency guarantee: a receiver never presents a mix of versions as a version.

The trainer dies in the middle of a sync: every receiver names it, says which version was abandoned, marks
`into=` destinations that were partly overwritten as incomplete, and tells a loader that the version it
was being handed will not be completed."""

from __future__ import annotations

from local_members import digest, group_envs, make_tensors, run_group

COUNT = 50
LARGE = 2_000_000


def test_the_trainer_killed_mid_sync_leaves_no_receiver_presenting_a_mix_of_versions() -> None:
    envs = group_envs(replicas=3, workers_per_replica=1, timeout=15, buffer_bytes=1 << 16)
    # Rank 1 (a loader) dawdles over each batch of v1 only, and the trainer is killed at its first one.
    results = run_group(envs, versions=2, count=COUNT, large_numel=LARGE, styles=("loader", "into", "into"),
                        block_rank=1, block_seconds=0.5, kill_on_first_batch=0,
                        receiver_kwargs={1: {"signal_version": 1}})
    v0 = digest(make_tensors(COUNT, 0, large_numel=LARGE))

    loader = results[1]
    assert loader.get("error") == "PeerLostError" and "rank 0 (trainer" in loader["message"], loader
    assert loader["abandoned_version"] == 1 and loader["loader_told_abandoned"] == [1], loader
    assert "v1 was abandoned" in loader["message"]
    for rank in (2, 3):
        res = results[rank]
        assert res.get("error") == "PeerLostError", (rank, res)
        if res["abandoned_version"] is None:  # it had not begun to receive v1: it still holds v0, whole
            assert res["holds_version"] == 0 and not res["receiver_incomplete"], res
            assert res["held_digest"] == v0
        else:
            assert res["abandoned_version"] == 1 and res["incomplete"], res
            assert res["receiver_incomplete"] and res["holds_version"] is None, res
            assert "mix of versions" in res["message"] and "incomplete" in res["message"], res["message"]


def test_a_receiver_that_got_everything_while_another_stalled_says_it_holds_that_version() -> None:
    """The failure comes while the into= receiver waits for the trainer's confirmation: its destinations
    hold the new version whole, and `holds_version` says so (a caller must not serve them as the old one)."""
    count = 20
    envs = group_envs(replicas=2, workers_per_replica=1, timeout=4)
    results = run_group(envs, versions=2, count=count, styles=("into", "loader"), block_rank=2,
                        block_seconds=12, receiver_kwargs={2: {"signal_version": 1}}, wait=60)
    into = results[1]
    assert into.get("error") == "PeerLostError" and into["abandoned_version"] == 1, into
    assert into["holds_version"] in (0, 1) or into["receiver_incomplete"], into
    if into["holds_version"] is not None:  # whatever it says it holds, it holds, bit-exact
        assert into["held_digest"] == digest(make_tensors(count, into["holds_version"])), into
    assert "rank 2" in into["message"], into["message"]


def test_destinations_re_keyed_in_place_get_each_name_its_own_tensor() -> None:
    import multiprocessing as mp

    from local_members import run_rekeying_receiver, run_trainer

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    envs = group_envs(replicas=1, workers_per_replica=1, timeout=15)
    procs = [ctx.Process(target=run_trainer, args=(envs[0], 2, 40, 0, results)),
             ctx.Process(target=run_rekeying_receiver, args=(envs[1], 40, results))]
    for p in procs:
        p.start()
    try:
        out = {r["rank"]: r for r in (results.get(timeout=90), results.get(timeout=90))}
    finally:
        for p in procs:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()
    assert "error" not in out[0] and "error" not in out[1], out
    assert out[1]["digests"] == out[0]["digests"]
