"""Materialises a pod's volumes as directories under the pod's state directory.

emptyDir, hostPath, secret, configMap, downwardAPI and projected (serviceAccountToken, configMap, secret,
downwardAPI) are supported. Files are replaced atomically (write, then rename inside the volume
directory), so a process that reads them sees old or new content, never half a file; the launcher
bind-mounts the directory, so a rename is visible in the pod at once.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from weightsync.sandbox.kubeclient import ApiError, KubeClient
from weightsync.sandbox.podspec import ConfigError, Obj, downward_files, keyed_files

DEFAULT_TOKEN_SECONDS = 3607


@dataclass
class VolumeSet:
    """The volumes of one pod: where each lives on the host and when its token must be renewed."""

    root: Path
    sources: dict[str, Path] = field(default_factory=dict)
    token_renew_at: float = 0.0
    metadata_key: str = ""


def lookup(client: KubeClient, kind: str, namespace: str, name: str) -> Obj | None:
    """A Secret or ConfigMap, or None when it does not exist."""
    plural = {"Secret": "secrets", "ConfigMap": "configmaps"}[kind]
    try:
        return client.get(f"/api/v1/namespaces/{namespace}/{plural}/{name}")
    except ApiError as e:
        if e.status == 404:
            return None
        raise


def _write_files(directory: Path, files: dict[str, str], mode: int, prune: bool = True) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        target = directory / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            if target.read_text() == content:
                continue
        except OSError:
            pass
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(content)
        tmp.chmod(mode)
        os.replace(tmp, target)
    if not prune:
        return
    wanted = {directory / rel for rel in files}
    for existing in directory.rglob("*"):
        if existing.is_file() and existing not in wanted and not existing.name.startswith(".."):
            existing.unlink()


def _token(client: KubeClient, pod: Obj, source: Obj) -> tuple[str, float]:
    meta, spec = pod["metadata"], pod["spec"]
    seconds = int(source.get("expirationSeconds", DEFAULT_TOKEN_SECONDS))
    request: dict[str, Any] = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "expirationSeconds": seconds,
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]},
        },
    }
    if source.get("audience"):
        request["spec"]["audiences"] = [source["audience"]]
    sa = spec.get("serviceAccountName") or "default"
    answer = client.post(f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{sa}/token", request)
    expires = datetime.fromisoformat(answer["status"]["expirationTimestamp"].replace("Z", "+00:00"))
    lifetime = max(expires.timestamp() - time.time(), 60.0)
    return answer["status"]["token"], time.monotonic() + 0.8 * lifetime


def _keyed(client: KubeClient, kind: str, namespace: str, ref: Obj) -> dict[str, str]:
    """The files of a Secret or ConfigMap volume source (`ref` names it: secretName or name)."""
    name, items, optional = ref.get("secretName") or ref["name"], ref.get("items"), bool(ref.get("optional"))
    obj = lookup(client, kind, namespace, name)
    if obj is None:
        if optional:
            return {}
        raise ConfigError(f"volume source {kind} {namespace}/{name} not found")
    files: dict[str, str] = keyed_files(obj, items)
    return files


def _projected_files(
    client: KubeClient, pod: Obj, containers: dict[str, Obj], volume: Obj, renew: list[float]
) -> dict[str, str]:
    namespace = pod["metadata"]["namespace"]
    files: dict[str, str] = {}
    for source in volume["projected"].get("sources", []):
        if "serviceAccountToken" in source:
            token, renew_at = _token(client, pod, source["serviceAccountToken"])
            files[source["serviceAccountToken"]["path"]] = token
            renew.append(renew_at)
        elif "configMap" in source:
            ref = source["configMap"]
            files.update(_keyed(client, "ConfigMap", namespace, ref))
        elif "secret" in source:
            ref = source["secret"]
            files.update(_keyed(client, "Secret", namespace, ref))
        elif "downwardAPI" in source:
            files.update(downward_files(pod, containers, source["downwardAPI"].get("items", [])))
    return files


def metadata_key(pod: Obj) -> str:
    meta = pod["metadata"]
    return repr((sorted((meta.get("labels") or {}).items()), sorted((meta.get("annotations") or {}).items())))


def sync_volumes(client: KubeClient, pod: Obj, vols: VolumeSet, full: bool) -> None:
    """Writes every volume's files (`full`), or only the downward-API ones when labels/annotations changed."""
    namespace = pod["metadata"]["namespace"]
    containers = {c["name"]: c for c in [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]}
    renew: list[float] = []
    vols.metadata_key = metadata_key(pod)
    for volume in pod["spec"].get("volumes", []):
        name = volume["name"]
        if "hostPath" in volume:
            vols.sources[name] = Path(volume["hostPath"]["path"])
            if volume["hostPath"].get("type") in ("DirectoryOrCreate",):
                vols.sources[name].mkdir(parents=True, exist_ok=True)
            continue
        directory = vols.root / name
        vols.sources[name] = directory
        if "emptyDir" in volume:
            directory.mkdir(parents=True, exist_ok=True)
            continue
        has_downward = "downwardAPI" in volume or (
            "projected" in volume and any("downwardAPI" in s for s in volume["projected"].get("sources", []))
        )
        if not full and not has_downward:
            continue
        mode = 0o644
        if "downwardAPI" in volume:
            mode = volume["downwardAPI"].get("defaultMode", mode)
            files = downward_files(pod, containers, volume["downwardAPI"].get("items", []))
        elif "secret" in volume:
            ref = volume["secret"]
            mode = ref.get("defaultMode", mode)
            files = _keyed(client, "Secret", namespace, ref)
        elif "configMap" in volume:
            ref = volume["configMap"]
            mode = ref.get("defaultMode", mode)
            files = _keyed(client, "ConfigMap", namespace, ref)
        elif "projected" in volume:
            mode = volume["projected"].get("defaultMode", mode)
            if not full:  # only its downward-API files; the token and keys wait for the full pass
                partial = [s["downwardAPI"] for s in volume["projected"]["sources"] if "downwardAPI" in s]
                files = {
                    k: v for d in partial for k, v in downward_files(pod, containers, d["items"]).items()
                }
                _write_files(directory, files, mode, prune=False)
                continue
            files = _projected_files(client, pod, containers, volume, renew)
        else:
            raise ConfigError(f"volume {name!r}: unsupported type {sorted(k for k in volume if k != 'name')}")
        _write_files(directory, files, mode)
    if full:
        vols.token_renew_at = min(renew) if renew else float("inf")


def mounts_for(container: Obj, vols: VolumeSet) -> list[dict[str, Any]]:
    """The bind mounts of one container: volume (or its subPath) -> mountPath."""
    mounts = []
    for m in container.get("volumeMounts", []):
        if m["name"] not in vols.sources:
            raise ConfigError(f"container {container['name']!r} mounts unknown volume {m['name']!r}")
        source = vols.sources[m["name"]]
        if m.get("subPath"):
            source = source / m["subPath"]
            if not source.exists():
                source.mkdir(parents=True)
        mounts.append({"source": str(source), "target": m["mountPath"], "readOnly": bool(m.get("readOnly"))})
    return mounts


def remove(vols: VolumeSet) -> None:
    shutil.rmtree(vols.root, ignore_errors=True)
