"""The Node object and its Lease: registration and heartbeats, as a kubelet does them."""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime
from typing import Any

from weightsync.sandbox import gpus
from weightsync.sandbox.kubeclient import ApiError, KubeClient
from weightsync.sandbox.podspec import Obj

KUBELET_VERSION = os.environ.get("WEIGHTSYNC_K8S_VERSION", "v1.37.2")
LEASE_SECONDS = 40


def capacity() -> dict[str, str]:
    """Advertised (not enforced) capacity; nvidia.com/gpu is the real count where there are GPUs."""
    return {
        "cpu": os.environ.get("WEIGHTSYNC_SANDBOX_NODE_CPU", "32"),
        "memory": os.environ.get("WEIGHTSYNC_SANDBOX_NODE_MEMORY", "128Gi"),
        "pods": os.environ.get("WEIGHTSYNC_SANDBOX_NODE_PODS", "110"),
        "ephemeral-storage": "100Gi",
        "nvidia.com/gpu": os.environ.get("WEIGHTSYNC_SANDBOX_NODE_GPUS") or str(gpus.detect() or 8),
    }


def node_object(name: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "node.kubernetes.io/instance-type": "weightsync-sandbox",
            },
        },
        "spec": {},
    }


def node_status(address: str, kubelet_port: int, ready: bool = True) -> Obj:
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def cond(ctype: str, status: str, reason: str, message: str) -> dict[str, Any]:
        return {
            "type": ctype,
            "status": status,
            "reason": reason,
            "message": message,
            "lastHeartbeatTime": now,
            "lastTransitionTime": now,
        }

    caps = capacity()
    uname = platform.uname()
    return {
        "capacity": caps,
        "allocatable": caps,
        "conditions": [
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "sandbox"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "sandbox"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID", "sandbox"),
            cond(
                "Ready",
                "True" if ready else "False",
                "KubeletReady" if ready else "KubeletNotReady",
                "weightsync sandbox node agent is posting ready status",
            ),
        ],
        "addresses": [{"type": "InternalIP", "address": address}, {"type": "Hostname", "address": address}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port}},
        "nodeInfo": {
            "machineID": "",
            "systemUUID": "",
            "bootID": "",
            "kernelVersion": uname.release,
            "osImage": "weightsync sandbox (pods are local processes)",
            "operatingSystem": "linux",
            "architecture": "amd64",
            "containerRuntimeVersion": "weightsync-sandbox://0.1.0",
            "kubeletVersion": KUBELET_VERSION,
            "kubeProxyVersion": "",
        },
    }


def _keep_transition_times(new: Obj, old: Obj) -> None:
    previous = {c["type"]: c for c in old.get("conditions", [])}
    for c in new["conditions"]:
        p = previous.get(c["type"])
        if p and p.get("status") == c["status"]:
            c["lastTransitionTime"] = p["lastTransitionTime"]


def register(client: KubeClient, name: str, address: str, kubelet_port: int) -> None:
    """Creates the Node when missing, then posts its status (Ready)."""
    try:
        client.post("/api/v1/nodes", node_object(name))
    except ApiError as e:
        if e.status != 409:
            raise
    heartbeat(client, name, address, kubelet_port)


def heartbeat(client: KubeClient, name: str, address: str, kubelet_port: int) -> None:
    """Posts the node status (heartbeat times) and renews the node's Lease."""
    status = node_status(address, kubelet_port)
    _keep_transition_times(status, client.get(f"/api/v1/nodes/{name}").get("status", {}))
    client.merge_patch(f"/api/v1/nodes/{name}/status", {"status": status})
    renew = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    path = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"
    try:
        client.merge_patch(f"{path}/{name}", {"spec": {"holderIdentity": name, "renewTime": renew}})
    except ApiError as e:
        if e.status != 404:
            raise
        client.post(
            path,
            {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": name, "namespace": "kube-node-lease"},
                "spec": {"holderIdentity": name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": renew},
            },
        )
