"""The exceptions the runtime raises; each message names the rank, tensor or setting at fault."""

from __future__ import annotations


class WeightSyncError(RuntimeError):
    """Base class of every weightsync runtime error."""


class RendezvousError(WeightSyncError):
    """The group could not be formed: the store is unreachable or members did not arrive in time."""

    def __init__(self, message: str, missing_ranks: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.missing_ranks = missing_ranks


class PeerLostError(WeightSyncError):
    """A member died or stopped answering; the group is broken until it re-forms at a new epoch."""

    def __init__(self, message: str, ranks: tuple[int, ...]) -> None:
        super().__init__(message)
        self.ranks = ranks


class ConfigMismatchError(WeightSyncError):
    """Members disagree on the configuration or the tensors; raised on every member before data moves."""


class ChecksumError(WeightSyncError):
    """A received tensor's checksum differs from the trainer's."""
