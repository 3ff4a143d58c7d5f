"""Protocol `vllm`: the trainer's WeightSender drives stand-in vLLM servers (real HTTP servers in processes of
their own, real gloo receivers behind them); every request, body, broadcast and byte is checked."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from standins import StandIn, expected, model
from vllm_standin import unique_id_from_pickle
from weightsync.runtime import WeightReceiver, WeightSender
from weightsync.runtime import vllm_wire as wire
from weightsync.runtime.local import free_port, group_envs, vllm_trainer_env
from weightsync.runtime.vllm_http import EngineClient, EngineError
from weightsync.runtime.vllm_sender import VllmSender

from weightsync.contract import ENDPOINTS_ANNOTATION, EPOCH_ANNOTATION, WORLD_SIZE_ANNOTATION

B = 1 << 16  # the smallest buffer the contract allows
TIMEOUT = 10.0


@pytest.fixture(scope="module")
def engine() -> Iterator[StandIn]:
    with StandIn(2, timeout=TIMEOUT) as server:
        yield server


@pytest.fixture
def fresh(engine: StandIn) -> StandIn:
    engine.faults()
    engine.clear()
    return engine


def bodies(server: StandIn, path: str) -> list[Any]:
    return [r["body"] for r in server.requests() if r["path"] == path]


SYNC_STEPS = ["POST /pause?mode=keep", "POST /start_weight_update", "POST /update_weights",
              "POST /finish_weight_update", "POST /resume", "GET /weight_info"]
FORM_STEPS = ["GET /get_world_size?include_dp=true", "POST /shutdown_weight_transfer_engine",
              "POST /init_weight_transfer_engine"]


def test_the_request_sequence_and_bodies(fresh: StandIn) -> None:
    env = vllm_trainer_env([fresh.url], 2, timeout=TIMEOUT, buffer_bytes=B)
    named = model(1)
    with WeightSender(env, report_to_pod=False) as sender:
        first = sender.send(named, version=1)
        second = sender.send(model(2), version=2)
    assert fresh.steps() == [*FORM_STEPS, *SYNC_STEPS, *SYNC_STEPS, "POST /shutdown_weight_transfer_engine"]
    init = bodies(fresh, "/init_weight_transfer_engine")
    assert init == [{"init_info": {"rank_offset": 1, "world_size": 3, "master_address": "127.0.0.1",
                                   "master_port": env.master_port, "packed": True, "packed_buffer_size_bytes": B,
                                   "packed_num_buffers": 2}}]
    updates = bodies(fresh, "/update_weights")
    info = updates[0]["update_info"]
    assert set(info) == {"names", "dtype_names", "shapes"} and sorted(info["names"]) == sorted(n for n, _ in named)
    by_name = dict(named)
    assert info["dtype_names"] == [wire.dtype_name(by_name[n].dtype) for n in info["names"]]
    assert info["shapes"] == [list(by_name[n].shape) for n in info["names"]]
    assert updates[1] == {"update_info": {"names": [], "dtype_names": [], "shapes": []}}  # the same tensors
    assert bodies(fresh, "/finish_weight_update") == [{"weight_version": "1"}, {"weight_version": "2"}]
    assert bodies(fresh, "/start_weight_update") == [None, None] and bodies(fresh, "/pause") == [None, None]
    assert (first.version, first.tensors, first.acked, first.transport, first.epoch) == (
        1, len(named), (1, 2), "vllm gloo/tcp", 0)
    assert first.bytes == sum(t.numel() * t.element_size() for _, t in named) and first.seconds > 0
    assert first.formation_seconds > 0 and second.formation_seconds == 0
    assert fresh.state() == {"initialized": False, "initializing": False, "session": False, "paused": False,
                             "weight_version": "2", "leaked_groups": 0, "ranks": [], "init_info": None}


def test_every_byte_of_every_tensor_reaches_every_worker(fresh: StandIn) -> None:
    env = vllm_trainer_env([fresh.url], 2, timeout=TIMEOUT, buffer_bytes=B, vllm_pause_mode="wait")
    with WeightSender(env, report_to_pod=False) as sender:
        for version in (1, 2):
            sender.send(model(version), version=version)
            got = fresh.tensors(str(version))
            assert set(got) == {"1", "2"}
            assert got["1"] == got["2"] == expected(model(version))
    assert fresh.steps().count("POST /pause?mode=wait") == 2


@pytest.mark.parametrize(("delta", "chunks"), [(-1, [B + 99]), (0, [B + 100]), (1, [B + 1, 100])])
def test_chunks_close_just_under_at_and_just_over_the_buffer_size(fresh: StandIn, delta: int,
                                                                  chunks: list[int]) -> None:
    """Two tensors filling the buffer to B - 1, B or B + 1 bytes, then a third of 100: a chunk closes right
    after the tensor that makes it strictly larger than B."""
    named = [("a", torch.arange(40000, dtype=torch.int32).to(torch.uint8)),
             ("b", torch.randint(0, 255, (B - 40000 + delta,), dtype=torch.uint8)),
             ("c", torch.randint(-100, 100, (100,), dtype=torch.int8))]
    env = vllm_trainer_env([fresh.url], 2, timeout=TIMEOUT, buffer_bytes=B)
    with WeightSender(env, report_to_pod=False) as sender:
        sender.send(named, version=7)
    assert fresh.broadcasts() == {r: [[["uint8", n] for n in chunks]] for r in ("1", "2")}
    assert fresh.tensors("7")["1"] == expected(named)


def test_the_unpacked_wire_sends_each_tensor_as_its_own_dtype(fresh: StandIn) -> None:
    named = model(3)
    env = vllm_trainer_env([fresh.url], 2, timeout=TIMEOUT, packed=False)
    with WeightSender(env, report_to_pod=False) as sender:
        sender.send(named, version=3)
    assert bodies(fresh, "/init_weight_transfer_engine")[0]["init_info"]["packed"] is False
    assert bodies(fresh, "/update_weights")[0]["update_info"]["names"] == [n for n, _ in named]  # the given order
    assert fresh.broadcasts()["1"] == [[[wire.dtype_name(t.dtype), t.numel()] for _, t in named]]
    assert fresh.tensors("3")["2"] == expected(named)


def test_dtypes_outside_vllms_nccl_map_arrive_packed_bit_exact(fresh: StandIn) -> None:
    g = torch.Generator().manual_seed(5)
    named = [("m.mask", torch.rand(7, generator=g) > 0.5),
             ("m.e5m2", torch.randn(3, 5, generator=g).to(torch.float8_e5m2)),
             ("m.i16", torch.randint(-999, 999, (5,), generator=g, dtype=torch.int16)),
             ("m.u16", torch.randint(0, 60000, (3,), generator=g, dtype=torch.int32).to(torch.uint16)),
             ("m.u32", torch.randint(0, 1 << 30, (3,), generator=g, dtype=torch.int64).to(torch.uint32)),
             ("m.u64", torch.randint(0, 1 << 62, (2,), generator=g, dtype=torch.int64).to(torch.uint64)),
             ("m.c64", torch.randn(3, generator=g, dtype=torch.complex64)),
             ("m.c128", torch.randn(2, 3, generator=g, dtype=torch.complex128)),
             ("m.w", torch.randn(4, 4, generator=g).to(torch.bfloat16))]
    env = vllm_trainer_env([fresh.url], 2, timeout=TIMEOUT, buffer_bytes=B)
    with WeightSender(env, report_to_pod=False) as sender:
        sender.send(named, version=1)
    assert fresh.tensors("1") == {"1": expected(named), "2": expected(named)}


def test_an_fp8_weight_and_its_fp32_scale_arrive_because_of_the_order_chosen(fresh: StandIn) -> None:
    named = [("layers.0.weight", torch.randn(3, 5).to(torch.float8_e4m3fn)),
             ("layers.0.weight_scale", torch.tensor([0.5])),
             ("layers.1.weight", torch.randn(4, 4).to(torch.bfloat16))]
    env = vllm_trainer_env([fresh.url], 2, timeout=TIMEOUT, buffer_bytes=B)
    with WeightSender(env, report_to_pod=False) as sender:
        sender.send(named, version=1)
    names = bodies(fresh, "/update_weights")[0]["update_info"]["names"]
    assert names.index("layers.0.weight") > names.index("layers.0.weight_scale")
    assert fresh.tensors("1")["1"] == expected(named)


def test_the_stand_in_fails_a_misaligned_order_as_vllm_does(fresh: StandIn, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same tensors in the given order: the scale's slice starts at byte 15 of the chunk, and the engine's
    view of it fails (storage_offset), which is why the trainer reorders."""
    monkeypatch.setattr(wire, "wire_order", lambda specs, limit: list(range(len(specs))))
    monkeypatch.setattr(wire, "misaligned", lambda specs, limit: [])
    named = [("layers.0.weight", torch.randn(3, 5).to(torch.float8_e4m3fn)), ("layers.0.weight_scale", torch.ones(1))]
    env = vllm_trainer_env([fresh.url], 2, timeout=TIMEOUT, buffer_bytes=B)
    with WeightSender(env, report_to_pod=False) as sender, pytest.raises(EngineError) as err:
        sender.send(named, version=1)
    assert err.value.step == "update_weights" and err.value.status == 500
    assert "storage_offset() must be divisible by 4" in err.value.body


