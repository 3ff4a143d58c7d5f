"""The runtime's own settings: what is not part of the env contract (which every member must share) but a
choice of one process, given to `WeightSender` / `WeightReceiver` as one frozen object."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from weightsync.runtime.transfer import Timeline


@dataclass(frozen=True)
class NcclTuning:
    """How a communicator is set up (a knob for the benchmark's comparisons, not part of the env contract).

    `high_priority_comm`: run NCCL on a high-priority stream, so that when a copy kernel and the next
    broadcast become ready together the broadcast's blocks are scheduled first. Off by default: on one H200
    it made no difference against an emulated receive (bench/results/gpu-probe-1xH200-priority.log); the
    interference there was memory bandwidth, which runtime/copies.py bounds instead.
    `min_ctas` / `max_ctas`: ncclConfig_t's bounds on the thread blocks (channels) per operation; None leaves
    NCCL's choice.
    """

    high_priority_comm: bool = False
    min_ctas: int | None = None
    max_ctas: int | None = None


@dataclass(frozen=True)
class RuntimeSettings:
    """Per-process settings of a sync-group member.

    `heartbeat_interval`: seconds between a member's heartbeats.
    `dead_after`: seconds without a heartbeat after which a member that is still connected (stopped, wedged,
    cut off) is declared lost; None: the group's timeout (`WEIGHTSYNC_TIMEOUT_SECONDS`), so a member busy or
    stalled for less than the bound every wait has is never blamed. A member whose process exits is known
    to be gone at once, whatever this is (its store connection closes).
    `direct_threshold`: the trainer sends tensors of at least this many bytes straight from their source,
    outside the packing buffers; None: only those larger than a buffer.
    `copy_programs`: thread blocks of the GPU copy kernel for packs and unpacks that overlap a broadcast
    (copies.py); None: torch's full-speed copy always.
    `nccl`: communicator set-up (NcclTuning).
    `timeline`: a `transfer.Timeline` that records CUDA events around every pack, broadcast and unpack
    (benchmark diagnostics; None in production).
    """

    heartbeat_interval: float = 0.5
    dead_after: float | None = None
    direct_threshold: int | None = None
    copy_programs: int | None = 32
    nccl: NcclTuning = field(default_factory=NcclTuning)
    timeline: Timeline | None = None

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_interval <= 60:
            raise ValueError(f"heartbeat_interval must be in (0, 60] seconds, got {self.heartbeat_interval}")
        if self.dead_after is not None and not self.heartbeat_interval < self.dead_after <= 86400:
            raise ValueError(f"dead_after must be more than heartbeat_interval ({self.heartbeat_interval}s) and "
                             f"at most 86400s, got {self.dead_after}")
        if self.copy_programs is not None and self.copy_programs < 1:
            raise ValueError(f"copy_programs must be positive or None, got {self.copy_programs}")

    def dead_after_for(self, timeout: float) -> float:
        return self.dead_after if self.dead_after is not None else max(timeout, 2 * self.heartbeat_interval)
