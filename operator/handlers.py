"""kopf wiring: the operator's settings, and which events trigger a reconcile. Nothing else.

Choices (docs/operator.md says why at more length):
- kopf watches WeightSyncs only; the children (pods, Services, Secrets as metadata, Roles, RoleBindings)
  are watched by the operator's own informers (informer.py) with the operator's label selector applied by
  the API server (kopf would watch every pod of the cluster and filter on its side), and every reconcile
  reads from those caches: the idle cost does not grow with the number of objects.
- Only `kopf.on.event` handlers. They keep no state on the object: no finalizer (a WeightSync deleted while
  the operator is down does not hang in Terminating; its children go through owner references and the
  garbage collector) and no last-handled-configuration annotation (whose 256 KiB limit large pod
  templates would hit). kopf lists every object when it starts and delivers each as an event, which is
  the resume.
- No kopf timers (they add finalizers): the Scheduler's own resync re-triggers every known WeightSync
  every `resync_seconds`, and is paused while kopf's peering pauses this operator.
- Blocking client calls run in threads (asyncio.to_thread), one reconcile at a time per object.
- Watch timeouts are set at startup: a silent watch stream is re-opened instead of hanging forever.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import kopf
from kubernetes import client, config

from weightsync.api.models import GROUP, PLURAL, VERSION

from . import metrics
from .informer import Children, informers
from .kube import Conflict, Kube, WeightSyncCache
from .reconcile import reconcile
from .scheduler import Key, Scheduler

log = logging.getLogger("weightsync.operator")

#: Retry delay after a status write lost a race (someone else changed the object first).
CONFLICT_RETRY_SECONDS = 0.5


@dataclass
class Config:
    """Settings that __main__ fills from the command line before kopf starts."""

    resync_seconds: float = 30.0
    watch_server_timeout: int = 60
    watch_client_timeout: int = 90
    watch_connect_timeout: int = 10
    #: Namespaces watched (empty: all); set by __main__.
    namespaces: tuple[str, ...] = ()
    #: Seconds to wait at startup for the informers' first lists (reconciles read through until then).
    informer_startup_timeout: float = 30.0


CONFIG = Config()
_state: dict[str, Any] = {}


class CountingApiClient(client.ApiClient):
    """Counts every request by verb (a watch as WATCH), for the metrics and the idle-cost benchmark."""

    def call_api(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        metrics.API_REQUESTS.labels(verb="WATCH" if "watch=true" in url.lower() else method.upper()).inc()
        return super().call_api(method, url, *args, **kwargs)


def _api_client() -> client.ApiClient:
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    return CountingApiClient()


def _reconcile_key(key: Key) -> float | None:
    kube: Kube = _state["kube"]
    started = time.monotonic()
    metrics.RECONCILES.inc()
    try:
        result = reconcile(kube, *key)
    except Conflict as err:
        log.info("status write conflict (%s); reconciling again", err)
        return CONFLICT_RETRY_SECONDS
    except Exception:
        metrics.RECONCILE_ERRORS.inc()
        raise
    finally:
        metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
    metrics.set_phase(key, result.phase)
    scheduler = _scheduler()
    if not result.found:
        scheduler.forget(key)
        return None
    metrics.RESTARTS.inc(result.failures)
    if result.epoch_changed:
        metrics.EPOCH_CHANGES.inc()
    if result.rejected:  # the status says why; try again later, sooner if something changes
        return scheduler.backoff.failed(key)
    scheduler.backoff.succeeded(key)
    return result.requeue_after


def _scheduler() -> Scheduler:
    sched: Scheduler = _state["scheduler"]
    return sched


class _PeeringPause(logging.Handler):
    """Follows kopf's peering pause/resume (kopf keeps that state private; it logs each transition).

    Only the resync and the backoff timers need it: kopf itself stops delivering events while paused.
    """

    def __init__(self, scheduler: Scheduler) -> None:
        super().__init__()
        self.scheduler = scheduler

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if text.startswith("Pausing"):
            self.scheduler.paused = True
        elif text.startswith("Resuming"):
            self.scheduler.paused = False


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.watching.server_timeout = CONFIG.watch_server_timeout
    settings.watching.client_timeout = CONFIG.watch_client_timeout
    settings.watching.connect_timeout = CONFIG.watch_connect_timeout
    settings.networking.request_timeout = 60
    settings.posting.enabled = False  # the operator posts its own Events; kopf's would need more RBAC
    settings.scanning.disabled = True  # fixed resources: no list/watch on namespaces and CRDs
    settings.peering.priority = settings.peering.priority or _random_priority()

    if "scheduler" in _state:  # a retried startup
        return
    api = await asyncio.to_thread(_api_client)
    loop = asyncio.get_running_loop()
    scheduler = Scheduler(_reconcile_key)

    def child_changed(namespace: str, group: str) -> None:  # an informer thread
        loop.call_soon_threadsafe(scheduler.poke, (namespace, group))

    children = Children(informers(api, list(CONFIG.namespaces), child_changed))
    children.start()
    _state["children"] = children
    _state["weightsyncs"] = WeightSyncCache()
    _state["kube"] = Kube(api, children, _state["weightsyncs"])
    if not await asyncio.to_thread(children.wait_ready, CONFIG.informer_startup_timeout):
        log.warning("the child informers did not list within %ss; reading through to the API server meanwhile",
                    CONFIG.informer_startup_timeout)
    # With peering, kopf starts paused until it has seen the peers, and says "Resuming" when it may act.
    scheduler.paused = settings.peering.mandatory and not settings.peering.standalone
    _state["scheduler"] = scheduler
    logging.getLogger("kopf._core.engines.peering").addHandler(_PeeringPause(scheduler))
    _state["resync"] = asyncio.get_running_loop().create_task(scheduler.resync(CONFIG.resync_seconds))
    for phase in metrics.PHASES:
        metrics.GROUPS.labels(phase=phase).set(0)
    log.info("weightsync operator started (peering priority %s)", settings.peering.priority)


def _random_priority() -> int:
    # Equal priorities freeze every peer (docs/operator.md): draw one unless the command line gave one.
    return random.randint(1, 2**31 - 1)


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    task = _state.pop("resync", None)
    if task is not None:
        task.cancel()
    children = _state.get("children")
    if children is not None:
        children.stop()


@kopf.on.event(GROUP, VERSION, PLURAL)
async def weightsync_event(
    event: kopf.RawEvent, body: kopf.Body, namespace: str | None, name: str, **_: Any
) -> None:
    key = (namespace or "", name)
    cache: WeightSyncCache | None = _state.get("weightsyncs")
    if event["type"] == "DELETED":
        if cache is not None:
            cache.drop(*key)
        _scheduler().forget(key)
        metrics.set_phase(key, None)
        return
    if cache is not None:
        cache.put(dict(event["object"]))
    await _scheduler().trigger(key)
