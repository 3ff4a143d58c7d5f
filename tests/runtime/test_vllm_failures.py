"""Protocol `vllm` when an engine fails: a 500 or no answer at each step is an exception naming the server
and the step within the timeout; the trainer leaves no group, no session and no paused engine behind, and
its next send forms a fresh group that reaches every engine. A world-size mismatch and a dtype vLLM cannot
receive on its wire, or no tensor at all, are refused before anything forms or moves."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import pytest
import torch
from standins import StandIn, expected, model
from weightsync.runtime import ConfigMismatchError, RendezvousError, WeightSender, WeightSyncError
from weightsync.runtime.local import vllm_trainer_env
from weightsync.runtime.vllm_http import EngineError
from weightsync.sandbox.waiting import wait_for

TIMEOUT = 2.5
B = 1 << 16
STEPS = ["init_weight_transfer_engine", "pause", "start_weight_update", "update_weights", "finish_weight_update",
         "resume", "weight_info"]
SYNC_STEPS = STEPS[1:]


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[StandIn, StandIn]]:
    """A server that will fail and a healthy one beside it (the clean-up must reach both)."""
    with StandIn(2, timeout=TIMEOUT) as faulty, StandIn(2, timeout=TIMEOUT) as healthy:
        yield faulty, healthy


@pytest.mark.parametrize("kind", ["fail", "stall"])
@pytest.mark.parametrize("step", STEPS)
def test_a_failing_engine_is_named_nothing_dangles_and_the_next_send_recovers(
        pair: tuple[StandIn, StandIn], step: str, kind: str) -> None:
    faulty, healthy = pair
    for server in pair:
        server.clear()
    healthy.faults()
    faulty.faults(**{f"{kind}_at": [f"{step}:1"]})
    env = vllm_trainer_env([faulty.url, healthy.url], 2, timeout=TIMEOUT, buffer_bytes=B)
    with WeightSender(env, report_to_pod=False) as sender:
        began = time.monotonic()
        with pytest.raises(WeightSyncError) as err:
            sender.send(model(1), version=1)
        took = time.monotonic() - began
        message = str(err.value)
        assert isinstance(err.value, EngineError), message
        assert faulty.url in message and step in message, message
        assert ("during sync v1" in message) == (step != "init_weight_transfer_engine"), message
        assert ("HTTP 500" in message and "injected failure" in message) if kind == "fail" else (
            f"no answer within {TIMEOUT:g}s" in message), message
        assert (err.value.step, err.value.url, err.value.status) == (step, faulty.url, 500 if kind == "fail" else None)
        assert took < 2 * TIMEOUT + 3, took  # the failing call within the timeout, the clean-up within one more
        started = step in SYNC_STEPS[1:]
        for server in pair:
            # No group, no session, nothing paused. (An init may still be joining on the healthy server: its
            # workers wait for the faulty one's, which never come, until their own timeout; the engine runs one
            # call at a time, so the trainer's shutdown there may have found no answer. The next send's
            # formation shuts it down again.)
            state = server.state()
            assert (state["initialized"], state["session"], state["paused"]) == (False, False, False), (
                server.url, state)
            if started:  # its weights may be partly new: marked, not passed off as a version
                assert state["weight_version"] == "1-incomplete", state
            assert "POST /shutdown_weight_transfer_engine" in server.steps()

        report = sender.send(model(2), version=2)
        assert report.version == 2 and report.acked == (1, 2, 3, 4)
        assert faulty.tensors("2") == {"1": expected(model(2)), "2": expected(model(2))}
        assert healthy.tensors("2") == {"3": expected(model(2)), "4": expected(model(2))}
        for server in pair:
            assert server.state()["weight_version"] == "2" and server.state()["leaked_groups"] == 0


def test_a_world_size_mismatch_is_refused_before_any_group_forms() -> None:
    with StandIn(2, "--world-size", "4", timeout=TIMEOUT) as server:
        env = vllm_trainer_env([server.url], 2, timeout=TIMEOUT, buffer_bytes=B)
        with WeightSender(env, report_to_pod=False) as sender, pytest.raises(ConfigMismatchError) as err:
            sender.send(model(1), version=1)
        assert f"{server.url} reports world size 4" in str(err.value) and "2 per server" in str(err.value)
        assert server.steps() == ["GET /get_world_size?include_dp=true"]


def test_an_empty_tensor_list_is_refused_before_any_request_and_the_next_send_still_syncs() -> None:
    with StandIn(1, timeout=TIMEOUT) as server:
        env = vllm_trainer_env([server.url], 1, timeout=TIMEOUT, buffer_bytes=B)
        with WeightSender(env, report_to_pod=False) as sender:
            sender.send(model(1), version=1)
            sent = len(server.requests())
            with pytest.raises(ConfigMismatchError, match="an empty tensor list"):
                sender.send([], version=2)
            assert len(server.requests()) == sent, "nothing reached the engine"
            sender.send(model(3), version=3)
        assert server.tensors("3") == {"1": expected(model(3))}


@pytest.mark.parametrize("dtype", [torch.bool, torch.float8_e5m2, torch.int16, torch.uint16, torch.complex64])
def test_a_dtype_vllm_cannot_receive_unpacked_is_refused_before_any_request(dtype: torch.dtype) -> None:
    with StandIn(1, timeout=TIMEOUT) as server:
        env = vllm_trainer_env([server.url], 1, timeout=TIMEOUT, buffer_bytes=B, packed=False)
        named = [*model(1), ("model.layers.9.mask", torch.zeros(4, dtype=torch.float32).to(dtype))]
        with WeightSender(env, report_to_pod=False) as sender, pytest.raises(ConfigMismatchError) as err:
            sender.send(named, version=1)
        assert f"'model.layers.9.mask' ({str(dtype).split('.')[-1]})" in str(err.value)
        assert server.requests() == []


def test_an_engine_reporting_a_stale_version_fails_the_sync() -> None:
    with StandIn(1, "--stale-version", timeout=TIMEOUT) as server:
        env = vllm_trainer_env([server.url], 1, timeout=TIMEOUT, buffer_bytes=B)
        with WeightSender(env, report_to_pod=False) as sender, pytest.raises(EngineError) as err:
            sender.send(model(1), version=1)
        assert err.value.step == "weight_info" and "reports weight_version 'default'" in str(err.value)
        assert server.url in str(err.value)


def test_an_unreachable_server_is_named_within_the_timeout() -> None:
    from weightsync.runtime.local import free_port

    url = f"http://127.0.0.1:{free_port()}"
    env = vllm_trainer_env([url], 2, timeout=TIMEOUT, buffer_bytes=B)
    began = time.monotonic()
    with WeightSender(env, report_to_pod=False) as sender, pytest.raises(RendezvousError) as err:
        sender.send(model(1), version=1)
    assert TIMEOUT <= time.monotonic() - began < TIMEOUT + 2  # waited for it to start, for the timeout
    message = str(err.value)
    assert err.value.missing_ranks == (1, 2), message
    assert "get_world_size" in message and url in message and "ConnectionRefusedError" in message, message


def test_a_server_still_starting_is_waited_for(caplog: pytest.LogCaptureFixture) -> None:
    """A replaced engine pod comes up after the trainer's next send began (the operator's new epoch arrives
    first; a vLLM server listens only once its model is loaded): the send waits for it, within the timeout."""
    from weightsync.runtime.local import free_port

    port = free_port()
    env = vllm_trainer_env([f"http://127.0.0.1:{port}"], 2, timeout=60.0, buffer_bytes=B)
    outcome: list[object] = []
    with WeightSender(env, report_to_pod=False) as sender:
        caplog.set_level(logging.INFO, logger="weightsync.runtime")
        thread = threading.Thread(target=lambda: outcome.append(sender.send(model(1), version=1)), daemon=True)
        thread.start()
        wait_for(lambda: any("waiting up to" in r.getMessage() for r in caplog.records), 30.0,
                 "the sender to say it waits for the server", interval=0.05)
        with StandIn(2, port=port, timeout=60.0) as server:
            thread.join(90.0)
            assert outcome and outcome[0].version == 1 and outcome[0].acked == (1, 2), outcome  # type: ignore[attr-defined]
            assert server.tensors("1") == {"1": expected(model(1)), "2": expected(model(1))}

