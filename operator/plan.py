"""Planning: a WeightSync as stored and its children as observed -> the Decision (status, actions, events).

Pure (no kopf, no client, no clock): everything is derived from its inputs, so the operator is level-based
and a crash at any point is harmless. The executor (`reconcile.py`) writes the status first (with a
resourceVersion precondition) and then runs the actions, so every decision is recorded before it is acted on.

`plan()` is a sequence of named steps, each in its own module and tested on its own:

1. refusal: what makes the spec unusable as it is (a template env var the operator owns; a child the API
   server refuses as invalid in a dry run) -> phase Failed, a condition and one event naming the field, and
   nothing created. Fixing the spec clears it.
2. shared children (`shared.py`): Service, Secret, Role, RoleBinding created or repaired; one we did not make
   is reported, never adopted.
3. membership (`membership.py`): failures, losses, changes, the epoch and the restart count.
4. member actions (`members.py`): deletes, epoch patches, creates after the backoff.
5. status (`status.py`): phase, conditions, members, the trainer's sync report.

`failurePolicy.maxRestarts` exceeded -> phase Failed and nothing is created or deleted any more (the pods
stay for inspection); raising it resumes.
"""

from __future__ import annotations

from datetime import datetime

from weightsync.api.models import WeightSyncSpec, WeightSyncStatus

from . import constants as c
from . import desired, engines, names
from .decision import Create, Decision, Event
from .members import MemberPlan, member_actions
from .membership import membership
from .observed import Obj, Observed, WeightSyncObject
from .shared import shared_children
from .status import REMOVABLE, Conditions, Holds, group_status, old_status, sync_report_outcome


def _dump(status: WeightSyncStatus) -> Obj:
    out: Obj = status.model_dump(by_alias=True, exclude_none=True, mode="json")
    return out


def refusal(spec: WeightSyncSpec, observed: Observed) -> tuple[str, str] | None:
    """(reason, message) when the spec cannot be carried out until it changes; None when it can."""
    conflicts = desired.env_conflicts(spec)
    if conflicts:
        return c.REASON_RESERVED_ENV, "refusing to create anything: " + "; ".join(conflicts)
    engine = engines.vllm_problems(spec)
    if engine:
        return c.REASON_ENGINE_CONFIG, "refusing to create anything: " + "; ".join(engine)
    invalid = [r for r in observed.rejections if r.permanent]
    if invalid:
        text = "; ".join(r.describe() for r in invalid)
        return c.REASON_INVALID_CHILD, f"the API server refuses what this spec makes, so nothing is created: {text}"
    return None


def plan(ws: WeightSyncObject, observed: Observed, now: datetime, token: str) -> Decision:
    """Everything the operator should do about one WeightSync, given what exists now.

    `token` is a fresh random token, used only if the Secret has to be created.
    """
    old = old_status(ws.status or {})
    spec = WeightSyncSpec.model_validate(ws.spec)
    conds = Conditions(old.conditions, ws.generation, now)

    refused = refusal(spec, observed)
    if refused is not None:
        reason, message = refused
        events = conds.announce("Failed", message, Event("Warning", reason, message))
        conds.set("Failed", True, reason, message)
        conds.set("Ready", False, reason, "the spec is refused")
        conds.set("Progressing", False, reason, "the spec is refused")
        conds.set("Degraded", False, c.REASON_AS_EXPECTED, "")
        status = old.model_copy(
            update={"phase": "Failed", "conditions": conds.sorted(), "observed_generation": ws.generation}
        )
        return Decision(status=_dump(status), events=events)

    members_exist = any(p.owned for p in observed.pods.values())
    group = desired.Group(ws.name, ws.namespace, ws.uid, spec, old.epoch or 0)
    shared = shared_children(group, observed, token, members_exist)
    m = membership(
        ws.name,
        spec,
        observed,
        old_epoch=old.epoch or 0,
        old_world=old.world_size,
        old_members=old.members,
        old_restarts=old.restarts or 0,
        old_last_failure=old.last_failure_time,
        old_streak=old.restart_streak,
        secret_uid=shared.secret_uid,
        now=now,
    )
    group = desired.Group(ws.name, ws.namespace, ws.uid, spec, m.new_epoch, shared.secret_uid or "")
    rejections = [r for r in observed.rejections if not r.permanent]
    rejected = {(r.kind, r.name) for r in rejections}
    hold = (
        "a child of ours is someone else's"
        if shared.conflicts
        else "the API server refuses a child"
        if rejections
        else "the token Secret is not there yet"
        if shared.secret_uid is None
        else ""
    )

    over_message = ""
    events = list(m.events)
    if m.restarts > spec.failure_policy.max_restarts:
        over_message = (
            f"{m.restarts} member failures exceed failurePolicy.maxRestarts={spec.failure_policy.max_restarts}"
        )
        if m.failures:
            events.append(Event("Warning", c.REASON_MAX_RESTARTS, f"{over_message}; the WeightSync is Failed"))
        members_plan = MemberPlan()
        actions = []
    else:
        members_plan = member_actions(group, m, set(observed.pods), now, hold)
        shared_actions = [a for a in shared.actions if not (isinstance(a, Create) and (a.kind, a.name) in rejected)]
        actions = [*shared_actions, *members_plan.actions]
        events += members_plan.events
    if m.foreign:
        events.append(
            Event(
                "Warning",
                c.REASON_STALE_CHILD,
                f"pods {', '.join(m.foreign)} belong to another owner; waiting for them to go",
            )
        )

    report = sync_report_outcome(m.live.get(names.trainer_pod_name(ws.name)), old, now)
    if report.event is not None:
        events.append(report.event)
    holds = Holds(shared.conflicts, rejections, secret_pending=shared.secret_uid is None)
    status, status_events = group_status(ws.name, spec.world_size, m, members_plan, holds, over_message, conds, old,
                                         report)
    events += status_events
    dumped = _dump(status)
    dumped.update({key: None for key in REMOVABLE if key in (ws.status or {}) and key not in dumped})
    requeue = members_plan.requeue_after
    if any(isinstance(a, Create) and a.kind == "Secret" for a in actions):
        requeue = 0.0  # the Secret is created now; its uid, which members record, is known on the next pass
    probes = []
    if shared.secret_uid is None and members_plan.held:
        probe_group = desired.Group(ws.name, ws.namespace, ws.uid, spec, m.new_epoch, "dry-run")
        probes = [Create(desired.pod(probe_group, s)) for s in m.slots if s.pod in members_plan.held]
    return Decision(
        status=dumped,
        actions=actions,
        events=events,
        requeue_after=requeue,
        failures=m.failures,
        epoch_changed=m.bumped,
        probes=probes,
    )
