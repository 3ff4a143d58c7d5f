"""The soak (bench/soak.py), short: a seeded series of random member kills and stalls on the demo group,
at least 50 syncs; zero hangs (every wait ends within its bound), zero versions reported as synced that a
worker does not hold. The long soak is the standalone command (bench/README.md); the seed is printed, and
$WEIGHTSYNC_SOAK_SEED (a number, or `random`) / $WEIGHTSYNC_SOAK_FAULTS change or lengthen this one."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import sys
from typing import Any

import pytest
from weightsync.sandbox import Sandbox
from weightsync.sandbox.waiting import wait_for

from .conftest import GONE_S, ROOT, group_processes

pytestmark = [pytest.mark.e2e, pytest.mark.cluster]

#: The series of faults `make test` replays (the long soak of bench/results/ ran the same seed's first 30).
DEFAULT_SEED = 14


def _soak() -> Any:
    if "soak" in sys.modules:
        return sys.modules["soak"]
    spec = importlib.util.spec_from_file_location("soak", ROOT / "bench" / "soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module
    spec.loader.exec_module(module)
    return module


def test_a_short_soak_of_random_kills_and_stalls_never_hangs_and_never_lies(
    sandbox: Sandbox, namespace: str, kube_api: Any, operator_release: str,
) -> None:
    soak = _soak()
    chosen = os.environ.get("WEIGHTSYNC_SOAK_SEED") or str(DEFAULT_SEED)
    seed = random.SystemRandom().randrange(2**31) if chosen == "random" else int(chosen)
    n_faults = int(os.environ.get("WEIGHTSYNC_SOAK_FAULTS") or 6)
    print(f"soak seed {seed} ({n_faults} faults; replay with WEIGHTSYNC_SOAK_SEED={seed})")
    try:
        result = soak.run(sandbox, namespace, kube_api, seed, n_faults, min_syncs=50)
    finally:
        sandbox.kubectl("delete", "ws", soak.NAME, "-n", namespace, "--wait=false", check=False)
    print(json.dumps(result.summary()))
    assert not result.hangs, (seed, result.hangs)
    assert not result.lies, (seed, result.lies)
    assert result.syncs_verified >= 50, (seed, result.syncs_verified)
    done = [f for f in result.faults if not f.error]
    assert len(done) >= n_faults - 1, (seed, result.faults)  # a target being replaced at that moment is skipped
    wait_for(lambda: not group_processes(namespace, soak.NAME), GONE_S, "the soak's processes to end")
