"""GPUs for pods: what a device plugin would do, on a machine that has NVIDIA GPUs.

Where the machine has GPUs, the node advertises their real number as `nvidia.com/gpu` and every container
that asks for some gets its own indices in CUDA_VISIBLE_DEVICES / NVIDIA_VISIBLE_DEVICES (part of the
runtime's environment, so the pod spec can still override them). Without GPUs the node advertises a
fixed count (8) so GPU pods schedule, and nothing is set. $WEIGHTSYNC_SANDBOX_NODE_GPUS overrides the
advertised count in both cases.
"""

from __future__ import annotations

import threading
from pathlib import Path

from weightsync.sandbox.podspec import Obj

RESOURCE = "nvidia.com/gpu"


def detect() -> int:
    """How many NVIDIA GPUs this machine has (the driver lists one directory per GPU)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return len(list(gpus.iterdir())) if gpus.is_dir() else 0


def requested(container: Obj) -> int:
    resources = container.get("resources", {})
    value = resources.get("limits", {}).get(RESOURCE) or resources.get("requests", {}).get(RESOURCE) or 0
    return int(value)


class GpuAllocator:
    """Hands out GPU indices to containers (pod uid, container name) and takes them back per pod."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.owner: dict[int, tuple[str, str]] = {}
        self.lock = threading.Lock()

    def env(self, pod_uid: str, container: Obj) -> dict[str, str]:
        """The container's GPU variables (allocating on first use); {} without real GPUs or a request."""
        want = requested(container)
        if not self.count or not want:
            return {}
        key = (pod_uid, container["name"])
        with self.lock:
            mine = sorted(i for i, o in self.owner.items() if o == key)
            free = [i for i in range(self.count) if i not in self.owner]
            if len(mine) < want:
                if len(free) < want - len(mine):
                    raise RuntimeError(
                        f"container {container['name']!r} wants {want} GPUs, {len(free)} are free"
                    )
                for i in free[: want - len(mine)]:
                    self.owner[i] = key
                mine = sorted(i for i, o in self.owner.items() if o == key)
        visible = ",".join(map(str, mine))
        return {"CUDA_VISIBLE_DEVICES": visible, "NVIDIA_VISIBLE_DEVICES": visible}

    def reserve(self, pod_uid: str, container: str, indices: list[int]) -> None:
        """Records GPUs a running container already has (one an agent before this one started)."""
        with self.lock:
            for i in indices:
                if i < self.count:
                    self.owner[i] = (pod_uid, container)

    def release(self, pod_uid: str) -> None:
        with self.lock:
            for i in [i for i, o in self.owner.items() if o[0] == pod_uid]:
                del self.owner[i]
