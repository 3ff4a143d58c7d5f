"""Protocol `vllm` on NCCL: the trainer's communicator (one GPU), and the trainer against a stand-in vLLM
server whose workers join through runtime/nccl.py (two GPUs: trainer on cuda:0, the engine on cuda:1), in
both rendezvous forms."""

from __future__ import annotations

import pytest
import torch
from weightsync.runtime.local import vllm_trainer_env

B = 1 << 16


def _model(version: int, device: str) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(version)
    out = []
    for layer in range(3):
        p = f"model.layers.{layer}."
        out += [(p + "w", torch.randn(64, 48, generator=g).to(torch.bfloat16)),
                (p + "q", torch.randn(5, 7, generator=g).to(torch.float8_e4m3fn)),
                (p + "s", torch.randn(1, generator=g)),
                (p + "t", torch.randn(40, 30, generator=g).t()),
                (p + "i", torch.randint(-9, 9, (5,), generator=g)),
                (p + "e", torch.empty(0, 2))]
    out.append(("big", torch.randn(40000, generator=g)))  # over the buffer: a chunk of its own, no copy
    return [(n, t.to(device)) for n, t in out]


@pytest.mark.single_gpu
def test_the_trainers_nccl_communicator_warms_up_broadcasts_every_dtype_and_packs_in_wire_order() -> None:
    """A one-rank communicator (no peer needed): the warm-up all-reduce, typed broadcasts of every dtype vLLM
    receives (0 elements too), and the packing lane, whose chunk holds the bytes in wire order."""
    from weightsync.runtime import vllm_wire as wire
    from weightsync.runtime.nccl import new_unique_id
    from weightsync.runtime.vllm_comm import NcclEngineComm
    from weightsync.runtime.vllm_sender import VllmSender, plan_layout

    device = torch.device("cuda", 0)
    comm = NcclEngineComm(new_unique_id(), 1, device, lambda: None)
    try:
        comm.warm_up(lambda: None)
        for name in wire.UNPACKED_DTYPES:
            for n in (0, 3):
                comm.broadcast(torch.zeros(n, dtype=getattr(torch, name), device=device), None)
        comm.finish(lambda: None)
        env = vllm_trainer_env(["http://127.0.0.1:9"], 1, backend="nccl", buffer_bytes=1 << 20)
        sender = VllmSender(env, device=device)
        named = _model(1, "cuda:0")[:-1]
        layout = plan_layout(named, True, 1 << 20)
        assert len(layout.chunks) == 1
        comm.start()
        sender._send_packed(comm, layout, [t for _, t in named], lambda: None)
        comm.finish(lambda: None)
        want = torch.cat([named[i][1].contiguous().reshape(-1).view(torch.uint8) for i in layout.order])
        assert torch.equal(sender._ring[0][: layout.total_bytes], want)
        sender.close()
    finally:
        comm.close()


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["unique-id", "tcp-store"])
@pytest.mark.parametrize("packed", [True, False])
def test_a_trainer_syncs_a_stand_in_vllm_server_over_nccl(form: str, packed: bool) -> None:
    from standins import StandIn, expected
    from weightsync.runtime import WeightSender

    with StandIn(1, "--comm", "nccl", "--devices", "cuda:1", timeout=60) as server:
        env = vllm_trainer_env([server.url], 1, backend="nccl", timeout=60, buffer_bytes=B, packed=packed,
                               vllm_rendezvous=form)
        with WeightSender(env, device="cuda:0", report_to_pod=False) as sender:
            for version in (1, 2):
                report = sender.send(_model(version, "cuda:0"), version=version)
                assert report.transport.startswith("vllm nccl")
                assert server.tensors(str(version)) == {"1": expected(_model(version, "cpu"))}
