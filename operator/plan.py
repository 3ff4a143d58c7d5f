"""Planning: desired vs observed -> the status to write, the actions to take, the events to post.

Pure (no kopf, no client, no clock): `plan()` derives everything from the WeightSync as stored and the
children as observed, so it is level-based and a crash at any point is harmless. The executor writes the
status first (with a resourceVersion precondition) and then runs the actions, so every decision is
recorded before it is acted on:

- The epoch (`status.epoch`) and the world size at that epoch (`status.worldSize`) are the group's
  identity. The epoch is bumped when members are lost (a member pod failed, exited, vanished or is being
  deleted) or when the desired world size differs from `status.worldSize` (a scale).
- A failure is counted once: a terminated pod counts if it is still a recorded member (`status.members`)
  or carries the current epoch; after the bump it is neither, so a retry after a crash does not count it
  again. A vanished pod counts if it is a recorded member; the bumped status no longer lists it.
- Members are created at the current epoch; survivors get the new epoch (and world size, and for the
  trainer the endpoints) patched into their annotations, which the downward API projects into
  `PODINFO_MOUNT_PATH`: they re-join in place without a restart.
- `restarts` > `failurePolicy.maxRestarts` -> phase Failed; nothing is created or deleted any more (the
  pods stay for inspection). Raising maxRestarts resumes.
- The trainer's sync report (its pod's annotation weightsync.dev/last-sync) is untrusted input: one that
  does not parse within bounds (`sync_report.py`) is dropped, `status.lastSync` keeps the previous one,
  `status.rejectedSyncReport` records its digest and an InvalidSyncReport event says what is wrong, once
  per distinct value. It never holds up anything else.
- A template env var with a reserved WEIGHTSYNC_* name -> phase Failed, a condition and an event, and
  nothing is created.
- Pod template changes apply to members created afterwards (a StatefulSet's OnDelete strategy): the
  operator never kills a running member (least of all the trainer) to roll out a template; deleting a
  member pod rolls it, at the cost of one epoch. The fields baked into every member's environment
  (workersPerReplica, rendezvous, transport, network) are immutable at admission instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import ValidationError

from weightsync.api.models import (
    Condition,
    ConditionType,
    LastSync,
    Member,
    Phase,
    RejectedSyncReport,
    WeightSyncSpec,
    WeightSyncStatus,
)

from . import constants as c
from . import desired, sync_report

Obj = dict[str, Any]
TERMINATED = ("Failed", "Succeeded")


# --- inputs ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObservedPod:
    name: str
    owned: bool
    phase: str
    ready: bool
    terminating: bool
    uid: str = ""
    annotations: dict[str, str] = field(default_factory=dict)
    detail: str = ""

    @property
    def epoch(self) -> int | None:
        try:
            return int(self.annotations[c.EPOCH])
        except (KeyError, ValueError):
            return None

    @property
    def terminated(self) -> bool:
        return self.phase in TERMINATED


@dataclass(frozen=True)
class Observed:
    """The children as the API server has them; None for a child that does not exist."""

    pods: dict[str, ObservedPod] = field(default_factory=dict)
    service: Obj | None = None
    secret: Obj | None = None
    role: Obj | None = None
    role_binding: Obj | None = None


@dataclass(frozen=True)
class WeightSyncObject:
    name: str
    namespace: str
    uid: str
    generation: int
    spec: Obj
    status: Obj


# --- outputs ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Create:
    obj: Obj
    event: Event | None = None


@dataclass(frozen=True)
class Patch:
    kind: str
    name: str
    patch: Obj
    event: Event | None = None


@dataclass(frozen=True)
class Delete:
    kind: str
    name: str
    uid: str
    event: Event | None = None


Action = Create | Patch | Delete


@dataclass(frozen=True)
class Plan:
    status: Obj
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None
    failures: int = 0
    epoch_changed: bool = False


# --- helpers ---------------------------------------------------------------------------------------------


def observe_pod(pod: Obj, owner_uid: str) -> ObservedPod:
    """The facts about a pod that planning uses."""
    meta = pod.get("metadata", {})
    status = pod.get("status") or {}
    owned = any(ref.get("uid") == owner_uid and ref.get("controller") for ref in meta.get("ownerReferences") or [])
    ready = any(cond.get("type") == "Ready" and cond.get("status") == "True" for cond in status.get("conditions") or [])
    details = []
    for cs in status.get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term:
            why = f" ({term['reason']})" if term.get("reason") else ""
            details.append(f"container {cs.get('name')} exited with code {term.get('exitCode')}{why}")
    if not details and status.get("reason"):
        details.append(f"{status.get('reason')}: {status.get('message', '')}".strip())
    return ObservedPod(
        name=meta.get("name", ""),
        uid=meta.get("uid", ""),
        owned=owned,
        phase=status.get("phase", "Pending"),
        ready=ready,
        terminating=meta.get("deletionTimestamp") is not None,
        annotations=dict(meta.get("annotations") or {}),
        detail="; ".join(details),
    )


def is_owned(obj: Obj | None, owner_uid: str) -> bool:
    refs = (obj or {}).get("metadata", {}).get("ownerReferences") or []
    return any(ref.get("uid") == owner_uid and ref.get("controller") for ref in refs)


def rfc3339(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def set_condition(
    conditions: list[Condition],
    *,
    type_: ConditionType,
    status: bool,
    reason: str,
    message: str,
    generation: int,
    now: datetime,
) -> list[Condition]:
    """metav1.Condition semantics: lastTransitionTime changes only when status does."""
    text: Literal["True", "False"] = "True" if status else "False"
    old = next((cond for cond in conditions if cond.type == type_), None)
    since = old.last_transition_time if old is not None and old.status == text else rfc3339(now)
    new = Condition(
        type=type_,
        status=text,
        reason=reason,
        message=message,
        last_transition_time=since,
        observed_generation=generation,
    )
    return [*(cond for cond in conditions if cond.type != type_), new]


@dataclass(frozen=True)
class SyncReportOutcome:
    """What the trainer's annotation makes of status.lastSync and status.rejectedSyncReport."""

    last_sync: LastSync | None
    rejected: RejectedSyncReport | None
    event: Event | None = None


