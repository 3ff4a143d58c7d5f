"""protocol: vllm on the sandbox: the inference pods run a stand-in vLLM server (tests/support/vllm_standin.py:
vLLM 0.33's HTTP control plane with real receivers behind it), the trainer is the demo's, unchanged but for
sending its parameters, and the Helm-installed operator wires them.

What a user checks: the operator added what vLLM needs (VLLM_SERVER_DEV_MODE, a /health readiness probe);
every version the trainer reports as synced was loaded, bit for bit, by every worker of every engine (their
checksums, printed by the stand-in, equal the trainer's); `status.lastSync` follows; an engine pod killed
mid-run is replaced at a new epoch, the trainer is not restarted, and the next sync reaches every engine.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml
from weightsync.sandbox import Sandbox

from .conftest import FORM_S, ROOT, DemoGroup, run_demo

pytestmark = [pytest.mark.e2e, pytest.mark.cluster]

NAME = "vdemo"
TRAINER, ENGINE_0, ENGINE_1 = f"{NAME}-trainer-0", f"{NAME}-inference-0", f"{NAME}-inference-1"
STANDIN = ROOT / "tests" / "support" / "vllm_standin.py"
WORKERS = 2
SYNC = re.compile(r"sync v=(\d+) epoch=(\d+) .*?checksum=([0-9a-f]{16})")
LOADED = re.compile(r"loaded v=(\d+) worker=(\d+) tensors=(\d+) checksum=([0-9a-f]{16})")


def manifest() -> dict[str, Any]:
    ws = run_demo.demo_manifest(NAME, steps=0, interval=1.0, replicas=2)
    spec = ws["spec"]
    spec["transport"] = {"backend": "gloo", "protocol": "vllm", "bufferSizeBytes": 131072}
    spec["inference"]["workersPerReplica"] = WORKERS
    engine = spec["inference"]["template"]["spec"]["containers"][0]
    engine["command"] = ["python", "-u", str(STANDIN), "--host", "0.0.0.0", "--port", "8000", "--workers",
                         str(WORKERS), "--timeout", "60", "--weight-transfer-config", '{"backend": "nccl"}',
                         "--print-checksums"]  # fmt: skip
    return ws


def synced(sandbox: Sandbox, namespace: str) -> dict[int, tuple[int, str]]:
    """version -> (epoch, checksum) of every sync the trainer reported as done."""
    log = sandbox.pod_log(namespace, TRAINER, "trainer")
    return {int(m[1]): (int(m[2]), m[3]) for m in SYNC.finditer(log)}


def loaded(sandbox: Sandbox, namespace: str, pod: str) -> dict[tuple[int, int], str]:
    """(version, worker) -> checksum of what that engine's workers loaded (the latest run of its pod)."""
    log = sandbox.pod_log(namespace, pod, "engine")
    return {(int(m[1]), int(m[2])): m[4] for m in LOADED.finditer(log)}


def verified_sync(group: DemoGroup, epoch_at_least: int, timeout: float) -> int:
    """The first version synced at `epoch_at_least` or later that both engines' workers loaded with the
    trainer's checksum; fails at once if any worker ever loaded other bytes than the trainer sent."""
    sandbox, namespace = group.sandbox, group.namespace

    def check() -> int | None:
        sent = synced(sandbox, namespace)
        for pod in (ENGINE_0, ENGINE_1):
            for (version, worker), digest in loaded(sandbox, namespace, pod).items():
                if version in sent:
                    assert digest == sent[version][1], f"{pod} worker {worker} loaded other weights for v{version}"
        for version in sorted(v for v, (epoch, _) in sent.items() if epoch >= epoch_at_least):
            engines = [loaded(sandbox, namespace, pod) for pod in (ENGINE_0, ENGINE_1)]
            if all(all(e.get((version, w)) == sent[version][1] for w in range(WORKERS)) for e in engines):
                return version
        return None

    return group.wait(check, f"a sync at epoch >= {epoch_at_least} verified on every engine worker", timeout)


@pytest.fixture
def vllm_group(demo_group: DemoGroup, kube_api: Any) -> DemoGroup:
    """The demo_group fixture's clean-up, for this group's name."""
    demo_group.name = NAME
    demo_group.watcher = run_demo.GroupWatcher(kube_api, demo_group.namespace, NAME)
    return demo_group


def test_stock_vllm_engines_are_kept_in_step_and_an_engine_killed_mid_run_is_replaced(
    vllm_group: DemoGroup,
) -> None:
    group = vllm_group
    group.sandbox.kubectl("apply", "-n", group.namespace, "-f", "-", input=yaml.safe_dump(manifest()))
    first = verified_sync(group, 0, FORM_S)
    status = group.ready()
    assert status["epoch"] == 0
    engine = json.loads(group.kubectl("get", "pod", ENGINE_0, "-o", "json"))["spec"]["containers"][0]
    assert {"name": "VLLM_SERVER_DEV_MODE", "value": "1"} in engine["env"]
    assert engine["readinessProbe"]["httpGet"] == {"path": "/health", "port": 8000, "scheme": "HTTP"}
    group.wait(lambda: ((group.status().get("lastSync") or {}).get("version") or 0) >= first,
               "status.lastSync to report a version the engines confirmed")  # fmt: skip

    before = group.uids()
    group.kill_pod_processes(ENGINE_1)
    status = group.ready(epoch_at_least=1)
    after = group.uids()
    assert after[ENGINE_1] != before[ENGINE_1], "the killed engine pod is replaced"
    assert after[TRAINER] == before[TRAINER], "the trainer is not restarted"
    assert after[ENGINE_0] == before[ENGINE_0], "the surviving engine is re-initialised in place"
    version = verified_sync(group, status["epoch"], FORM_S)
    assert version > first
