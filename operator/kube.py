"""The one module that talks to the API server (blocking; called from worker threads, never the event loop).

Reads come back as plain dicts in the API server's own field names; writes send plain dicts. A create
answered 409 is success (the object is there: idempotent after a crash); a patch or delete answered 404 is
success too (it is gone; the next reconcile decides again). Deletes carry the pod's uid as a precondition,
so a pod re-created under the same name is never deleted by mistake. The status is written with the read
resourceVersion as a precondition: two writers (a peer operator, a retry) cannot both bump the epoch.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any, cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from weightsync.api.models import GROUP, PLURAL, VERSION

from . import constants as c
from . import metrics, names
from .decision import Action, Create, Delete, Event, Patch
from .informer import Children
from .observed import Observed, Rejection, WeightSyncObject, observe_pod

log = logging.getLogger("weightsync.operator.kube")

Obj = dict[str, Any]
MERGE = "application/merge-patch+json"
SECRET_METADATA = "application/json;as=PartialObjectMetadata;v=v1;g=meta.k8s.io,application/json"


class Conflict(Exception):
    """The WeightSync changed between our read and our status write; reconcile again."""


class WeightSyncCache:
    """The WeightSyncs as kopf's watch last delivered them (and as our own status writes returned them)."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], Obj] = {}
        self.lock = threading.Lock()

    def put(self, obj: Obj) -> None:
        """Keep `obj` unless the cache holds a later version of it (resourceVersions are etcd revisions)."""
        meta = obj.get("metadata", {})
        key = (meta.get("namespace", ""), meta.get("name", ""))
        with self.lock:
            held = self.objects.get(key)
            if held is None or _revision(held) <= _revision(obj):
                self.objects[key] = obj

    def get(self, namespace: str, name: str) -> Obj | None:
        with self.lock:
            return self.objects.get((namespace, name))

    def drop(self, namespace: str, name: str) -> None:
        with self.lock:
            self.objects.pop((namespace, name), None)


