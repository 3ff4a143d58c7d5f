"""GPU tier: NCCL on real GPUs (two or more) and GPU kernels (one). Skipped without them (CI has none)."""

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
    gpus = gpu_count()
    many = pytest.mark.skip(reason="needs at least 2 CUDA GPUs (NCCL); see bench/results/ for the recorded runs")
    one = pytest.mark.skip(reason="needs a CUDA GPU; see bench/results/ for the recorded runs")
    for item in items:
        if item.get_closest_marker("gpu") and gpus < 2:
            item.add_marker(many)
        elif item.get_closest_marker("single_gpu") and gpus < 1:
            item.add_marker(one)
