"""The exceptions the runtime raises; each message names the rank, tensor or setting at fault."""

from __future__ import annotations


class WeightSyncError(RuntimeError):
    """Base class of every weightsync runtime error.

    On a receiver, an error of a sync whose data had started to arrive carries `abandoned_version` (the
    version it was receiving, which it does not hold) and `incomplete` (True when `into=` destinations were
    partly overwritten: they hold a mix of versions and stay marked incomplete until the next complete sync).
    """

    abandoned_version: int | None = None
    incomplete: bool = False

    @property
    def members_at_fault(self) -> tuple[int, ...]:
        """The sync group's ranks this error names as its cause (died, stalled, never arrived, a failing
        engine's workers); empty when it names none. A retry loop can tell "another member failed: the
        group re-forms without me" (this process's rank not among them) from a failure of its own."""
        return ()

    def caused_by_others(self, rank: int) -> bool:
        """Whether this error names its cause and `rank` (the caller's own) is not among it: a failure a retry
        loop should not count as its own."""
        return bool(self.members_at_fault) and rank not in self.members_at_fault


class RendezvousError(WeightSyncError):
    """The group could not be formed: the store is unreachable or members did not arrive in time."""

    def __init__(self, message: str, missing_ranks: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.missing_ranks = missing_ranks

    @property
    def members_at_fault(self) -> tuple[int, ...]:
        return self.missing_ranks


class PeerLostError(WeightSyncError):
    """A member died or stopped answering; the group is broken until it re-forms (by itself, or at a new
    epoch when a pod died).

    `ranks`: the members at fault, where known. `store_lost`: the rendezvous store, which the trainer
    hosts, stopped answering or closed the connection. `reformed`: this member's sync was abandoned because
    the trainer re-formed the group after another member's failure (named in the message and `ranks`)."""

    def __init__(self, message: str, ranks: tuple[int, ...], *, store_lost: bool = False,
                 reformed: bool = False) -> None:
        super().__init__(message)
        self.ranks = ranks
        self.store_lost = store_lost
        self.reformed = reformed

    @property
    def members_at_fault(self) -> tuple[int, ...]:
        return self.ranks


class TransportError(WeightSyncError):
    """The communicator failed (a gloo socket reset, an NCCL error); the group names the member at fault
    in a PeerLostError when it can tell who it is."""


class ConfigMismatchError(WeightSyncError):
    """Members disagree on the configuration or the tensors; raised on every member before data moves."""


class InvalidTensorsError(ConfigMismatchError, ValueError):
    """The trainer's tensors cannot be sent as given: not `(name, tensor)` pairs, a name twice, a tensor that
    is not dense (sparse, mkldnn) or not materialised (meta). Refused on the trainer before anything is
    announced; the receivers never hear of that sync. A ValueError as well, as a bad argument is.

    A tensor list the last sync sent is recognised by every tensor's name, shape, dtype, layout and class
    (read each sync); its device is not read again, so a tensor moved to the meta device since fails the
    sync in the data path, with torch's own error, as any failure mid-sync does."""


class ChecksumError(WeightSyncError):
    """A received tensor's checksum differs from the trainer's."""


class TamperedValueError(WeightSyncError):
    """A store value failed authentication: it was not written by a member of this group for this key.

    Never acted on; the key is named so that the cause (a rogue client, a member of another group or epoch
    with the same store) can be found."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"store value {key!r} was refused: {reason}")
        self.key = key



class TrainerJobError(PeerLostError):
    """A rank of the trainer's own job (its torch.distributed ranks, of which rank 0 is the sender) failed,
    died or stalled during a sync, or did not take part in it. Raised on every trainer rank, and carried to
    every receiver in the trainer's abort.

    `trainer_ranks`: the trainer-job ranks at fault, where known. `job_lost`: the gathers were abandoned in
    the middle (a rank died or failed inside them), so the job's own collectives are out of step: the
    trainer job must be restarted; every later `send` raises at once."""

    def __init__(self, message: str, trainer_ranks: tuple[int, ...], *, job_lost: bool = False) -> None:
        super().__init__(message, ranks=(0,))
        self.trainer_ranks = trainer_ranks
        self.job_lost = job_lost
