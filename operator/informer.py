"""Watches of the operator's children, kept as in-memory caches: list once, then follow the watch stream.

Each `Informer` is one list+watch of one kind (pods, services, secrets, roles, rolebindings or
networkpolicies), with the
operator's label selector applied by the API server (`app.kubernetes.io/managed-by=weightsync-operator`),
in every namespace or in each watched one. It holds the objects as the API server spells them, calls
`on_change(namespace, group)` for every added, changed or deleted object of a group, and re-lists after a
410 Gone or any broken stream (with a bounded backoff). Secrets are watched as metadata only
(PartialObjectMetadata): the operator never receives a Secret's data.

Why the cache can be stale, and why that is safe: after its own writes the operator may plan from a cache
that has not seen them yet. A create answered 409, and a patch or delete answered 404, are successes
(`kube.py`); a child missing from the cache is read from the API server before it is created again; the
status is written with the WeightSync's resourceVersion as a precondition. So a stale read costs a request,
never a wrong action.

The informers run in daemon threads with the blocking Kubernetes client; `ready()` says whether every one
has finished its first list (reconciles read through to the API server until then).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from . import constants as c

log = logging.getLogger("weightsync.operator.informer")

Obj = dict[str, Any]
OnChange = Callable[[str, str], None]
#: The API server ends a watch after this many seconds (the informer then re-watches from where it was).
WATCH_SECONDS = 300
#: Backoff after a failed list or a broken watch: first and longest delay.
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 30.0
METADATA_ONLY = "application/json;as=PartialObjectMetadataList;v=v1;g=meta.k8s.io,application/json"
METADATA_ONLY_WATCH = "application/json;as=PartialObjectMetadata;v=v1;g=meta.k8s.io,application/json"
SELECTOR = f"{c.MANAGED_BY_LABEL}={c.OPERATOR_NAME},{c.NAME_LABEL}"


class Gone(Exception):
    """The watch's resourceVersion is too old: list again."""


class Informer(threading.Thread):
    def __init__(
        self,
        kind: str,
        list_fn: Callable[..., Any],
        namespace: str | None,
        on_change: OnChange,
        metadata_only: bool = False,
    ) -> None:
        super().__init__(name=f"informer-{kind}-{namespace or 'all'}", daemon=True)
        self.kind = kind
        self.list_fn = list_fn
        self.namespace = namespace
        self.on_change = on_change
        self.metadata_only = metadata_only
        self.objects: dict[tuple[str, str], Obj] = {}
        self.lock = threading.Lock()
        self.listed = threading.Event()
        self.stopping = threading.Event()
        self.lists = 0  # for the benchmark and the tests
        self.watches = 0

    # --- reading ----------------------------------------------------------------------------------------

    def get(self, namespace: str, name: str) -> Obj | None:
        with self.lock:
            return self.objects.get((namespace, name))

    def of_group(self, namespace: str, group: str) -> list[Obj]:
        with self.lock:
            return [
                o
                for (ns, _), o in self.objects.items()
                if ns == namespace and (o.get("metadata", {}).get("labels") or {}).get(c.NAME_LABEL) == group
            ]

    # --- the loop ---------------------------------------------------------------------------------------

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        delay = RETRY_FIRST_S
        while not self.stopping.is_set():
            try:
                version = self._list()
                delay = RETRY_FIRST_S
                while not self.stopping.is_set():
                    version = self._watch(version)
            except Gone:
                log.info("%s: watch expired; listing again", self.name)
            except Exception as err:  # a broken stream, an API server restart: list again after a pause
                log.warning("%s: %s; listing again in %.1fs", self.name, err, delay)
                self.stopping.wait(delay)
                delay = min(RETRY_MAX_S, delay * 2)

    def _call(self, **kwargs: Any) -> Any:
        if self.namespace is not None:
            kwargs["namespace"] = self.namespace
        if self.metadata_only:
            kwargs["_headers"] = {"Accept": METADATA_ONLY_WATCH if kwargs.get("watch") else METADATA_ONLY}
        return self.list_fn(label_selector=SELECTOR, _preload_content=False, **kwargs)

    def _list(self) -> str:
        response = self._call(_request_timeout=60)
        body = json.loads(response.data)
        self.lists += 1
        fresh = {_key(o): _strip(o) for o in body.get("items") or []}
        with self.lock:
            old, self.objects = self.objects, fresh
        self.listed.set()
        for key in sorted(set(old) | set(fresh)):
            if old.get(key) != fresh.get(key):
                self._changed(old.get(key) or fresh[key])
        return str(body.get("metadata", {}).get("resourceVersion") or "")

    def _watch(self, version: str) -> str:
        self.watches += 1
        response = self._call(
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=WATCH_SECONDS,
            _request_timeout=(10, WATCH_SECONDS + 30),
        )
        try:
            for event in _lines(response):
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone()
                    raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                version = str(obj.get("metadata", {}).get("resourceVersion") or version)
                if kind == "BOOKMARK":
                    continue
                key = _key(obj)
                with self.lock:
                    if kind == "DELETED":
                        self.objects.pop(key, None)
                    else:
                        self.objects[key] = _strip(obj)
                self._changed(obj)
                if self.stopping.is_set():
                    break
        finally:
            response.release_conn()
        return version

    def _changed(self, obj: Obj) -> None:
        meta = obj.get("metadata", {})
        group = (meta.get("labels") or {}).get(c.NAME_LABEL)
        if group:
            try:
                self.on_change(meta.get("namespace", ""), group)
            except Exception:
                log.exception("%s: on_change failed", self.name)


