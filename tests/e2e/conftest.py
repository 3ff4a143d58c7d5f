"""e2e fixtures: the operator installed with Helm on the sandbox, and the demo group of examples/ running in a
test's namespace with real processes (trainer.py, inference.py), followed through the API server.

What the tests check is what a user checks: `kubectl get ws` (status), `kubectl logs` of the members (each
sync the trainer reports, and each inference worker's checksum and output for that version, which must
equal the trainer's), and the processes on this machine (`/proc`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import demo_driver
import faults
import pytest
import yaml
from weightsync.sandbox import Sandbox
from weightsync.sandbox.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]

run_demo = demo_driver.load()  # the demo driver, its log parsing and its checks

T = TypeVar("T")

#: The first formation: 7 Python processes importing torch on a small shared machine.
FORM_S = 240.0
#: Re-forming after a failure or a scale: the operator's backoff, a new pod's start, the rendezvous.
RECOVER_S = 240.0
#: Teardown: every process of a deleted group gone.
GONE_S = 120.0


@pytest.fixture(scope="module")
def operator_release(sandbox: Sandbox) -> Iterator[str]:
    """The operator chart installed as the demo installs it (release `weightsync` in weightsync-system);
    reused when it is there already. Module-scoped: an operator watching every namespace must be gone
    before other tiers run their own operators in the same session."""
    existed = sandbox.helm("status", run_demo.RELEASE, "-n", run_demo.OPERATOR_NAMESPACE, check=False).returncode == 0
    if not existed:
        sandbox.helm("install", run_demo.RELEASE, str(run_demo.CHART), "-n", run_demo.OPERATOR_NAMESPACE,
                     "--create-namespace", "--wait", "--timeout=240s", timeout=300)
    sandbox.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/weightsyncs.weightsync.dev")
    yield run_demo.RELEASE
    if not existed:
        sandbox.helm("uninstall", run_demo.RELEASE, "-n", run_demo.OPERATOR_NAMESPACE, "--wait", "--timeout=120s",
                     check=False)
        sandbox.kubectl("wait", "--for=delete", "pods", "-n", run_demo.OPERATOR_NAMESPACE, "-l",
                        f"app.kubernetes.io/instance={run_demo.RELEASE}", "--timeout=120s", check=False)


# ------------------------------------------------------------------------------------------------ processes


process_tree = faults.process_tree  # `pid` and all its descendants (one copy, in tests/support/faults.py)


def group_processes(namespace: str, name: str) -> list[int]:
    """Every process on this machine that belongs to the WeightSync `namespace/name` (it carries the
    operator's WEIGHTSYNC_NAMESPACE and WEIGHTSYNC_NAME, as do the workers an engine pod starts)."""
    wanted = {f"WEIGHTSYNC_NAMESPACE={namespace}".encode(), f"WEIGHTSYNC_NAME={name}".encode()}
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            env = set(environ.read_bytes().split(b"\0"))
        except OSError:
            continue
        if wanted <= env:
            found.append(int(environ.parent.name))
    return sorted(found)


# ------------------------------------------------------------------------------------------------ the group


class DemoGroup:
    """The demo WeightSync in one namespace, and what a user sees of it."""

    def __init__(self, sandbox: Sandbox, namespace: str, api_client: Any, name: str = "demo") -> None:
        self.sandbox = sandbox
        self.namespace = namespace
        self.name = name
        self.watcher = run_demo.GroupWatcher(api_client, namespace, name)
        #: every member log from the node's disk, and the status.lastSync values seen (faults.py)
        self.ledger = faults.Ledger(sandbox, namespace, name)

    def apply(self, **kwargs: Any) -> DemoGroup:
        ws = run_demo.demo_manifest(self.name, **kwargs)
        self.sandbox.kubectl("apply", "-n", self.namespace, "-f", "-", input=yaml.safe_dump(ws))
        return self

    # -- what kubectl shows
    def kubectl(self, *args: str) -> str:
        return self.sandbox.kubectl(*args, "-n", self.namespace).stdout

    def status(self) -> dict[str, Any]:
        status = self.watcher.status()
        self.ledger.observe_status(status)
        return status

    def pod(self, pod: str) -> dict[str, Any]:
        return dict(json.loads(self.kubectl("get", "pod", pod, "-o", "json")))

    def uids(self) -> dict[str, str]:
        """Member pod name -> UID, of the pods that exist and are not being deleted."""
        return {p.metadata.name: p.metadata.uid for p in self.watcher.pods() if p.metadata.deletion_timestamp is None}

    def describe(self) -> str:
        return run_demo.diagnose(self.sandbox, self.namespace, self.name)

    def wait(self, condition: Callable[[], T | None], what: str, timeout: float = RECOVER_S) -> T:
        return wait_for(condition, timeout, what, interval=0.5, describe=self.describe)

    # -- syncs
    def complete_sync(self, what: str, accept: Callable[[run_demo.Verdict], bool] = lambda v: True,
                      timeout: float = RECOVER_S) -> run_demo.Verdict:
        """The first sync accepted by `accept` that reached every receiver with the trainer's weights
        (checksum and output); fails at once if any worker ever loaded other weights than were sent."""

        def found() -> run_demo.Verdict | None:
            self.watcher.refresh()
            bad = self.watcher.mismatches()
            assert not bad, "workers hold other weights than the trainer sent:\n" + "\n".join(x.line for x in bad)
            return next((v for v in self.watcher.verdicts() if v.complete and accept(v)), None)

        return self.wait(found, what, timeout)

    def ready(self, epoch_at_least: int = 0, world_size: int | None = None) -> dict[str, Any]:
        """status: phase Ready with every member ready, at an epoch >= `epoch_at_least`."""

        def check() -> dict[str, Any] | None:
            st = self.status()
            ready, _, total = (st.get("ready") or "0/?").partition("/")
            ok = (st.get("phase") == "Ready" and ready == total and (st.get("epoch") or 0) >= epoch_at_least
                  and (world_size is None or st.get("worldSize") == world_size))
            return st if ok else None

        return self.wait(check, f"ws/{self.name} Ready at epoch >= {epoch_at_least}")

    # -- failures
    def kill_pod_processes(self, pod: str) -> list[int]:
        """SIGKILL every process of the pod's container, as when the container is OOM-killed or its node's
        runtime dies: no cleanup, no goodbye to the group."""
        status = self.pod(pod)["status"]["containerStatuses"][0]
        assert "running" in status["state"], status
        pids = process_tree(int(status["containerID"].removeprefix("sandbox://")))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    def delete(self) -> None:
        self.sandbox.kubectl("delete", "ws", self.name, "-n", self.namespace, "--ignore-not-found",
                             "--wait=false", check=False)


@pytest.fixture
def demo_group(sandbox: Sandbox, namespace: str, kube_api: Any, operator_release: str) -> Iterator[DemoGroup]:
    """A DemoGroup in the test's namespace (not applied yet); deleted afterwards, and its processes waited for
    so that the next test has the machine to itself."""
    group = DemoGroup(sandbox, namespace, kube_api)
    yield group
    group.delete()
    wait_for(lambda: not group_processes(namespace, group.name), GONE_S,
             f"the processes of ws/{group.name} in {namespace} to end")
