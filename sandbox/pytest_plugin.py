"""pytest fixtures for the sandbox: `sandbox` (session), `namespace` (per test), `kube_api`.

Enable with `pytest_plugins = ["weightsync.sandbox.pytest_plugin"]` in a conftest. The sandbox starts once,
on first use, and every process it started is stopped when the session ends: after failures, on Ctrl-C
(pytest_unconfigure), on SIGTERM (turned into KeyboardInterrupt) and at interpreter exit.

Each session gets its own state directory (a fresh cluster, its own audit log, its own bridge and subnet), so
two sessions on one machine never stop each other's cluster; the last few are kept for their logs. Set
$WEIGHTSYNC_SANDBOX_STATE to use (and at the end stop) that sandbox instead.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import config
from weightsync.sandbox.controlplane import Sandbox
from weightsync.sandbox.paths import default_state_dir
from weightsync.sandbox.waiting import wait_for

NAMESPACE_READY_TIMEOUT_S = 60.0
KEEP_SESSIONS = 3
_running: list[Sandbox] = []


def _stop_all() -> None:
    while _running:
        _running.pop().down()


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


atexit.register(_stop_all)


def pytest_unconfigure(config: pytest.Config) -> None:
    _stop_all()


def _session_state_dir() -> Path:
    """A new state directory for this session; older sessions' directories beyond the last few are removed."""
    root: Path = default_state_dir().parent / "sandbox-sessions"
    root.mkdir(parents=True, exist_ok=True)
    old = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for stale in old[: max(len(old) - KEEP_SESSIONS + 1, 0)]:
        if not Sandbox(stale).status().processes.get("kube-apiserver"):  # never one that still runs
            shutil.rmtree(stale, ignore_errors=True)
    return root / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Sandbox]:
    """The running sandbox (started once per session; stopped at its end, whatever happened)."""
    sb = Sandbox(None if os.environ.get("WEIGHTSYNC_SANDBOX_STATE") else _session_state_dir())
    _running.append(sb)
    # while the sandbox runs, SIGTERM ends the session like Ctrl-C, so the finalisers still stop it
    previous = signal.getsignal(signal.SIGTERM)
    if previous in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        sb.up()
        yield sb
    finally:
        _stop_all()
        if previous in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.fixture
def namespace(sandbox: Sandbox, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace named after the test, with its default ServiceAccount; deleted afterwards."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{slug}-{uuid.uuid4().hex[:6]}"
    sandbox.kubectl("create", "namespace", name)
    wait_for(
        lambda: sandbox.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0,
        NAMESPACE_READY_TIMEOUT_S,
        f"the default ServiceAccount in namespace {name}",
    )
    yield name
    sandbox.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


@pytest.fixture(scope="session")
def kube_api(sandbox: Sandbox) -> Iterator[Any]:
    """A kubernetes.client.ApiClient for the admin user (group system:masters)."""
    client = config.new_client_from_config(config_file=str(sandbox.kubeconfig))  # type: ignore[no-untyped-call]
    try:
        yield client
    finally:
        client.close()