def _key(obj: Obj) -> tuple[str, str]:
    meta = obj.get("metadata", {})
    return meta.get("namespace", ""), meta.get("name", "")


def _strip(obj: Obj) -> Obj:
    """What planning reads; managed fields are large and unused."""
    meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k != "managedFields"}
    return {**{k: v for k, v in obj.items() if k not in ("data", "stringData")}, "metadata": meta}


def _lines(response: Any) -> Iterator[Obj]:
    """The watch stream's JSON lines, as they arrive."""
    pending = b""
    for chunk in response.stream(amt=64 * 1024, decode_content=True):
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            if line.strip():
                yield json.loads(line)


def informers(api: client.ApiClient, namespaces: list[str], on_change: OnChange) -> dict[str, list[Informer]]:
    """One informer per kind and namespace (or per kind, cluster-wide, when `namespaces` is empty)."""
    core, rbac, networking = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api), client.NetworkingV1Api(api)
    kinds: dict[str, tuple[Callable[..., Any], Callable[..., Any], bool]] = {
        "pods": (core.list_namespaced_pod, core.list_pod_for_all_namespaces, False),
        "services": (core.list_namespaced_service, core.list_service_for_all_namespaces, False),
        "secrets": (core.list_namespaced_secret, core.list_secret_for_all_namespaces, True),
        "roles": (rbac.list_namespaced_role, rbac.list_role_for_all_namespaces, False),
        "rolebindings": (rbac.list_namespaced_role_binding, rbac.list_role_binding_for_all_namespaces, False),
        "networkpolicies": (networking.list_namespaced_network_policy,
                            networking.list_network_policy_for_all_namespaces, False),
    }
    out: dict[str, list[Informer]] = {}
    for kind, (namespaced, everywhere, metadata_only) in kinds.items():
        if namespaces:
            out[kind] = [Informer(kind, namespaced, ns, on_change, metadata_only) for ns in namespaces]
        else:
            out[kind] = [Informer(kind, everywhere, None, on_change, metadata_only)]
    return out


class Children:
    """The informers of every kind, read as one cache."""

    def __init__(self, by_kind: dict[str, list[Informer]]) -> None:
        self.by_kind = by_kind

    def start(self) -> None:
        for group in self.by_kind.values():
            for informer in group:
                informer.start()

    def stop(self) -> None:
        for group in self.by_kind.values():
            for informer in group:
                informer.stop()

    def ready(self) -> bool:
        return all(i.listed.is_set() for group in self.by_kind.values() for i in group)

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for group in self.by_kind.values():
            for informer in group:
                if not informer.listed.wait(max(0.0, deadline - time.monotonic())):
                    return False
        return True

    def _for(self, kind: str, namespace: str) -> Informer:
        group = self.by_kind[kind]
        return next((i for i in group if i.namespace in (None, namespace)), group[0])

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        return self._for(kind, namespace).get(namespace, name)

    def of_group(self, kind: str, namespace: str, group: str) -> list[Obj]:
        return self._for(kind, namespace).of_group(namespace, group)