def sync_report_outcome(trainer: ObservedPod | None, old: WeightSyncStatus, now: datetime) -> SyncReportOutcome:
    """A valid report replaces lastSync (and clears rejectedSyncReport); a bad one keeps the previous
    lastSync, is recorded by its digest, and is announced by an event only when its value is new."""
    raw = trainer.annotations.get(c.LAST_SYNC) if trainer is not None else None
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
        message = f"dropped the report in {c.LAST_SYNC} of pod {trainer.name}: {err}; {kept}"
        event = Event("Warning", c.REASON_INVALID_REPORT, message)
        return SyncReportOutcome(old.last_sync, rejected, event)


def _old_status(raw: Obj) -> WeightSyncStatus:
    """The stored status; a lastSync that no longer fits the model (written before its bounds) is dropped."""
    try:
        return WeightSyncStatus.model_validate(raw)
    except ValidationError:
        if "lastSync" not in raw:
            raise
        return WeightSyncStatus.model_validate({k: v for k, v in raw.items() if k != "lastSync"})


#: Status fields the planner may drop: the status is written as a merge patch, so a dropped one is sent as null.
_REMOVABLE = ("lastSync", "rejectedSyncReport")


def _drift(observed: Obj, wanted: Obj, keys: tuple[str, ...]) -> Obj:
    """The top-level `keys` of `wanted` whose values the observed object does not hold (a merge patch)."""
    patch: Obj = {}
    for key in keys:
        want, have = wanted.get(key), observed.get(key)
        if isinstance(want, dict) and isinstance(have, dict):
            sub = {k: v for k, v in want.items() if have.get(k) != v}
            if sub:
                patch[key] = sub
        elif want != have:
            patch[key] = want
    return patch


# --- the planner -----------------------------------------------------------------------------------------


