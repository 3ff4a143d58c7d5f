"""Planning step: the status the operator reports, from the membership and what holds the group up.

Pure. Conditions follow metav1.Condition semantics (lastTransitionTime moves only when the status does).
The Ready condition's message is the one line a user reads first: how many members are ready, and what
holds the rest (a foreign child, a child the API server refuses, a member that cannot be scheduled or
cannot start, a backoff, an out-of-date template).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from pydantic import ValidationError

from weightsync.api.models import (
    Condition,
    ConditionType,
    LastSync,
    Member,
    Phase,
    RejectedSyncReport,
    WeightSyncStatus,
)
from weightsync.contract import LAST_SYNC_ANNOTATION

from . import constants as c
from . import sync_report
from .decision import Event
from .members import MemberPlan
from .membership import Membership
from .observed import ObservedPod, Rejection
from .timefmt import rfc3339

ORDER: tuple[ConditionType, ...] = ("Ready", "Progressing", "Degraded", "Failed")
#: Status fields the planner may drop: the status is written as a merge patch, so a dropped one is sent as null.
REMOVABLE = ("lastSync", "rejectedSyncReport")


def old_status(raw: dict[str, object]) -> WeightSyncStatus:
    """The stored status; a lastSync that no longer fits the model (written before its bounds) is dropped."""
    try:
        return WeightSyncStatus.model_validate(raw)
    except ValidationError:
        if "lastSync" not in raw:
            raise
        return WeightSyncStatus.model_validate({k: v for k, v in raw.items() if k != "lastSync"})


class Conditions:
    """The conditions of one decision, starting from the stored ones."""

    def __init__(self, old: list[Condition], generation: int, now: datetime) -> None:
        self.old = list(old)
        self.items = list(old)
        self.generation = generation
        self.now = now

    def set(self, type_: ConditionType, status: bool, reason: str, message: str) -> None:
        text: Literal["True", "False"] = "True" if status else "False"
        prev = next((x for x in self.items if x.type == type_), None)
        since = prev.last_transition_time if prev is not None and prev.status == text else rfc3339(self.now)
        new = Condition(
            type=type_,
            status=text,
            reason=reason,
            message=message,
            last_transition_time=since,
            observed_generation=self.generation,
        )
        self.items = [*(x for x in self.items if x.type != type_), new]

    def was(self, type_: ConditionType) -> Condition | None:
        return next((x for x in self.old if x.type == type_), None)

    def was_true(self, type_: ConditionType) -> bool:
        prev = self.was(type_)
        return prev is not None and prev.status == "True"

    def announce(self, type_: ConditionType, message: str, event: Event) -> list[Event]:
        """`event`, unless the stored condition already says `message` (a refusal is announced once)."""
        prev = self.was(type_)
        return [] if prev is not None and message in prev.message else [event]

    def sorted(self) -> list[Condition]:
        return sorted(self.items, key=lambda x: ORDER.index(x.type))


@dataclass(frozen=True)
class SyncReportOutcome:
    """What the trainer's annotation makes of status.lastSync and status.rejectedSyncReport."""

    last_sync: LastSync | None
    rejected: RejectedSyncReport | None
    event: Event | None = None


def sync_report_outcome(trainer: ObservedPod | None, old: WeightSyncStatus, now: datetime) -> SyncReportOutcome:
    """A valid report replaces lastSync (and clears rejectedSyncReport); a bad one keeps the previous
    lastSync, is recorded by its digest, and is announced by an event only when its value is new."""
    raw = trainer.annotations.get(LAST_SYNC_ANNOTATION) if trainer is not None else None
    if trainer is None or not raw:  # no report (yet): nothing changes
        return SyncReportOutcome(old.last_sync, old.rejected_sync_report)
    try:
        return SyncReportOutcome(sync_report.parse(raw), None)
    except sync_report.InvalidSyncReport as err:
        digest = sync_report.digest(raw)
        if old.rejected_sync_report is not None and old.rejected_sync_report.digest == digest:
            return SyncReportOutcome(old.last_sync, old.rejected_sync_report)
        kept = f"status.lastSync keeps version {old.last_sync.version}" if old.last_sync else "no status.lastSync yet"
        rejected = RejectedSyncReport(digest=digest, message=str(err), time=rfc3339(now))
        message = f"dropped the report in {LAST_SYNC_ANNOTATION} of pod {trainer.name}: {err}; {kept}"
        return SyncReportOutcome(old.last_sync, rejected, Event("Warning", c.REASON_INVALID_REPORT, message))


@dataclass(frozen=True)
class Holds:
    """What keeps members from being created or from becoming ready, besides starting up."""

    conflicts: list[str] = field(default_factory=list)  # foreign shared children
    rejections: list[Rejection] = field(default_factory=list)  # transient refusals of the API server
    secret_pending: bool = False  # the token Secret is being created: members come next


