"""One reconcile of one WeightSync: read, observe, plan, dry-run the creates, record the decision, act, tell.

Blocking (it calls `kube`); the kopf wiring runs it in a worker thread. The same function serves every
trigger (the object's own events, its children's events, the periodic resync, a backoff timer), so the
operator is level-based: it never needs to know why it was called.

Creates go through a server-side dry run first: what the API server would refuse (an invalid template, a
service account that does not exist, a quota) is known before anything is created, and is planned with
(`Observed.rejections`), so a bad template creates nothing and the status says why.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from kubernetes.client.exceptions import ApiException

from . import constants as c
from .decision import Create, Event
from .kube import Kube, api_error_text
from .observed import WeightSyncObject
from .plan import plan

log = logging.getLogger("weightsync.operator.reconcile")

#: Bytes of entropy in a group token (urlsafe base64: 43 characters).
TOKEN_BYTES = 32


@dataclass(frozen=True)
class Result:
    found: bool
    phase: str | None = None
    requeue_after: float | None = None
    failures: int = 0
    epoch_changed: bool = False
    writes: int = 0
    #: The API server refused a child (in the dry run): retry on a backoff, not at once.
    rejected: bool = False


class WriteRefused(Exception):
    """The API server refused a write that planning had decided on; the event names it."""


def reconcile(kube: Kube, namespace: str, name: str) -> Result:
    raw = kube.get_weightsync(namespace, name)
    if raw is None or raw["metadata"].get("deletionTimestamp"):
        return Result(found=False)
    meta = raw["metadata"]
    ws = WeightSyncObject(
        name=name,
        namespace=namespace,
        uid=meta["uid"],
        generation=int(meta.get("generation", 1)),
        spec=raw.get("spec") or {},
        status=raw.get("status") or {},
    )
    now = datetime.now(UTC)
    token = secrets.token_urlsafe(TOKEN_BYTES)
    observed = kube.observe(ws)
    decided = plan(ws, observed, now, token)
    creates = [a for a in decided.actions if isinstance(a, Create)] + decided.probes
    rejections = kube.dry_run(namespace, creates) if creates else []
    if rejections:
        decided = plan(ws, replace(observed, rejections=tuple(rejections)), now, token)

    writes = 0
    if decided.status != ws.status:
        kube.write_status(raw, decided.status)  # the decision is recorded before it is acted on
        writes += 1
    for event in decided.events:
        log.info("%s/%s %s: %s", namespace, name, event.reason, event.message)
        kube.post_event(raw, event, now)
    for action in decided.actions:
        try:
            done = kube.apply(namespace, action)
        except ApiException as err:
            what = action.name if isinstance(action, Create) else f"{action.kind} {action.name}"
            verb = type(action).__name__.lower()
            message = f"could not {verb} {what}: {api_error_text(err)}"
            kube.post_event(raw, Event("Warning", c.REASON_API_ERROR, message), now)
            raise WriteRefused(f"{namespace}/{name}: {message}") from None
        if done:
            writes += 1
            if action.event is not None:
                log.info("%s/%s %s: %s", namespace, name, action.event.reason, action.event.message)
                kube.post_event(raw, action.event, now)
    return Result(
        found=True,
        phase=decided.status.get("phase"),
        requeue_after=decided.requeue_after,
        failures=decided.failures,
        epoch_changed=decided.epoch_changed,
        writes=writes,
        rejected=bool(rejections),
    )