def plan(ws: WeightSyncObject, observed: Observed, now: datetime, token: str) -> Plan:
    """Everything the operator should do about one WeightSync, given what exists now.

    `token` is a fresh random token, used only if the Secret has to be created.
    """
    old = _old_status(ws.status or {})
    spec = WeightSyncSpec.model_validate(ws.spec)
    conditions = list(old.conditions)
    gen = ws.generation

    def condition(type_: ConditionType, status: bool, reason: str, message: str) -> None:
        nonlocal conditions
        conditions = set_condition(
            conditions, type_=type_, status=status, reason=reason, message=message, generation=gen, now=now
        )

    conflicts = desired.env_conflicts(spec)
    if conflicts:
        message = "refusing to create anything: " + "; ".join(conflicts)
        was = next((x for x in old.conditions if x.type == "Failed"), None)
        refused = (
            [] if was is not None and was.message == message else [Event("Warning", c.REASON_RESERVED_ENV, message)]
        )
        condition("Failed", True, c.REASON_RESERVED_ENV, message)
        condition("Ready", False, c.REASON_RESERVED_ENV, "the spec is refused")
        condition("Progressing", False, c.REASON_RESERVED_ENV, "the spec is refused")
        condition("Degraded", False, c.REASON_AS_EXPECTED, "")
        status = old.model_copy(update={"phase": "Failed", "conditions": conditions, "observed_generation": gen})
        return Plan(status=_dump(status), events=refused)

    epoch = old.epoch or 0
    world = spec.world_size
    all_slots = desired.slots(ws.name, spec)
    by_name = {s.pod: s for s in all_slots}
    recorded = {m.pod for m in old.members}
    pods = observed.pods

    owned = {n: p for n, p in pods.items() if p.owned}
    live = {n: p for n, p in owned.items() if not p.terminating and not p.terminated and n in by_name}
    terminated = {n: p for n, p in owned.items() if not p.terminating and p.terminated}
    extra = {n: p for n, p in owned.items() if n not in by_name and not p.terminating and not p.terminated}
    foreign = sorted(n for n, p in pods.items() if not p.owned and n in by_name)

    # Count each loss once (see the module docstring).
    failed = sorted(n for n, p in terminated.items() if n in by_name and (n in recorded or (p.epoch or 0) >= epoch))
    lost = sorted(n for n in recorded if n in by_name and n not in live and n not in terminated)
    scaled = old.world_size is not None and old.world_size != world
    failures = len(failed) + len(lost)
    bump = failures > 0 or scaled
    new_epoch = epoch + 1 if bump else epoch
    restarts = (old.restarts or 0) + failures
    last_failure = rfc3339(now) if failures else old.last_failure_time

    events: list[Event] = []
    for n in failed:
        detail = pods[n].detail or f"phase {pods[n].phase}"
        events.append(Event("Warning", c.REASON_MEMBER_FAILED, f"member {n} ended at epoch {epoch}: {detail}"))
    for n in lost:
        how = "is being deleted" if n in pods else "vanished"
        events.append(Event("Warning", c.REASON_MEMBER_LOST, f"member {n} {how} at epoch {epoch}"))
    if scaled:
        events.append(
            Event(
                "Normal",
                c.REASON_SCALED,
                f"world size {old.world_size} -> {world} ({spec.inference.replicas} inference replicas)",
            )
        )
    if bump:
        why = ", ".join(filter(None, [f"{failures} member(s) lost" if failures else "", "scaled" if scaled else ""]))
        events.append(
            Event("Normal", c.REASON_EPOCH_BUMPED, f"epoch {epoch} -> {new_epoch} ({why}); the group re-forms")
        )

    over = restarts > spec.failure_policy.max_restarts
    group = desired.Group(ws.name, ws.namespace, ws.uid, spec, new_epoch)
    actions: list[Action] = []
    requeue: float | None = None
    waiting_backoff = False
    if over:
        if failures:
            events.append(
                Event(
                    "Warning",
                    c.REASON_MAX_RESTARTS,
                    f"{restarts} member failures exceed "
                    f"failurePolicy.maxRestarts={spec.failure_policy.max_restarts}; the WeightSync is Failed",
                )
            )
    else:
        actions += _ensure_shared(group, observed, token)
        for n, p in sorted(terminated.items()):
            actions.append(Delete("Pod", n, p.uid, Event("Normal", c.REASON_DELETED, f"deleted ended member {n}")))
        for n, p in sorted(extra.items()):
            actions.append(Delete("Pod", n, p.uid, Event("Normal", c.REASON_DELETED, f"deleted {n}: scaled away")))
        patched = []
        for n, p in sorted(live.items()):
            wanted = desired.member_annotations(group, by_name[n], new_epoch)
            diff = {k: v for k, v in wanted.items() if p.annotations.get(k) != v}
            if diff:
                actions.append(Patch("Pod", n, {"metadata": {"annotations": diff}}))
                patched.append(n)
        if patched:
            events.append(
                Event(
                    "Normal",
                    c.REASON_EPOCH_PROPAGATED,
                    f"epoch {new_epoch} and world size {world} set on {', '.join(patched)}",
                )
            )
        missing = [s for s in all_slots if s.pod not in pods]
        delay = _backoff_left(spec, restarts, last_failure, now)
        if missing and delay > 0:
            waiting_backoff = True
            requeue = delay
            if failures:
                events.append(
                    Event(
                        "Normal",
                        c.REASON_BACKOFF,
                        f"re-creating {len(missing)} member(s) in {delay:.1f}s (restart {restarts})",
                    )
                )
        else:
            for s in missing:
                actions.append(
                    Create(
                        desired.pod(group, s),
                        Event(
                            "Normal",
                            c.REASON_CREATED,
                            f"created {s.role} pod {s.pod} (rank offset "
                            f"{s.rank_offset}, {s.local_world_size} worker(s), epoch {new_epoch})",
                        ),
                    )
                )
    if foreign:
        events.append(
            Event(
                "Warning",
                c.REASON_STALE_CHILD,
                f"pods {', '.join(foreign)} belong to another owner; waiting for them to go",
            )
        )

    report = sync_report_outcome(live.get(c.trainer_pod_name(ws.name)), old, now)
    if report.event is not None:
        events.append(report.event)

    # Status.
    members = [
        Member(
            pod=s.pod,
            role="trainer" if s.role == "trainer" else "inference",
            rank_offset=s.rank_offset,
            local_world_size=s.local_world_size,
            ready=live[s.pod].ready,
        )
        for s in all_slots
        if s.pod in live
    ]
    ready_count = sum(1 for m in members if m.ready)
    member_actions = any(isinstance(a, (Create, Delete)) or (isinstance(a, Patch) and a.kind == "Pod") for a in actions)
    whole = ready_count == len(all_slots) and not member_actions and not waiting_backoff and not extra
    degraded_before = any(x.type == "Degraded" and x.status == "True" for x in old.conditions)
    degraded = not whole and (failures > 0 or degraded_before)
    running = any(p.phase == "Running" for p in live.values())

    phase: Phase
    if over:
        phase = "Failed"
        condition(
            "Failed",
            True,
            c.REASON_MAX_RESTARTS,
            f"{restarts} member failures exceed failurePolicy.maxRestarts={spec.failure_policy.max_restarts}",
        )
    else:
        phase = "Ready" if whole else "Degraded" if degraded else "Forming" if running else "Pending"
        condition("Failed", False, c.REASON_AS_EXPECTED, "")
    summary = f"{ready_count}/{len(all_slots)} members ready at epoch {new_epoch}"
    if waiting_backoff:
        summary += f"; re-creating lost members after a backoff of {requeue:.1f}s"
    if foreign:
        summary += f"; waiting for stale pods {', '.join(foreign)} of a previous owner to go"
    condition("Ready", phase == "Ready", c.REASON_READY if phase == "Ready" else phase, summary)
    progressing = phase in ("Pending", "Forming", "Degraded")
    condition("Progressing", progressing, c.REASON_FORMING if progressing else phase, summary if progressing else "")
    if degraded:
        reason = c.REASON_MEMBER_FAILED if failed else c.REASON_MEMBER_LOST if lost else _reason(old, "Degraded")
        message = (
            f"lost {', '.join(failed + lost)}; re-forming at epoch {new_epoch}"
            if failures
            else _message(old, "Degraded")
        )
        condition("Degraded", True, reason, message)
    else:
        settled = next((x.reason for x in old.conditions if x.type == "Degraded" and x.status == "False"), None)
        condition("Degraded", False, c.REASON_RECOVERED if degraded_before else settled or c.REASON_AS_EXPECTED, "")
    if phase == "Ready" and not any(x.type == "Ready" and x.status == "True" for x in old.conditions):
        events.append(Event("Normal", c.REASON_READY, f"all {len(all_slots)} members ready at epoch {new_epoch}"))

    status = WeightSyncStatus(
        phase=phase,
        conditions=sorted(conditions, key=lambda x: _ORDER.index(x.type)),
        observed_generation=gen,
        epoch=new_epoch,
        world_size=world,
        replicas=sum(1 for n in [*live, *extra] if n.startswith(f"{ws.name}-inference-")),
        selector=f"{c.NAME_LABEL}={ws.name},{c.ROLE_LABEL}=inference",
        ready=f"{ready_count}/{len(all_slots)}",
        members=members,
        restarts=restarts,
        last_failure_time=last_failure,
        last_sync=report.last_sync,
        rejected_sync_report=report.rejected,
    )
    dumped = _dump(status)
    dumped.update({key: None for key in _REMOVABLE if key in (ws.status or {}) and key not in dumped})
    return Plan(
        status=dumped,
        actions=actions,
        events=events,
        requeue_after=requeue,
        failures=failures,
        epoch_changed=bump,
    )