def group_status(
    name: str,
    world_size: int,
    m: Membership,
    members_plan: MemberPlan,
    holds: Holds,
    over: str,
    conds: Conditions,
    old: WeightSyncStatus,
    report: SyncReportOutcome,
) -> tuple[WeightSyncStatus, list[Event]]:
    """`over`: the maxRestarts message when the group is Failed for it, else ''."""
    events: list[Event] = []
    members = [
        Member(
            pod=s.pod,
            role="trainer" if s.role == "trainer" else "inference",
            rank_offset=s.rank_offset,
            local_world_size=s.local_world_size,
            ready=m.live[s.pod].ready,
            up_to_date=s.pod not in m.out_of_date and s.pod not in m.replace,
        )
        for s in m.slots
        if s.pod in m.live and s.pod not in m.replace
    ]
    desired_count = len(m.slots)
    ready_count = sum(1 for x in members if x.ready)
    waiting = {n: p.waiting for n, p in sorted(m.live.items()) if p.waiting}
    member_actions = any(a.kind == "Pod" for a in members_plan.actions)
    blocked = bool(holds.conflicts or holds.rejections)
    whole = (
        ready_count == desired_count
        and not member_actions
        and not members_plan.waiting_backoff
        and not members_plan.held
        and not m.extra
        and not blocked
        and not holds.secret_pending
    )
    degraded_before = conds.was_true("Degraded")
    degraded = not whole and (m.failures > 0 or degraded_before)
    running = any(p.phase == "Running" for p in m.live.values())

    phase: Phase
    if over:
        phase = "Failed"
        conds.set("Failed", True, c.REASON_MAX_RESTARTS, over)
    else:
        phase = "Ready" if whole else "Degraded" if degraded else "Forming" if running else "Pending"
        conds.set("Failed", False, c.REASON_AS_EXPECTED, "")

    notes: list[str] = []
    for conflict in holds.conflicts:
        notes.append(conflict)
    for rejection in holds.rejections:
        notes.append(f"the API server refuses {rejection.describe()}")
    if holds.conflicts or holds.rejections:
        notes.append("no member is created until that is resolved")
    for n, why in waiting.items():
        notes.append(f"{n} cannot start: {why}")
    if members_plan.waiting_backoff and members_plan.requeue_after is not None:
        notes.append(f"re-creating lost members after a backoff of {members_plan.requeue_after:.1f}s")
    if m.foreign:
        notes.append(f"waiting for stale pods {', '.join(m.foreign)} of a previous owner to go")
    if m.out_of_date:
        notes.append(
            f"{', '.join(sorted(m.out_of_date))} made from an older pod template (updateStrategy OnDelete: "
            "delete them to roll them out)"
        )
    summary = "; ".join([f"{ready_count}/{desired_count} members ready at epoch {m.new_epoch}", *notes])

    reason = (
        c.REASON_READY
        if phase == "Ready"
        else c.REASON_FOREIGN_CHILD
        if holds.conflicts
        else c.REASON_CHILD_REJECTED
        if holds.rejections
        else c.REASON_WAITING
        if waiting
        else phase
    )
    conds.set("Ready", phase == "Ready", reason, summary)
    progressing = phase in ("Pending", "Forming", "Degraded") and not blocked
    if progressing:
        conds.set("Progressing", True, c.REASON_FORMING, summary)
    else:  # settled (Ready, Failed), or held up by something a user has to resolve
        conds.set("Progressing", False, reason if blocked else phase, summary if blocked else "")
    if degraded:
        if m.failures:
            why = c.REASON_MEMBER_FAILED if m.failed else c.REASON_MEMBER_LOST
            conds.set("Degraded", True, why, f"lost {', '.join(m.failed + m.lost)}; re-forming at epoch {m.new_epoch}")
        else:
            prev = conds.was("Degraded")
            conds.set("Degraded", True, prev.reason if prev else c.REASON_MEMBER_LOST, prev.message if prev else "")
    else:
        prev = conds.was("Degraded")
        settled = prev.reason if prev is not None and prev.status == "False" else None
        conds.set("Degraded", False, c.REASON_RECOVERED if degraded_before else settled or c.REASON_AS_EXPECTED, "")
    if phase == "Ready" and not conds.was_true("Ready"):
        events.append(Event("Normal", c.REASON_READY, f"all {desired_count} members ready at epoch {m.new_epoch}"))
    for conflict in holds.conflicts:
        events += conds.announce("Ready", conflict, Event("Warning", c.REASON_FOREIGN_CHILD, conflict))
    for rejection in holds.rejections:
        text = f"the API server refuses {rejection.describe()}"
        events += conds.announce("Ready", text, Event("Warning", c.REASON_CHILD_REJECTED, text))
    for n, why in waiting.items():
        text = f"{n} cannot start: {why}"
        events += conds.announce("Ready", text, Event("Warning", c.REASON_WAITING, text))

    status = WeightSyncStatus(
        phase=phase,
        conditions=conds.sorted(),
        observed_generation=conds.generation,
        epoch=m.new_epoch,
        world_size=world_size,
        replicas=sum(1 for n in [*m.live, *m.extra] if n.startswith(f"{name}-inference-")),
        selector=f"{c.NAME_LABEL}={name},{c.ROLE_LABEL}=inference",
        ready=f"{ready_count}/{desired_count}",
        trainer_ready=f"{sum(1 for x in members if x.role == 'trainer' and x.ready)}/"
        f"{sum(1 for s in m.slots if s.role == 'trainer')}",
        members=members,
        restarts=m.restarts,
        restart_streak=m.streak,
        last_failure_time=m.last_failure,
        last_sync=report.last_sync,
        rejected_sync_report=report.rejected,
    )
    return status, events
