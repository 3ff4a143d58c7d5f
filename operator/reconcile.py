"""One reconcile of one WeightSync: read, observe, plan, record the decision, act, tell.

Blocking (it calls `kube`); the kopf wiring runs it in a worker thread. The same function serves every
trigger (the object's own events, its children's events, the periodic resync, a backoff timer), so the
operator is level-based: it never needs to know why it was called.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from .kube import Kube
from .plan import WeightSyncObject, plan

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
    decided = plan(ws, kube.observe(ws), now, secrets.token_urlsafe(TOKEN_BYTES))

    writes = 0
    if decided.status != ws.status:
        kube.write_status(raw, decided.status)  # the decision is recorded before it is acted on
        writes += 1
    for event in decided.events:
        log.info("%s/%s %s: %s", namespace, name, event.reason, event.message)
        kube.post_event(raw, event, now)
    for action in decided.actions:
        if kube.apply(namespace, action):
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
    )
