"""Pure pod-spec logic of the node agent: env resolution, field paths, downward-API files, hosts files.

Everything here takes API objects as plain dicts (the API's JSON) and returns data; no I/O.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

Obj = dict[str, Any]
# (kind "Secret" | "ConfigMap", namespace, name) -> the object, or None when it does not exist.
Lookup = Callable[[str, str, str], Obj | None]

CLUSTER_DOMAIN = "cluster.local"


class ConfigError(ValueError):
    """The container cannot be configured (missing Secret key, bad field path): CreateContainerConfigError."""


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: known names are replaced, unknown ones kept verbatim, `$$` means `$`."""

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _VAR_REF.sub(repl, text)


_SUBSCRIPT = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def field_value(pod: Obj, path: str) -> str:
    """The value of a downward-API fieldRef path (metadata.name, status.podIP, metadata.labels['k'], ...)."""
    meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
    m = _SUBSCRIPT.match(path)
    if m:
        return str(meta.get(m.group(1), {}).get(m.group(2), ""))
    simple: dict[str, Callable[[], Any]] = {
        "metadata.name": lambda: meta.get("name", ""),
        "metadata.namespace": lambda: meta.get("namespace", ""),
        "metadata.uid": lambda: meta.get("uid", ""),
        "metadata.labels": lambda: format_map(meta.get("labels", {})),
        "metadata.annotations": lambda: format_map(meta.get("annotations", {})),
        "spec.nodeName": lambda: spec.get("nodeName", ""),
        "spec.serviceAccountName": lambda: spec.get("serviceAccountName", ""),
        "status.hostIP": lambda: status.get("hostIP", ""),
        "status.hostIPs": lambda: ",".join(a["ip"] for a in status.get("hostIPs", [])),
        "status.podIP": lambda: status.get("podIP", ""),
        "status.podIPs": lambda: ",".join(a["ip"] for a in status.get("podIPs", [])),
    }
    if path not in simple:
        raise ConfigError(f"unsupported fieldRef.fieldPath {path!r}")
    return str(simple[path]())


def format_map(values: Mapping[str, str]) -> str:
    """The downward API's labels/annotations file format: `key="value"` lines, sorted, Go-quoted values."""
    return "\n".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in sorted(values.items()))


def resource_value(container: Obj, ref: Obj) -> str:
    """A resourceFieldRef (limits.cpu, requests.memory, ...) in the given divisor's units (default 1)."""
    section, _, name = ref["resource"].partition(".")
    raw = container.get("resources", {}).get(section, {}).get(name)
    if raw is None:
        return "0"
    return str(raw)


def _source_data(obj: Obj) -> dict[str, str]:
    """The string data of a Secret (base64-decoded) or ConfigMap."""
    if obj.get("kind") == "Secret" or "type" in obj:
        data = {k: base64.b64decode(v).decode(errors="replace") for k, v in (obj.get("data") or {}).items()}
        data.update(obj.get("stringData") or {})
        return data
    return dict(obj.get("data") or {})


def _key_ref(kind: str, ref: Obj, namespace: str, lookup: Lookup, var: str) -> str | None:
    obj = lookup(kind, namespace, ref["name"])
    optional = bool(ref.get("optional", False))
    if obj is None:
        if optional:
            return None
        raise ConfigError(f"env {var}: {kind} {namespace}/{ref['name']} not found")
    data = _source_data(obj)
    if ref["key"] not in data:
        if optional:
            return None
        raise ConfigError(f"env {var}: key {ref['key']!r} not found in {kind} {namespace}/{ref['name']}")
    return data[ref["key"]]