def test_a_changed_tensor_list_is_sent_whole_and_an_unchanged_one_as_empty_lists(fresh: StandIn) -> None:
    env = vllm_trainer_env([fresh.url], 2, timeout=TIMEOUT, buffer_bytes=B)
    with WeightSender(env, report_to_pod=False) as sender:
        for version, extra in ((1, False), (2, False), (3, True), (4, True)):
            sender.send(model(version, extra=extra), version=version)
            assert fresh.tensors(str(version))["2"] == expected(model(version, extra=extra))
    lengths = [len(b["update_info"]["names"]) for b in bodies(fresh, "/update_weights")]
    assert lengths == [33, 0, 34, 0]


def test_two_servers_of_three_workers_get_their_rank_offsets_and_every_byte() -> None:
    with StandIn(3, timeout=TIMEOUT) as a, StandIn(3, timeout=TIMEOUT) as b:
        env = vllm_trainer_env([a.url, b.url], 3, timeout=TIMEOUT, buffer_bytes=B)
        with WeightSender(env, report_to_pod=False) as sender:
            report = sender.send(model(5), version=5)
            assert [a.state()["ranks"], b.state()["ranks"]] == [[1, 2, 3], [4, 5, 6]]
        assert report.acked == (1, 2, 3, 4, 5, 6)
        infos = [bodies(s, "/init_weight_transfer_engine")[0]["init_info"] for s in (a, b)]
        assert [(i["rank_offset"], i["world_size"]) for i in infos] == [(1, 7), (4, 7)]
        assert a.tensors("5") == {str(r): expected(model(5)) for r in (1, 2, 3)}
        assert b.tensors("5") == {str(r): expected(model(5)) for r in (4, 5, 6)}


