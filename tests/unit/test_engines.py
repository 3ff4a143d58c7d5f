"""operator/engines.py: what a stock vLLM server needs to be a member, read from the inference template."""

from __future__ import annotations

from typing import Any

import pytest
from weightsync.operator import desired, engines

from weightsync.api.models import parse_spec

CONFIG = '{"backend": "nccl"}'


def spec(container: dict[str, Any], port: int | None = None, protocol: str = "vllm") -> Any:
    body: dict[str, Any] = {
        "trainer": {"template": {"spec": {"containers": [{"name": "t", "image": "x"}]}}},
        "inference": {"replicas": 2, "workersPerReplica": 2,
                      "template": {"spec": {"containers": [{"name": "engine", "image": "vllm", **container}]}}},
        "transport": {"protocol": protocol, "backend": "nccl"},
    }  # fmt: skip
    if port is not None:
        body["engine"] = {"port": port}
    return parse_spec(body)


def serve(*extra: str) -> dict[str, Any]:
    return {"command": ["vllm", "serve", "Qwen/Qwen3-8B", *extra]}


@pytest.mark.parametrize(
    "container",
    [
        serve("--weight-transfer-config", CONFIG),
        serve(f"--weight-transfer-config={CONFIG}", "--port", "8000"),
        {"command": ["sh", "-c", f"exec vllm serve m --port 8000 --weight-transfer-config '{CONFIG}'"]},
        {"command": ["vllm"], "args": ["serve", "m", "--weight-transfer-config", CONFIG],
         "env": [{"name": "VLLM_SERVER_DEV_MODE", "value": "1"}]},
    ],
    ids=["flags", "equals-and-port", "shell", "args-and-dev-mode"],
)
def test_a_complete_vllm_template_is_accepted(container: dict[str, Any]) -> None:
    assert engines.vllm_problems(spec(container)) == []


def test_each_missing_piece_is_named() -> None:
    (problem,) = engines.vllm_problems(spec(serve()))
    assert "spec.inference.template.spec.containers[engine]" in problem and "--weight-transfer-config" in problem
    (problem,) = engines.vllm_problems(spec(serve("--weight-transfer-config", '{"backend": "ipc"}')))
    assert "backend nccl" in problem
    (problem,) = engines.vllm_problems(spec(serve("--weight-transfer-config", CONFIG), port=9000))
    assert "no --port (vLLM's default 8000), but spec.engine.port is 9000" in problem
    (problem,) = engines.vllm_problems(spec(serve("--weight-transfer-config", CONFIG, "--port", "8001")))
    assert "--port 8001" in problem
    for value in ("true", "0", ""):
        env = {"env": [{"name": "VLLM_SERVER_DEV_MODE", "value": value}]}
        (problem,) = engines.vllm_problems(spec({**serve("--weight-transfer-config", CONFIG), **env}))
        assert f"VLLM_SERVER_DEV_MODE={value!r}" in problem


def test_other_protocols_are_not_checked() -> None:
    assert engines.vllm_problems(spec({"command": ["my-engine"]}, protocol="weightsync")) == []


def test_the_engine_pod_gets_dev_mode_health_readiness_and_the_trainer_the_engine_settings() -> None:
    s = spec(serve("--weight-transfer-config", CONFIG, "--port", "8100"), port=8100)
    group = desired.Group("ws", "ns", "uid", s)
    pods = desired.pods(group)
    engine = pods["ws-inference-1"]["spec"]["containers"][0]
    assert {"name": "VLLM_SERVER_DEV_MODE", "value": "1"} in engine["env"]
    assert engine["readinessProbe"]["httpGet"] == {"path": "/health", "port": 8100}
    trainer_env = {e["name"]: e.get("value") for e in pods["ws-trainer-0"]["spec"]["containers"][0]["env"]}
    assert trainer_env["WEIGHTSYNC_ENGINE_PORT"] == "8100"
    assert trainer_env["WEIGHTSYNC_PROTOCOL"] == "vllm"
    assert trainer_env["WEIGHTSYNC_VLLM_PAUSE_MODE"] == "keep"
    assert trainer_env["WEIGHTSYNC_ENDPOINTS"].split(",")[1] == "ws-inference-1.ws.ns.svc.cluster.local"
    assert [p["name"] for p in desired.service(group)["spec"]["ports"]] == ["rendezvous", "engine"]
    assert "readinessProbe" not in pods["ws-trainer-0"]["spec"]["containers"][0]


def test_a_templates_own_readiness_probe_and_dev_mode_are_kept() -> None:
    probe = {"httpGet": {"path": "/ready", "port": 8000}}
    container = {**serve("--weight-transfer-config", CONFIG), "readinessProbe": probe,
                 "env": [{"name": "VLLM_SERVER_DEV_MODE", "value": "2"}]}  # fmt: skip
    engine = desired.pods(desired.Group("ws", "ns", "uid", spec(container)))["ws-inference-0"]["spec"]["containers"][0]
    assert engine["readinessProbe"] == probe
    assert [e for e in engine["env"] if e["name"] == "VLLM_SERVER_DEV_MODE"] == [
        {"name": "VLLM_SERVER_DEV_MODE", "value": "2"}
    ]


def test_the_guides_example_manifest_is_a_valid_vllm_group() -> None:
    from pathlib import Path

    import yaml

    doc = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "vllm.yaml").read_text())
    spec = parse_spec(doc["spec"])
    assert spec.transport.protocol == "vllm" and spec.transport.backend == "nccl"
    assert engines.vllm_problems(spec) == []
    assert spec.world_size == 1 + 2 * 4