def _revision(obj: Obj) -> int:
    try:
        return int(obj.get("metadata", {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


class Kube:
    """`children` and `weightsyncs`: watch caches to read from (the operator's); without them (tests, the
    CLI) every read goes to the API server."""

    def __init__(
        self, api: client.ApiClient, children: Children | None = None, weightsyncs: WeightSyncCache | None = None
    ) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.rbac = client.RbacAuthorizationV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.networking = client.NetworkingV1Api(api)
        self.children = children
        self.weightsyncs = weightsyncs
        self.writes = 0

    # --- reads ----------------------------------------------------------------------------------------

    def get_weightsync(self, namespace: str, name: str) -> Obj | None:
        if self.weightsyncs is not None:
            cached = self.weightsyncs.get(namespace, name)
            if cached is not None:
                return cached
        try:
            obj = cast(Obj, self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name))
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        if self.weightsyncs is not None:
            self.weightsyncs.put(obj)
        return obj

    def observe(self, ws: WeightSyncObject) -> Observed:
        if self.children is not None and self.children.ready():
            return self._observe_cached(ws)
        return self._observe_live(ws)

    def _observe_cached(self, ws: WeightSyncObject) -> Observed:
        """From the watch caches; a shared child the cache lacks is read from the API server (it may be one
        we just created, or someone else's without our labels, which the caches never hold)."""
        assert self.children is not None
        ns, name = ws.namespace, ws.name
        cache = self.children
        pods = {p["metadata"]["name"]: observe_pod(p, ws.uid) for p in cache.of_group("pods", ns, name)}

        def read(kind: str, child: str, fallback: Callable[..., Any]) -> Obj | None:
            cached = cache.get(kind, ns, child)
            if cached is not None:
                return cached
            metrics.CACHE_MISSES.labels(kind=kind).inc()
            return self._raw(fallback, child, ns, _preload_content=False)

        return Observed(
            pods=pods,
            service=read("services", names.service_name(name), self.core.read_namespaced_service),
            secret=self._meta_only(cache.get("secrets", ns, names.secret_name(name)) or self._secret(ns, name, True)),
            role=read("roles", names.report_role_name(name), self.rbac.read_namespaced_role),
            role_binding=read("rolebindings", names.report_role_name(name), self.rbac.read_namespaced_role_binding),
            network_policy=read("networkpolicies", names.network_policy_name(name),
                                self.networking.read_namespaced_network_policy),
        )

    def _observe_live(self, ws: WeightSyncObject) -> Observed:
        ns, name = ws.namespace, ws.name
        raw = self._raw(
            self.core.list_namespaced_pod, ns, label_selector=f"{c.NAME_LABEL}={name}", _preload_content=False
        )
        pods = {p["metadata"]["name"]: observe_pod(p, ws.uid) for p in (raw or {}).get("items", [])}
        return Observed(
            pods=pods,
            service=self._raw(self.core.read_namespaced_service, names.service_name(name), ns, _preload_content=False),
            secret=self._meta_only(self._secret(ns, name)),
            role=self._raw(self.rbac.read_namespaced_role, names.report_role_name(name), ns, _preload_content=False),
            role_binding=self._raw(
                self.rbac.read_namespaced_role_binding, names.report_role_name(name), ns, _preload_content=False
            ),
            network_policy=self._raw(self.networking.read_namespaced_network_policy,
                                     names.network_policy_name(name), ns, _preload_content=False),
        )

    def _secret(self, ns: str, ws: str, missed: bool = False) -> Obj | None:
        """The token Secret's metadata only (PartialObjectMetadata): its data never reaches the operator."""
        if missed:
            metrics.CACHE_MISSES.labels(kind="secrets").inc()
        return self._raw(self.core.read_namespaced_secret, names.secret_name(ws), ns, _preload_content=False,
                         _headers={"Accept": SECRET_METADATA})

    @staticmethod
    def _raw(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Obj | None:
        """Call a read returning the raw JSON (field names as the API server spells them); None on 404."""
        try:
            response = fn(*args, **kwargs)
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        out: Obj = json.loads(response.data)
        return out

    @staticmethod
    def _meta_only(secret: Obj | None) -> Obj | None:
        """Planning needs to know the Secret exists and who owns it, never its data."""
        return None if secret is None else {"metadata": secret.get("metadata", {})}

    # --- writes ---------------------------------------------------------------------------------------

    def _wrote(self) -> None:
        """Called after every write the operator makes (tests/support/crashing_operator.py hooks it)."""
        self.writes += 1

    def write_status(self, ws: Obj, status: Obj) -> None:
        meta = ws["metadata"]
        body = {"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": status}
        try:
            written = self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], body, _content_type=MERGE
            )
        except ApiException as err:
            if err.status in (404, 409):
                if self.weightsyncs is not None:  # read it afresh next time
                    self.weightsyncs.drop(meta["namespace"], meta["name"])
                raise Conflict(f"{meta['namespace']}/{meta['name']}: {err.reason}") from None
            raise
        if self.weightsyncs is not None and isinstance(written, dict):
            self.weightsyncs.put(written)
        self._wrote()

    def apply(self, namespace: str, action: Action) -> bool:
        """Carry out one action; False when it found nothing to do (409 on create, 404 on patch/delete)."""
        try:
            if isinstance(action, Create):
                self._create(namespace, action.obj)
            elif isinstance(action, Patch):
                self._patch(namespace, action)
            else:
                self._delete(namespace, action)
        except ApiException as err:
            if (isinstance(action, Create) and err.status == 409) or (
                not isinstance(action, Create) and err.status in (404, 409)
            ):
                return False
            raise
        finally:
            self._wrote()
        return True

    def dry_run(self, namespace: str, creates: list[Create]) -> list[Rejection]:
        """Each create as a server-side dry run (admission, validation, quota; nothing is stored): the ones
        the API server refuses, with its answer. A 409 (the object exists) is no refusal, except for a pod:
        pods are listed by the group label, so a pod of a member's name that was not listed is someone else's."""
        out = []
        roles = {a.name for a in creates if a.kind == "Role"}
        for action in creates:
            if action.kind == "RoleBinding" and action.obj.get("roleRef", {}).get("name") in roles:
                # RBAC's escalation check reads the bound Role, which a dry run of its create does not store:
                # the binding is checked when it is created, after the Role
                continue
            try:
                self._create(namespace, action.obj, dry_run=True)
            except ApiException as err:
                if err.status == 409:
                    if action.kind == "Pod" and not self._is_member(namespace, action.name):
                        message = (f"a pod named {action.name} exists without this group's labels; "
                                   "delete or rename it")
                        out.append(Rejection(action.kind, action.name, 409, "AlreadyExists", message))
                    continue
                out.append(Rejection(action.kind, action.name, int(err.status or 0), *_api_message(err)))
        return out

    def _is_member(self, namespace: str, pod: str) -> bool:
        """The pod exists with the group's labels (a cache that has not seen our own create yet)."""
        found = self._raw(self.core.read_namespaced_pod, pod, namespace, _preload_content=False)
        return bool(found) and c.NAME_LABEL in ((found or {}).get("metadata", {}).get("labels") or {})

    def _create(self, ns: str, obj: Obj, dry_run: bool = False) -> None:
        kind = obj["kind"]
        creators: dict[str, Callable[..., Any]] = {
            "Pod": self.core.create_namespaced_pod,
            "Service": self.core.create_namespaced_service,
            "Secret": self.core.create_namespaced_secret,
            "Role": self.rbac.create_namespaced_role,
            "RoleBinding": self.rbac.create_namespaced_role_binding,
            "NetworkPolicy": self.networking.create_namespaced_network_policy,
        }
        extra = {"dry_run": "All"} if dry_run else {}
        creators[kind](ns, obj, field_manager=c.OPERATOR_NAME, _preload_content=False, **extra)

    def _patch(self, ns: str, action: Patch) -> None:
        patchers: dict[str, Callable[..., Any]] = {
            "Pod": self.core.patch_namespaced_pod,
            "Service": self.core.patch_namespaced_service,
            "Role": self.rbac.patch_namespaced_role,
            "RoleBinding": self.rbac.patch_namespaced_role_binding,
            "NetworkPolicy": self.networking.patch_namespaced_network_policy,
        }
        patchers[action.kind](
            action.name,
            ns,
            action.patch,
            field_manager=c.OPERATOR_NAME,
            _content_type=MERGE,
            _preload_content=False,
        )

    def _delete(self, ns: str, action: Delete) -> None:
        assert action.kind == "Pod", action
        body = client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=action.uid))
        self.core.delete_namespaced_pod(action.name, ns, body=body, _preload_content=False)

    def post_event(self, ws: Obj, event: Event, now: datetime) -> None:
        """A core/v1 Event on the WeightSync (best effort: a failure is logged, never raised)."""
        meta = ws["metadata"]
        stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": ws["apiVersion"],
                "kind": ws["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "type": event.type,
            "reason": event.reason,
            "message": event.message[:1000],
            "source": {"component": c.OPERATOR_NAME},
            "reportingComponent": c.OPERATOR_NAME,
            "reportingInstance": os.environ.get("HOSTNAME", c.OPERATOR_NAME),
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            self.core.create_namespaced_event(meta["namespace"], cast(Any, body), _preload_content=False)
        except ApiException as err:
            log.warning("could not post event %s on %s/%s: %s", event.reason, meta["namespace"], meta["name"], err)


def _api_message(err: ApiException) -> tuple[str, str]:
    """(reason, message) of an API server error: its Status object's, which names the field at fault."""
    try:
        body = json.loads(err.body or "{}")
    except (TypeError, ValueError):
        body = {}
    if not isinstance(body, dict):
        body = {}
    reason = str(body.get("reason") or err.reason or "")
    message = str(body.get("message") or err.reason or f"HTTP {err.status}")
    return reason, message[:2000]


def api_error_text(err: ApiException) -> str:
    reason, message = _api_message(err)
    return f"HTTP {err.status} {reason}: {message}"