def write_annotations(path: Path, epoch: int, world_size: int, endpoints: str | None = None) -> None:
    lines = [f'{EPOCH_ANNOTATION}="{epoch}"', f'{WORLD_SIZE_ANNOTATION}="{world_size}"']
    if endpoints is not None:
        lines.append(f'{ENDPOINTS_ANNOTATION}="{endpoints}"')
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def test_an_epoch_bump_reinitialises_every_server_without_a_new_trainer(tmp_path: Path) -> None:
    annotations = tmp_path / "annotations"
    write_annotations(annotations, 0, 5)
    with StandIn(2, timeout=TIMEOUT) as a, StandIn(2, timeout=TIMEOUT) as b:
        env = vllm_trainer_env([a.url, b.url], 2, timeout=TIMEOUT, buffer_bytes=B,
                               annotations_file=str(annotations))
        with WeightSender(env, report_to_pod=False) as sender:
            assert sender.send(model(1), version=1).epoch == 0
            write_annotations(annotations, 1, 5)  # a pod was replaced: the operator's new epoch
            report = sender.send(model(2), version=2)
            assert report.epoch == 1 and report.formation_seconds > 0
            for server in (a, b):
                assert server.steps() == [*FORM_STEPS, *SYNC_STEPS, *FORM_STEPS, *SYNC_STEPS]
                assert server.state()["leaked_groups"] == 0
                assert [len(u["update_info"]["names"]) for u in bodies(server, "/update_weights")] == [33, 33]
                assert server.tensors("2")[str(server.state()["ranks"][0])] == expected(model(2))