def resolve_env(pod: Obj, container: Obj, base: Mapping[str, str], lookup: Lookup) -> dict[str, str]:
    """The container's environment as a kubelet builds it: `base`, then envFrom, then env (in order)."""
    namespace = pod["metadata"]["namespace"]
    env = dict(base)
    for source in container.get("envFrom", []):
        prefix = source.get("prefix", "")
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if key not in source:
                continue
            ref = source[key]
            obj = lookup(kind, namespace, ref["name"])
            if obj is None:
                if ref.get("optional"):
                    continue
                raise ConfigError(f"envFrom: {kind} {namespace}/{ref['name']} not found")
            for k, v in _source_data(obj).items():
                env[prefix + k] = v
    for var in container.get("env", []):
        name = var["name"]
        if "valueFrom" not in var:
            env[name] = expand(var.get("value", ""), env)
            continue
        source = var["valueFrom"]
        value: str | None
        if "fieldRef" in source:
            try:
                value = field_value(pod, source["fieldRef"]["fieldPath"])
            except ConfigError as e:
                raise ConfigError(f"env {name}: {e}") from None
        elif "resourceFieldRef" in source:
            value = resource_value(container, source["resourceFieldRef"])
        elif "secretKeyRef" in source:
            value = _key_ref("Secret", source["secretKeyRef"], namespace, lookup, name)
        elif "configMapKeyRef" in source:
            value = _key_ref("ConfigMap", source["configMapKeyRef"], namespace, lookup, name)
        else:
            raise ConfigError(f"env {name}: unsupported valueFrom {sorted(source)}")
        if value is not None:
            env[name] = value
    return env


def command_line(container: Obj, env: Mapping[str, str]) -> list[str]:
    """command + args with $(VAR) expanded; images are ignored, so a container must name its command."""
    argv = [expand(a, env) for a in [*container.get("command", []), *container.get("args", [])]]
    if not container.get("command"):
        raise ConfigError(
            f"container {container['name']!r} has no command: the sandbox ignores images, so the pod spec "
            "must say what to run"
        )
    return argv


