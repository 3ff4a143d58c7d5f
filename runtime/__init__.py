"""The in-pod runtime: form the sync group and stream packed weights from the trainer to inference workers.

    from weightsync.runtime import WeightSender, WeightReceiver

    sender = WeightSender.from_env()                 # in the trainer pod
    report = sender.send(model.named_parameters(), version=step)

    receiver = WeightReceiver.from_env(local_rank=k) # in each inference worker
    report = receiver.receive(into=dict(model.named_parameters()))
"""

from weightsync.runtime.errors import (
    ChecksumError,
    ConfigMismatchError,
    InvalidTensorsError,
    PeerLostError,
    RendezvousError,
    TamperedValueError,
    TrainerJobError,
    WeightSyncError,
)
from weightsync.runtime.receiver import WeightReceiver
from weightsync.runtime.report import SyncReport
from weightsync.runtime.sender import WeightSender
from weightsync.runtime.settings import NcclTuning, RuntimeSettings
from weightsync.runtime.source import LazySource, Placement, SourceTensor, WeightSource

__all__ = [
    "ChecksumError",
    "ConfigMismatchError",
    "InvalidTensorsError",
    "LazySource",
    "NcclTuning",
    "PeerLostError",
    "Placement",
    "RendezvousError",
    "RuntimeSettings",
    "SourceTensor",
    "SyncReport",
    "TamperedValueError",
    "TrainerJobError",
    "WeightReceiver",
    "WeightSender",
    "WeightSource",
    "WeightSyncError",
]
