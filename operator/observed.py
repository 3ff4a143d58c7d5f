"""Observation: the facts about a WeightSync's children that planning uses, read from the API server's objects.

Pure (no kopf, no client): `kube.py` (or the watch cache) hands in the raw objects as the API server spells
them, and this module keeps only what the planner needs. Nothing here trusts a child's content beyond
reading it: annotations are strings, a Secret is seen by its metadata only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from weightsync.contract import EPOCH_ANNOTATION

from . import constants as c

Obj = dict[str, Any]
TERMINATED = ("Failed", "Succeeded")
#: Container waiting reasons that mean the pod will not start without someone changing something.
STUCK_WAITING = frozenset(
    {
        "CreateContainerConfigError",
        "CreateContainerError",
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "RunContainerError",
    }
)


@dataclass(frozen=True)
class ObservedPod:
    name: str
    owned: bool
    phase: str
    ready: bool
    terminating: bool
    uid: str = ""
    annotations: dict[str, str] = field(default_factory=dict)
    #: Why it ended (its containers' exit codes), for events.
    detail: str = ""
    #: Why it cannot start (unschedulable, an image or config error), '' while nothing holds it up.
    waiting: str = ""
    #: Who controls it when we do not: `Kind/name`, or '' (no controller).
    controller: str = ""

    @property
    def epoch(self) -> int | None:
        try:
            return int(self.annotations[EPOCH_ANNOTATION])
        except (KeyError, ValueError):
            return None

    @property
    def terminated(self) -> bool:
        return self.phase in TERMINATED


@dataclass(frozen=True)
class Rejection:
    """The API server refused (in a dry run) to create one child: its answer, as a user would want to read it."""

    kind: str
    name: str
    code: int
    reason: str
    message: str

    @property
    def permanent(self) -> bool:
        """Invalid or malformed: it will be refused until the spec changes. Forbidden (a missing service
        account, a quota) or a server error may pass later."""
        return self.code in (400, 422)

    def describe(self) -> str:
        return f"{self.kind} {self.name}: {self.message}"


@dataclass(frozen=True)
class Observed:
    """The children as the API server has them; None for a child that does not exist."""

    pods: dict[str, ObservedPod] = field(default_factory=dict)
    service: Obj | None = None
    secret: Obj | None = None
    role: Obj | None = None
    role_binding: Obj | None = None
    network_policy: Obj | None = None
    #: The creates the API server refused in a dry run of this reconcile's plan.
    rejections: tuple[Rejection, ...] = ()


@dataclass(frozen=True)
class WeightSyncObject:
    name: str
    namespace: str
    uid: str
    generation: int
    spec: Obj
    status: Obj


def controller_of(obj: Obj | None) -> Obj | None:
    """The owner reference with `controller: true`, if any."""
    refs = (obj or {}).get("metadata", {}).get("ownerReferences") or []
    return next((ref for ref in refs if ref.get("controller")), None)


def is_owned(obj: Obj | None, owner_uid: str) -> bool:
    ref = controller_of(obj)
    return ref is not None and ref.get("uid") == owner_uid


def describe_controller(obj: Obj | None) -> str:
    ref = controller_of(obj)
    return f"{ref.get('kind', '?')}/{ref.get('name', '?')}" if ref is not None else ""


def _waiting(status: Obj) -> str:
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return f"{cond.get('reason') or 'Unschedulable'}: {cond.get('message', '')}".strip()
    for cs in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in STUCK_WAITING:
            return f"container {cs.get('name')}: {waiting['reason']}: {waiting.get('message', '')}".strip()
    return ""


def observe_pod(pod: Obj, owner_uid: str) -> ObservedPod:
    """The facts about a pod that planning uses."""
    meta = pod.get("metadata", {})
    status = pod.get("status") or {}
    owned = is_owned(pod, owner_uid)
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
        annotations={str(k): str(v) for k, v in (meta.get("annotations") or {}).items()},
        detail="; ".join(details),
        waiting=_waiting(status),
        controller="" if owned else describe_controller(pod),
    )


def member_is_current(pod: ObservedPod, template_hash: str, secret_uid: str | None) -> tuple[bool, str]:
    """Whether a member was made from the current template and with the current token Secret; else why not.

    A member without the annotations (made before they existed) is taken as current: nothing says otherwise."""
    made_with = pod.annotations.get(c.TOKEN_SECRET_UID)
    if secret_uid is not None and made_with is not None and made_with != secret_uid:
        return False, "it holds the token of a token Secret that was replaced"
    made_from = pod.annotations.get(c.TEMPLATE_HASH)
    if made_from is not None and made_from != template_hash:
        return False, "its pod template changed"
    return True, ""