def downward_files(pod: Obj, container_lookup: Mapping[str, Obj], items: Iterable[Obj]) -> dict[str, str]:
    """The files of a downwardAPI volume (or projection): relative path -> content."""
    files: dict[str, str] = {}
    for item in items:
        if "fieldRef" in item:
            files[item["path"]] = field_value(pod, item["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in item:
            ref = item["resourceFieldRef"]
            files[item["path"]] = resource_value(container_lookup.get(ref.get("containerName", ""), {}), ref)
    return files


def keyed_files(obj: Obj, items: list[Obj] | None) -> dict[str, str]:
    """The files of a Secret/ConfigMap volume: every key, or only `items` (key -> path)."""
    data = _source_data(obj)
    if not items:
        return data
    return {item["path"]: data[item["key"]] for item in items if item["key"] in data}


# -- names and hosts --------------------------------------------------------------------------------------


def pod_hostname(pod: Obj) -> str:
    return str(pod.get("spec", {}).get("hostname") or pod["metadata"]["name"])[:63]


def is_ready(pod: Obj) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _selects(selector: Mapping[str, str], pod: Obj) -> bool:
    labels = pod.get("metadata", {}).get("labels", {}) or {}
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _forms(name: str, namespace: str, same_namespace: bool) -> list[str]:
    """The names a record answers to: fully qualified first, then the search-path short forms."""
    forms = [f"{name}.{namespace}.svc.{CLUSTER_DOMAIN}", f"{name}.{namespace}.svc", f"{name}.{namespace}"]
    return [*forms, name] if same_namespace else forms


def render_hosts(pod: Obj, pods: Iterable[Obj], services: Iterable[Obj], api_ip: str) -> str:
    """The /etc/hosts of `pod`: itself, the API server, pods under headless Services, Services' endpoints.

    A pod with hostname h and subdomain s in namespace n answers to h.s.n.svc.cluster.local (and the
    shorter forms) when a Service s exists in n, as cluster DNS does. A Service answers with the addresses
    of the pods it selects that are Ready, or all of them with publishNotReadyAddresses. There is no
    kube-proxy: a ClusterIP Service name also resolves to a pod address, so its port must equal targetPort.
    """
    return hosts_text(pod, cluster_entries(pod["metadata"]["namespace"], pods, services), api_ip)


def hosts_text(pod: Obj, entries: Iterable[tuple[str, str]], api_ip: str) -> str:
    """`pod`'s hosts file from the `cluster_entries` of its namespace (its own entry among them is left out:
    its own line comes first, with every form of its name)."""
    meta = pod["metadata"]
    namespace = meta["namespace"]
    lines = [
        "# Managed by the weightsync sandbox node agent: this pod's view of cluster DNS.",
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
    ]
    own_ip = pod.get("status", {}).get("podIP", "")
    hostname = pod_hostname(pod)
    subdomain = pod.get("spec", {}).get("subdomain")
    if own_ip:
        if subdomain:
            fq = f"{hostname}.{subdomain}.{namespace}.svc.{CLUSTER_DOMAIN}"
            lines.append(
                f"{own_ip}\t{fq} {hostname}.{subdomain}.{namespace}.svc "
                f"{hostname}.{subdomain}.{namespace} {hostname}.{subdomain} {hostname}"
            )
        else:
            lines.append(f"{own_ip}\t{hostname}")
    lines.append(f"{api_ip}\t{' '.join(_forms('kubernetes', 'default', namespace == 'default'))}")
    for alias in pod.get("spec", {}).get("hostAliases") or []:
        lines.append(f"{alias['ip']}\t{' '.join(alias.get('hostnames', []))}")
    own_uid = meta.get("uid")
    lines += [line for uid, line in entries if not uid or uid != own_uid]
    return "\n".join(lines) + "\n"


def cluster_entries(namespace: str, pods: Iterable[Obj], services: Iterable[Obj]) -> list[tuple[str, str]]:
    """What cluster DNS answers a pod of `namespace`, as (uid of the pod a name belongs to, or "" for a
    Service's, hosts line): the same for every pod of the namespace, so the node agent renders it once per
    change and namespace, not once per pod."""
    services = list(services)
    pods = [
        p
        for p in pods
        if p.get("status", {}).get("podIP")
        and not p["metadata"].get("deletionTimestamp")
        and p.get("status", {}).get("phase") not in ("Succeeded", "Failed")  # finished pods have no address
    ]
    service_names = {(s["metadata"]["namespace"], s["metadata"]["name"]) for s in services}
    entries: list[tuple[str, str]] = []
    for other in sorted(pods, key=lambda p: (p["metadata"]["namespace"], p["metadata"]["name"])):
        ometa, ospec = other["metadata"], other.get("spec", {})
        sub = ospec.get("subdomain")
        if not sub or (ometa["namespace"], sub) not in service_names:
            continue
        name = f"{pod_hostname(other)}.{sub}"
        entries.append((str(ometa.get("uid") or ""),
                        f"{other['status']['podIP']}\t"
                        + " ".join(_forms(name, ometa["namespace"], ometa["namespace"] == namespace))))
    by_namespace: dict[str, list[Obj]] = {}
    for member in pods:
        by_namespace.setdefault(member["metadata"]["namespace"], []).append(member)
    for svc in sorted(services, key=lambda s: (s["metadata"]["namespace"], s["metadata"]["name"])):
        smeta, sspec = svc["metadata"], svc.get("spec", {})
        if sspec.get("type") == "ExternalName":
            continue
        publish_all = bool(sspec.get("publishNotReadyAddresses"))
        names = " ".join(_forms(smeta["name"], smeta["namespace"], smeta["namespace"] == namespace))
        for member in by_namespace.get(smeta["namespace"], []):
            if _selects(sspec.get("selector") or {}, member) and (publish_all or is_ready(member)):
                entries.append(("", f"{member['status']['podIP']}\t{names}"))
    return entries


def hosts_view(pod: Obj) -> tuple[object, ...]:
    """What of a pod any hosts file depends on: a change elsewhere (an annotation, a container's restart
    count) changes no hosts file."""
    meta, spec, status = pod["metadata"], pod.get("spec", {}), pod.get("status", {})
    return (meta.get("namespace"), meta.get("name"), meta.get("uid"), bool(meta.get("deletionTimestamp")),
            tuple(sorted((meta.get("labels") or {}).items())), spec.get("hostname"), spec.get("subdomain"),
            status.get("podIP"), status.get("phase"), is_ready(pod))


def resolv_conf(namespace: str) -> str:
    """A resolv.conf with the cluster search path and no reachable nameserver: names come from /etc/hosts."""
    search = f"{namespace}.svc.{CLUSTER_DOMAIN} svc.{CLUSTER_DOMAIN} {CLUSTER_DOMAIN}"
    return (
        f"# weightsync sandbox: cluster names are in /etc/hosts\nnameserver 127.0.0.1\nsearch {search}\n"
        "options ndots:5 timeout:1 attempts:1\n"
    )