def test_a_scale_through_the_endpoints_annotation_reaches_the_new_server(tmp_path: Path) -> None:
    """The engines are http://<endpoint>:<engine port>: two loopback addresses, one port."""
    annotations = tmp_path / "annotations"
    with StandIn(1, timeout=TIMEOUT) as a, StandIn(1, "--host", "127.0.0.2", timeout=TIMEOUT, port=a.port) as b:
        write_annotations(annotations, 0, 2, "127.0.0.1")
        env = vllm_trainer_env([], 1, timeout=TIMEOUT, buffer_bytes=B, annotations_file=str(annotations),
                               engine_port=a.port, world_size=2)
        with WeightSender(env, report_to_pod=False) as sender:
            sender.send(model(1), version=1)
            assert b.requests() == []
            write_annotations(annotations, 1, 3, "127.0.0.1,127.0.0.2")
            report = sender.send(model(2), version=2)
        assert report.acked == (1, 2) and report.epoch == 1
        assert bodies(b, "/init_weight_transfer_engine")[0]["init_info"]["rank_offset"] == 2
        assert b.tensors("2") == {"2": expected(model(2))} and a.tensors("2") == {"1": expected(model(2))}


def test_the_rendezvous_forms_of_nccl_say_what_vllm_reads() -> None:
    """The unique-id form puts the id in init_info (standard base64, 128 bytes); the TCP-store form puts the
    pickled id at broadcast_from/0/0 of a TCPStore on the master port (read back here without unpickling)."""
    import torch.distributed as dist

    for form in ("unique-id", "tcp-store"):
        env = vllm_trainer_env(["http://127.0.0.1:9"], 2, backend="nccl", vllm_rendezvous=form)
        sender = VllmSender(env, device="cpu")
        try:
            sender.engines = [EngineClient("http://127.0.0.1:9", 1.0, (1, 2))]
            infos, _ = sender._rendezvous(3, 2)
            (info,) = infos
            if form == "unique-id":
                assert set(info) == {"rank_offset", "world_size", "packed", "packed_buffer_size_bytes",
                                     "packed_num_buffers", "nccl_unique_id_b64"}
                assert len(base64.b64decode(info["nccl_unique_id_b64"], validate=True)) == 128
            else:
                assert (info["master_address"], info["master_port"]) == ("127.0.0.1", env.master_port)
                assert "nccl_unique_id_b64" not in info
                client = dist.TCPStore("127.0.0.1", env.master_port, None, False)
                assert len(unique_id_from_pickle(client.get(wire.UNIQUE_ID_KEY))) == 128
        finally:
            sender.close()


def test_an_inference_pod_of_protocol_vllm_has_no_receiver() -> None:
    envs = group_envs(1, 1, protocol="vllm", port=free_port())
    with pytest.raises(ValueError, match=r"WEIGHTSYNC_PROTOCOL='vllm'.*stock vllm servers"):
        WeightReceiver(envs[1])
