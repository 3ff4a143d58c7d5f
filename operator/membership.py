"""Planning step: who is in the group now, what it lost, and whether the epoch moves.

Pure. The epoch (`status.epoch`) and the world size at that epoch (`status.worldSize`) are the group's
identity; the epoch is bumped when the membership changes:

- a failure: a member pod failed or exited, or a recorded member vanished or is being deleted while it was
  up to date. Failures count against `failurePolicy.maxRestarts` and start the backoff, which doubles with
  each failure of a streak (a failure `failurePolicy.backoffResetSeconds` after the previous one starts a
  new streak);
- a change, which costs an epoch and nothing else: a scale; a recorded member that was out of date (made from
  an older template) deleted by the user (updateStrategy OnDelete); out-of-date members the operator replaces
  itself (updateStrategy Replace, or members holding a replaced token, whatever the strategy).

Each loss is counted once: a terminated pod counts if it is still a recorded member (`status.members`) or
carries the current epoch; after the bump it is neither, so a retry after a crash does not count it again.
A vanished pod counts if it is a recorded member; the bumped status no longer lists it. A trainer of several
pods is one job: its pods that ended or vanished in one pass are one failure (they are re-created together).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from weightsync.api.models import Member, WeightSyncSpec

from . import constants as c
from . import desired
from .decision import Event
from .observed import Observed, ObservedPod, member_is_current
from .timefmt import parse_time, rfc3339


@dataclass(frozen=True)
class Membership:
    epoch: int  # at the last recorded decision
    new_epoch: int
    slots: list[desired.Slot]
    live: dict[str, ObservedPod]  # owned, running or pending, in a slot
    terminated: dict[str, ObservedPod]  # owned, ended, not being deleted
    extra: dict[str, ObservedPod]  # owned, up, in no slot (scaled away)
    foreign: list[str]  # pods in our slots that someone else controls
    failed: list[str]
    lost: list[str]
    changed: list[str]  # recorded members that went out of date by the user's hand: not failures
    replace: dict[str, str]  # live members the operator replaces now -> why
    out_of_date: dict[str, str]  # live members out of date that stay (OnDelete) -> why
    scaled: bool
    restarts: int
    last_failure: str | None
    #: Failures since the backoff last reset (failurePolicy.backoffResetSeconds between two failures).
    streak: int
    #: Failures counted against maxRestarts: one per failed or lost member, but one for the trainer's job of
    #: several pods, however many of its pods ended with it.
    failures: int = 0
    events: list[Event] = field(default_factory=list)

    @property
    def bumped(self) -> bool:
        return self.new_epoch != self.epoch


def membership(
    name: str,
    spec: WeightSyncSpec,
    observed: Observed,
    old_epoch: int,
    old_world: int | None,
    old_members: list[Member],
    old_restarts: int,
    old_last_failure: str | None,
    old_streak: int | None,
    secret_uid: str | None,
    now: datetime,
) -> Membership:
    slots = desired.slots(name, spec)
    by_name = {s.pod: s for s in slots}
    recorded = {m.pod: m for m in old_members}
    pods = observed.pods

    owned = {n: p for n, p in pods.items() if p.owned}
    live = {n: p for n, p in owned.items() if not p.terminating and not p.terminated and n in by_name}
    terminated = {n: p for n, p in owned.items() if not p.terminating and p.terminated}
    extra = {n: p for n, p in owned.items() if n not in by_name and not p.terminating and not p.terminated}
    foreign = sorted(n for n, p in pods.items() if not p.owned and n in by_name)

    hashes = {role: desired.template_hash(spec, role) for role in ("trainer", "inference")}
    stale: dict[str, str] = {}
    for n, p in live.items():
        current, why = member_is_current(p, hashes[by_name[n].role], secret_uid)
        if not current:
            stale[n] = why
    failed = sorted(n for n, p in terminated.items() if n in by_name and (n in recorded or (p.epoch or 0) >= old_epoch))
    gone = sorted(n for n in recorded if n in by_name and n not in live and n not in terminated)

    def went_out_of_date(n: str) -> bool:
        """A recorded member that is gone (or going) and was out of date: the user rolled it."""
        pod = pods.get(n)
        if pod is not None and pod.owned:
            current, _ = member_is_current(pod, hashes[by_name[n].role], secret_uid)
            return not current
        return recorded[n].up_to_date is False

    changed = [n for n in gone if went_out_of_date(n)]
    lost = [n for n in gone if n not in changed]

    token_stale = {n: why for n, why in stale.items() if "token" in why}
    replacing = spec.update_strategy.type == "Replace"
    replace = dict(stale) if replacing else token_stale
    trainer_pods = [s.pod for s in slots if s.role == "trainer"]
    trainer_losses = [n for n in (*failed, *lost, *changed) if n in trainer_pods]
    if trainer_losses and len(trainer_pods) > 1:  # the trainer's job is lost with any of its pods
        why = f"the trainer's job lost {', '.join(trainer_losses)}: its pods are re-created together"
        replace.update({n: why for n in trainer_pods if n in live})
    out_of_date = {n: why for n, why in stale.items() if n not in replace}
    replaced_now = sorted(n for n in replace if n in recorded)
    scaled = old_world is not None and old_world != spec.world_size
    failures = len(failed) + len(lost)
    trainer_failures = [n for n in (*failed, *lost) if n in trainer_pods]
    if len(trainer_pods) > 1 and trainer_failures:  # pod 0's ranks often exit with the pod that died first
        failures -= len(trainer_failures) - 1
    streak = old_restarts if old_streak is None else old_streak  # (a status written before streaks existed)
    if failures:
        previous = parse_time(old_last_failure)
        if previous is None or (now - previous).total_seconds() >= spec.failure_policy.backoff_reset_seconds:
            streak = 0
        streak += failures
    bump = failures > 0 or scaled or bool(changed) or bool(replaced_now)
    new_epoch = old_epoch + 1 if bump else old_epoch

    events: list[Event] = []
    for n in failed:
        detail = pods[n].detail or f"phase {pods[n].phase}"
        events.append(Event("Warning", c.REASON_MEMBER_FAILED, f"member {n} ended at epoch {old_epoch}: {detail}"))
    for n in lost:
        how = "is being deleted" if n in pods else "vanished"
        events.append(Event("Warning", c.REASON_MEMBER_LOST, f"member {n} {how} at epoch {old_epoch}"))
    for n in changed:
        events.append(
            Event("Normal", c.REASON_REPLACED, f"out-of-date member {n} was deleted; it is re-created from the "
                  "current template (a change, not a failure)")
        )
    if scaled:
        events.append(
            Event(
                "Normal",
                c.REASON_SCALED,
                f"world size {old_world} -> {spec.world_size} ({spec.inference.replicas} inference replicas)",
            )
        )
    if bump:
        why = ", ".join(
            filter(
                None,
                [
                    f"{failures} member(s) lost" if failures else "",
                    "scaled" if scaled else "",
                    f"{len(changed) + len(replaced_now)} member(s) replaced" if changed or replaced_now else "",
                ],
            )
        )
        events.append(
            Event("Normal", c.REASON_EPOCH_BUMPED, f"epoch {old_epoch} -> {new_epoch} ({why}); the group re-forms")
        )
    return Membership(
        epoch=old_epoch,
        new_epoch=new_epoch,
        slots=slots,
        live=live,
        terminated=terminated,
        extra=extra,
        foreign=foreign,
        failed=failed,
        lost=lost,
        changed=changed,
        replace=replace,
        out_of_date=out_of_date,
        scaled=scaled,
        restarts=old_restarts + failures,
        last_failure=rfc3339(now) if failures else old_last_failure,
        streak=streak,
        failures=failures,
        events=events,
    )
