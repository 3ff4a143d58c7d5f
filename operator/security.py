"""Member pods under the restricted Pod Security Standard, except exactly what the spec asks for.

Pure. What the template leaves unset is filled in as the `restricted` profile requires: the pod runs as
non-root with the runtime's default seccomp profile; every container (init containers too) drops all
capabilities and cannot gain privileges. What the spec asks for is granted and nothing more:
`network.hostNetwork` (set by desired.pod) and, with `network.rdmaResource`, the IPC_LOCK capability on the
containers that get the RDMA device (RDMA registers pinned memory). A value the template sets is kept:
an image that must run as root needs `runAsUser`/`runAsNonRoot` set in the template, and then a namespace
that admits it.
"""

from __future__ import annotations

from typing import Any

Obj = dict[str, Any]
RDMA_CAPABILITY = "IPC_LOCK"


def _sets_resource(container: Obj, resource: str) -> bool:
    resources = container.get("resources") or {}
    return any(resource in (resources.get(kind) or {}) for kind in ("limits", "requests"))


def harden(pod_spec: Obj, rdma_resource: str | None) -> None:
    """Fill in the restricted profile where `pod_spec` (a pod's spec, changed in place) is silent."""
    pod_context = pod_spec["securityContext"] = dict(pod_spec.get("securityContext") or {})
    pod_context.setdefault("runAsNonRoot", True)
    pod_context.setdefault("seccompProfile", {"type": "RuntimeDefault"})
    for container in [*(pod_spec.get("initContainers") or []), *pod_spec["containers"]]:
        context = container["securityContext"] = dict(container.get("securityContext") or {})
        context.setdefault("allowPrivilegeEscalation", False)
        capabilities = context["capabilities"] = dict(context.get("capabilities") or {})
        capabilities.setdefault("drop", ["ALL"])
        if rdma_resource and _sets_resource(container, rdma_resource):
            added = list(capabilities.get("add") or [])
            if RDMA_CAPABILITY not in added:
                capabilities["add"] = [*added, RDMA_CAPABILITY]
