"""The name of every child the operator makes, derived from the WeightSync's name.

Pure: no kopf, no client.
"""

from __future__ import annotations


def service_name(ws: str) -> str:
    """The headless Service: `<ws>`."""
    return ws


def secret_name(ws: str) -> str:
    """The Secret holding the group token: `<ws>-token`."""
    return f"{ws}-token"


def trainer_pod_name(ws: str, index: int = 0) -> str:
    """Trainer pod `index` of the trainer's job; pod 0 holds the sync group's rank 0."""
    return f"{ws}-trainer-{index}"


def inference_pod_name(ws: str, replica: int) -> str:
    return f"{ws}-inference-{replica}"


def network_policy_name(ws: str) -> str:
    """The NetworkPolicy of the group's pods: `<ws>`."""
    return ws


def report_role_name(ws: str) -> str:
    """Role (and RoleBinding) letting the trainer patch its own pod with its sync report."""
    return f"{ws}-trainer-report"


def pod_dns(ws: str, namespace: str, pod: str) -> str:
    """A member's DNS name under the headless Service (hostname = pod name, subdomain = Service)."""
    return f"{pod}.{service_name(ws)}.{namespace}.svc.cluster.local"
