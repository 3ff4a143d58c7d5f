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
