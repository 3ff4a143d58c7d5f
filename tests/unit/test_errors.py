"""`members_at_fault`: what a retry loop reads to tell another member's failure from its own."""

from __future__ import annotations

from weightsync.runtime import ConfigMismatchError, PeerLostError, RendezvousError, TrainerJobError, WeightSyncError
from weightsync.runtime.vllm_http import EngineError


def test_each_error_names_the_members_it_blames() -> None:
    assert PeerLostError("rank 3 died", ranks=(3,)).members_at_fault == (3,)
    assert RendezvousError("ranks 2 and 4 never arrived", missing_ranks=(2, 4)).members_at_fault == (2, 4)
    assert EngineError("500", url="http://e:8000", step="update_weights", version=1, status=500, body="",
                       ranks=(1, 2)).members_at_fault == (1, 2)
    # a trainer-job rank's failure is the trainer's, rank 0 of the sync group, for every receiver
    assert TrainerJobError("trainer rank 1 died", trainer_ranks=(1,)).members_at_fault == (0,)


def test_an_error_that_names_nobody_blames_nobody() -> None:
    assert WeightSyncError("?").members_at_fault == ()
    assert ConfigMismatchError("buffer sizes differ").members_at_fault == ()
    assert RendezvousError("cannot host the store").members_at_fault == ()


def test_a_retry_loop_counts_only_failures_that_do_not_blame_only_others() -> None:
    lost_rank_3 = PeerLostError("rank 3 died", ranks=(3,))
    assert lost_rank_3.caused_by_others(0) and lost_rank_3.caused_by_others(1)
    assert not lost_rank_3.caused_by_others(3)  # this member was the one declared lost
    assert not WeightSyncError("?").caused_by_others(0)  # names nobody: counts
    assert RendezvousError("the trainer did not form the group", missing_ranks=(0,)).caused_by_others(2)
