"""The demo, end to end, as a user runs it: examples/demo/run_demo.py against the session's sandbox installs
the operator with Helm (unless it is there), runs 1 trainer + 2 inference replicas x 2 workers with gloo,
verifies every sync on every worker, prints `kubectl get ws` and removes what it created."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from weightsync.sandbox import Sandbox

from .conftest import ROOT, group_processes

pytestmark = [pytest.mark.e2e, pytest.mark.cluster]

STEPS = 3


def test_the_demo_command_runs_a_verified_group_and_cleans_up(sandbox: Sandbox, namespace: str) -> None:
    argv = [sys.executable, str(ROOT / "examples" / "demo" / "run_demo.py"), "--state-dir", str(sandbox.state_dir),
            "--namespace", namespace, "--steps", str(STEPS), "--timeout", "300"]
    env = {**os.environ, "WEIGHTSYNC_SANDBOX_BIN_DIR": str(sandbox.bin_dir)}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=540, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out

    # Progress: each sync the trainer sent, and its proof on every worker.
    for v in range(1, STEPS + 1):
        assert f"v{v}: trainer sent 32 tensors" in out, out
        assert f"v{v}: verified on 4/4 workers (ranks 1,2,3,4)" in out, out
    assert f"status.lastSync: v{STEPS} at epoch 0" in out, out

    # The closing table: the group Ready with every member, its epoch, the last version and its GB/s.
    table = out.split(f"$ kubectl get ws -n {namespace}\n", 1)[1].splitlines()
    assert table[0].split() == ["NAME", "PHASE", "READY", "EPOCH", "VERSION", "GB/S", "AGE"], table
    name, phase, ready, epoch, version, gbps, _age = table[1].split()
    assert (name, phase, ready, epoch, version) == ("demo", "Ready", "3/3", "0", str(STEPS)), table
    assert float(gbps) > 0

    # It removed its group (and nothing else: the sandbox it did not start keeps running).
    assert "tearing down: deleting the WeightSync" in out
    assert sandbox.kubectl("get", "ws", "-n", namespace, "-o", "name").stdout == ""
    assert group_processes(namespace, "demo") == []
    assert sandbox.status().running