_ORDER = ("Ready", "Progressing", "Degraded", "Failed")


def _reason(old: WeightSyncStatus, type_: str) -> str:
    return next((x.reason for x in old.conditions if x.type == type_), c.REASON_MEMBER_LOST)


def _message(old: WeightSyncStatus, type_: str) -> str:
    return next((x.message for x in old.conditions if x.type == type_), "")


def _backoff_left(spec: WeightSyncSpec, restarts: int, last_failure: str | None, now: datetime) -> float:
    since = parse_time(last_failure)
    if since is None:
        return 0.0
    until = since + timedelta(seconds=spec.failure_policy.backoff(restarts))
    return max(0.0, (until - now).total_seconds())


def _ensure_shared(group: desired.Group, observed: Observed, token: str) -> list[Action]:
    """Service, Secret, Role and RoleBinding: create what is missing, repair what drifted."""
    actions: list[Action] = []
    name = group.name
    recreated = any(p.owned for p in observed.pods.values())

    svc = desired.service(group)
    if observed.service is None:
        actions.append(Create(svc, Event("Normal", c.REASON_CREATED, f"created headless Service {name}")))
    elif is_owned(observed.service, group.uid):
        patch = _drift(observed.service.get("spec", {}), svc["spec"], ("selector", "publishNotReadyAddresses", "ports"))
        if patch:
            actions.append(
                Patch(
                    "Service",
                    name,
                    {"spec": patch},
                    Event("Normal", c.REASON_UPDATED, f"repaired Service {name}: {sorted(patch)}"),
                )
            )

    if observed.secret is None:
        secret_name = c.secret_name(name)
        event = (
            Event(
                "Warning",
                c.REASON_TOKEN_RECREATED,
                f"Secret {secret_name} was missing and got a new token; "
                "members created before hold the old one and cannot re-join until re-created",
            )
            if recreated
            else Event("Normal", c.REASON_CREATED, f"created Secret {secret_name} with the group token")
        )
        actions.append(Create(desired.secret(group, token), event))

    for kind, observed_obj, wanted, keys in (
        ("Role", observed.role, desired.report_role(group), ("rules",)),
        ("RoleBinding", observed.role_binding, desired.report_role_binding(group), ("subjects",)),
    ):
        role_name = wanted["metadata"]["name"]
        if observed_obj is None:
            actions.append(Create(wanted, Event("Normal", c.REASON_CREATED, f"created {kind} {role_name}")))
        elif is_owned(observed_obj, group.uid):
            patch = {k: wanted[k] for k in keys if observed_obj.get(k) != wanted[k]}
            if patch:
                actions.append(
                    Patch(
                        kind,
                        role_name,
                        patch,
                        Event("Normal", c.REASON_UPDATED, f"repaired {kind} {role_name}"),
                    )
                )
    return actions


def _dump(status: WeightSyncStatus) -> Obj:
    out: Obj = status.model_dump(by_alias=True, exclude_none=True, mode="json")
    return out
