"""Planning step: the actions on member pods that bring the group to its membership.

Pure. Ended members are deleted, members scaled away are deleted, out-of-date members the membership step
chose are deleted (to be re-created), survivors get the new epoch (and world size, and for the trainer the
endpoints) patched into their annotations, which the downward API projects into every container: they
re-join in place without a restart. Missing members are created at the current epoch, after the failure
backoff, and only once the token Secret exists and is ours (each member records the Secret's uid).

Why the operator never deletes an up-to-date running member to roll out a template by itself
(updateStrategy OnDelete): a member's restart costs the whole group an epoch, and the trainer's costs the
training state; the user decides when (see docs/guide.md, "Rolling out a template change").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from weightsync.api.models import WeightSyncSpec

from . import constants as c
from . import desired
from .decision import Action, Create, Delete, Event, Patch
from .membership import Membership
from .timefmt import parse_time


@dataclass(frozen=True)
class MemberPlan:
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None
    waiting_backoff: bool = False
    #: Members not created because something holds them (the Secret is not there yet, a rejection).
    held: list[str] = field(default_factory=list)


def backoff_left(spec: WeightSyncSpec, restarts: int, last_failure: str | None, now: datetime) -> float:
    since = parse_time(last_failure)
    if since is None:
        return 0.0
    until = since + timedelta(seconds=spec.failure_policy.backoff(restarts))
    return max(0.0, (until - now).total_seconds())


def member_actions(
    group: desired.Group, m: Membership, existing: set[str], now: datetime, hold_creates: str = ""
) -> MemberPlan:
    """`existing`: names of every pod that exists (ours or not); `hold_creates`: why no member may be created
    now ('' when they may)."""
    actions: list[Action] = []
    events: list[Event] = []
    by_name = {s.pod: s for s in m.slots}
    for n, p in sorted(m.terminated.items()):
        actions.append(Delete("Pod", n, p.uid, Event("Normal", c.REASON_DELETED, f"deleted ended member {n}")))
    for n, p in sorted(m.extra.items()):
        actions.append(Delete("Pod", n, p.uid, Event("Normal", c.REASON_DELETED, f"deleted {n}: scaled away")))
    for n, why in sorted(m.replace.items()):
        message = f"deleted {n} to re-create it: {why}"
        actions.append(Delete("Pod", n, m.live[n].uid, Event("Normal", c.REASON_REPLACED, message)))

    patched = []
    for n, p in sorted(m.live.items()):
        if n in m.replace:
            continue
        wanted = desired.member_annotations(group, by_name[n], m.new_epoch)
        diff = {k: v for k, v in wanted.items() if p.annotations.get(k) != v}
        if diff:
            actions.append(Patch("Pod", n, {"metadata": {"annotations": diff}}))
            patched.append(n)
    if patched:
        events.append(
            Event(
                "Normal",
                c.REASON_EPOCH_PROPAGATED,
                f"epoch {m.new_epoch} and world size {group.spec.world_size} set on {', '.join(patched)}",
            )
        )

    backoff = group.spec.failure_policy.backoff(m.streak)
    if m.failures and backoff > 0:
        # Said when the failure is counted: a deleted pod is often still terminating then, and the pass that
        # finds it gone (and waits out the backoff) no longer knows a failure is new.
        events.append(
            Event(
                "Normal",
                c.REASON_BACKOFF,
                f"lost members are re-created {backoff:g}s after the failure "
                f"(restart {m.restarts}, backoff step {m.streak})",
            )
        )
    missing = [s for s in m.slots if s.pod not in existing]
    if not missing:
        return MemberPlan(actions, events)
    if hold_creates:
        return MemberPlan(actions, events, held=[s.pod for s in missing])
    delay = backoff_left(group.spec, m.streak, m.last_failure, now)
    if delay > 0:
        return MemberPlan(actions, events, requeue_after=delay, waiting_backoff=True)
    for s in missing:
        message = (
            f"created {s.role} pod {s.pod} (rank offset {s.rank_offset}, {s.local_world_size} worker(s), "
            f"epoch {m.new_epoch})"
        )
        actions.append(Create(desired.pod(group, s), Event("Normal", c.REASON_CREATED, message)))
    return MemberPlan(actions, events)
