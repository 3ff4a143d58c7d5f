"""GPU tier: NCCL on real GPUs. Skipped where there are fewer than two CUDA devices (CI has none)."""

from __future__ import annotations

import os

import pytest

# NVLink SHARP (multicast) stays off on the shared GPU machines; every member inherits the same setting.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")


def gpu_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if gpu_count() >= 2:
        return
    skip = pytest.mark.skip(reason="needs at least 2 CUDA GPUs (NCCL); see bench/results/ for the recorded runs")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
