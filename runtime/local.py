"""A sync group of local processes: the contract of a trainer and its inference workers on one machine.

For trying a loader or a benchmark without a cluster: every member is a real process talking over loopback
(gloo) or NVLink (NCCL); `group_envs` gives each its `MemberEnv`, as the operator would inject it.
"""

from __future__ import annotations

import secrets
from typing import Any

from weightsync.contract import MemberEnv
from weightsync.ports import free_port

__all__ = ["free_port", "group_envs", "vllm_trainer_env"]


def group_envs(replicas: int, workers_per_replica: int, *, backend: str = "gloo", port: int | None = None,
               timeout: float = 30.0, **overrides: Any) -> list[MemberEnv]:
    """The contract of a trainer plus `replicas` inference pods, all on this machine."""
    world = 1 + replicas * workers_per_replica
    common = {"name": "local", "namespace": "default", "master_addr": "127.0.0.1",
              "master_port": port or free_port(), "world_size": world, "backend": backend,
              "token": secrets.token_hex(16), "timeout_seconds": timeout,
              "annotations_file": "/nonexistent/weightsync-annotations", **overrides}
    envs = [MemberEnv(role="trainer", rank_offset=0, local_world_size=1, **common)]
    for r in range(replicas):
        envs.append(MemberEnv(role="inference", rank_offset=1 + r * workers_per_replica,
                              local_world_size=workers_per_replica, **common))
    return envs


def vllm_trainer_env(engine_urls: list[str] | tuple[str, ...], workers_per_server: int, *, backend: str = "gloo",
                     port: int | None = None, timeout: float = 30.0, **overrides: Any) -> MemberEnv:
    """The contract of a trainer driving vLLM servers at `engine_urls` (protocol `vllm`), all on this
    machine: world size 1 + servers x `workers_per_server`, the TCP store (gloo, or NCCL's TCP-store form)
    on a free local port."""
    fields: dict[str, Any] = {
        "role": "trainer", "rank_offset": 0, "local_world_size": 1, "name": "local", "namespace": "default",
        "master_addr": "127.0.0.1", "master_port": port or free_port(), "protocol": "vllm", "backend": backend,
        "world_size": 1 + len(engine_urls) * workers_per_server, "token": secrets.token_hex(16),
        "timeout_seconds": timeout, "engine_urls": tuple(engine_urls),
        "annotations_file": "/nonexistent/weightsync-annotations"}
    return MemberEnv(**{**fields, **overrides})
