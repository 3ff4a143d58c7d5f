"""Operator fixtures for integration tests: the CRDs installed, and the operator running as a process.

`operator` runs `python -m weightsync.operator --standalone --namespace <test namespace>` against the
sandbox's kubeconfig (as admin; the chart's tests prove the least-privilege RBAC), on free ports, and
stops it after the test. It can be killed and restarted within a test (`.kill()`, `.start()`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from weightsync.sandbox import Sandbox
from weightsync.sandbox.waiting import wait_for

from weightsync.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 60.0


@pytest.fixture(scope="session")
def crds(sandbox: Sandbox) -> None:
    """The generated CRDs (WeightSync and kopf's peering), applied and established."""
    sandbox.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    sandbox.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/weightsyncs.weightsync.dev")


class OperatorProcess:
    def __init__(self, sandbox: Sandbox, namespace: str, log_dir: Path, label: str = "operator") -> None:
        self.sandbox = sandbox
        self.label = label
        self.namespace = namespace
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.liveness_port = 0
        self.metrics_port = 0

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.label}-{self.runs}.log"

    def start(
        self,
        env: dict[str, str] | None = None,
        wait: bool = True,
        priority: int | None = None,
        crash_after_writes: int | None = None,
        resync_seconds: float = 3.0,
    ) -> OperatorProcess:
        """Start it; with `priority`, it runs with kopf peering (the KopfPeering object must exist); with
        `crash_after_writes`, it exits abruptly (137) right after that many API writes."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.runs += 1
        self.liveness_port, self.metrics_port = free_port(), free_port()
        entry = (
            ["-m", "weightsync.operator"]
            if crash_after_writes is None
            else [str(ROOT / "tests" / "support" / "crashing_operator.py"), str(crash_after_writes)]
        )
        argv = [
            sys.executable, *entry, "--namespace", self.namespace,
            "--liveness-port", str(self.liveness_port), "--metrics-port", str(self.metrics_port),
            "--resync-seconds", str(resync_seconds),
            *(["--standalone"] if priority is None else ["--priority", str(priority)]),
        ]  # fmt: skip
        full_env = {**os.environ, "KUBECONFIG": str(self.sandbox.kubeconfig), **(env or {})}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd="/")
        if wait:
            wait_for(self.healthy, STARTUP_TIMEOUT_S, "the operator's liveness endpoint", describe=self.tail)
        return self

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"the operator exited: {self.tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text: str = r.read().decode()
            return text

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind, as when a node dies."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""


@pytest.fixture
def operator(sandbox: Sandbox, namespace: str, crds: None, tmp_path: Path) -> Iterator[OperatorProcess]:
    """The operator, running and healthy, watching only this test's namespace."""
    op = OperatorProcess(sandbox, namespace, tmp_path).start()
    try:
        yield op
    finally:
        op.stop()
