"""An FSDP2 trainer of several pods: the demo's TinyLM sharded with `fully_shard` over every rank of a torchrun
job that spans the WeightSync's trainer pods, each rank syncing its weights to the inference workers.

Each trainer pod runs it through torchrun, whose arguments come from the environment the operator gives every
trainer pod (see ../fsdp.yaml and docs/guide.md, "A trainer of several pods"):

    torchrun --nnodes $WEIGHTSYNC_TRAINER_PODS --node-rank $WEIGHTSYNC_TRAINER_POD_INDEX \\
             --nproc-per-node $WEIGHTSYNC_TRAINER_RANKS_PER_POD --master-addr $WEIGHTSYNC_MASTER_ADDR \\
             --master-port 29400 trainer.py --steps 8

The job's own port (29400) is not the sync group's rendezvous port (WEIGHTSYNC_MASTER_PORT), which the
weightsync runtime listens on in trainer pod 0. The job is gloo on CPU here; on GPUs it would be nccl.

Every rank creates a `WeightSender` and calls `send(model.named_parameters(), version=step)`: the parameters
are DTensors (each rank holds its shard); rank 0 of the job sends, each tensor gathered just in time on every
rank, and the others only join the gathers. Rank 0 prints one line per sync, in the demo trainer's format,
which the demo's inference workers (../demo/inference.py) answer with theirs:

    sync v=3 epoch=0 loss=6.0123 checksum=<16 hex> output=<16 hex> mean=... tensors=30 bytes=... gbps=...

`checksum` hashes the whole state of the model (../demo/demo_model.py: its parameters, gathered whole after
the sync, and its buffers, which training leaves as built, like an inference worker's) and `output` the
logits of that whole model on a fixed input; a worker that loaded version v prints the same two values.

After the last step (`--steps 0`: train until stopped) the job keeps its weights and re-sends the last version
whenever the epoch changes (an inference pod was replaced, the group was scaled). The ranks decide that
together (an all-reduce of the epoch each rank reads), so that they all call `send` the same number of times.

A failure: a receiver lost makes `send` raise the same error on every rank; the job re-sends (the group
re-forms). A trainer rank lost (its pod died) raises `TrainerJobError` on the others: the job's collectives
are out of step, so every rank exits, torchrun ends the pod, and the operator re-creates every trainer pod at
a new epoch. This example keeps no checkpoint: a re-created job starts again at step 1 from new weights.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import socket
import sys
import time
import zlib
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "demo"))  # the demo's model and log helpers

import demo_log
import torch
import torch.distributed as dist
import torch.nn.functional as F
from demo_model import VOCAB, TinyLM, batch, build_model, checksum, probe
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from weightsync.runtime import (
    ConfigMismatchError,
    SyncReport,
    TrainerJobError,
    WeightSender,
    WeightSyncError,
)

#: Consecutive failed attempts at one sync before the job gives up (as the demo trainer).
MAX_ATTEMPTS = 5
#: The bound on the job's own collectives (a peer that went away fails them at once; one that hangs, by this).
JOB_TIMEOUT = timedelta(seconds=60)

RANK = int(os.environ.get("RANK", "0"))


def log(message: str) -> None:
    who = "trainer" if RANK == 0 else f"trainer rank {RANK}"
    demo_log.emit(f"[{who} {time.strftime('%H:%M:%S')}] {message}")  # one write call per line


def on_sigterm(signum: int, frame: object) -> None:
    """The pod is being deleted (torchrun passes the signal on): exit at once, as the demo trainer does."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os._exit(0)


def job_lost(err: BaseException) -> None:
    """The job's collectives are out of step (a gather was abandoned) or a peer is gone: leave at once, without
    tearing the process group down (that would wait on the lost peer); torchrun ends the pod with our code."""
    log(f"the trainer job is lost: {err}; exiting (the operator re-creates every trainer pod)")
    os._exit(1)


def agreed(value: int, op: dist.ReduceOp.RedOpType = dist.ReduceOp.MAX) -> int:
    """`value` reduced over every rank of the job (a collective: every rank calls it at the same point)."""
    t = torch.tensor([value], dtype=torch.int64)
    try:
        dist.all_reduce(t, op=op)
    except RuntimeError as err:  # a rank of the job is gone
        job_lost(err)
    return int(t.item())


def shard(model: TinyLM, world: int) -> TinyLM:
    """FSDP2 over the whole job. FSDP2 gathers the parameters of one group together and wants them of one dtype;
    TinyLM mixes them on purpose, so: each norm, the embedding and the head are groups of their own (float32),
    each block keeps its four bfloat16 projections (it calls them itself, inside its forward), and the root keeps
    the float16 positional table."""
    mesh = init_device_mesh("cpu", (world,))
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm | torch.nn.Embedding) or module is model.head:
            fully_shard(module, mesh=mesh)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def train_step(model: TinyLM, optimizer: torch.optim.Optimizer, step: int, seed: int) -> float:
    """One step on this rank's part of the batch; FSDP2 reduces the gradients over the job."""
    inputs, targets = batch(step, (seed + 7919 * RANK) % 2**32, size=16)  # each rank its own data
    loss = F.cross_entropy(model(inputs).reshape(-1, VOCAB), targets.reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def sync(sender: WeightSender, model: TinyLM, version: int) -> SyncReport:
    """Send the parameters as `version` on every rank, re-trying while the group re-forms (as the demo trainer
    does). Every rank gets the same outcome (rank 0's), so every rank re-tries the same number of times."""
    failures = 0
    attempt = 0
    while True:
        attempt += 1
        if RANK == 0:
            log(f"sending v={version} (attempt {attempt})")
        try:
            return sender.send(model.named_parameters(), version=version)
        except TrainerJobError as err:  # a rank of this job failed: it cannot go on
            job_lost(err)
        except ConfigMismatchError:
            raise
        except WeightSyncError as err:  # only failures of the trainer's own count (as in the demo trainer)
            failures += agreed(0 if err.caused_by_others(0) else 1)  # the same count on every rank
            log(f"sync v={version} failed (attempt {attempt}, failure {failures}/{MAX_ATTEMPTS}): {err}")
            if failures >= MAX_ATTEMPTS:
                raise SystemExit(f"sync v={version} failed {MAX_ATTEMPTS} times in a row; giving up") from None
            wait_for_a_change(sender, max(failures, 1))


def wait_for_a_change(sender: WeightSender, failures: int) -> None:
    """After a failed sync: until the operator moves the epoch, for at most 1, 2, 4 ... 30 s (every rank polls
    the same number of times and stops at the same poll)."""
    epoch = agreed(sender.env.current_epoch())
    for _ in range(int(min(30.0, 2.0 ** (failures - 1)) / 0.2)):
        if agreed(sender.env.current_epoch()) != epoch:
            return
        time.sleep(0.2)


def fingerprint(model: TinyLM, whole: TinyLM) -> tuple[str, str, float]:
    """(checksum, output, mean) of the whole model: every parameter gathered (on every rank, in order) into
    `whole`, rank 0's plain copy, which alone computes them. For the log's proof only: `send` needs no copy."""
    params = dict(whole.named_parameters()) if RANK == 0 else {}
    try:
        with torch.no_grad():
            for name, p in model.named_parameters():
                full = p.full_tensor()  # type: ignore[operator]
                if RANK == 0:
                    params[name].copy_(full)
    except RuntimeError as err:  # a rank is gone
        job_lost(err)
    if RANK != 0:
        return "", "", 0.0
    output, mean = probe(whole)
    return checksum(whole), output, mean


def synced(sender: WeightSender, model: TinyLM, whole: TinyLM, version: int, loss: float) -> int:
    """Sync `version`, log it (rank 0) and return the epoch it reached."""
    report = sync(sender, model, version)
    fp = fingerprint(model, whole)
    if RANK == 0:
        log(demo_log.sync_line(report, loss, *fp))  # the demo trainer's line: its engines answer it
    else:
        log(f"sync v={report.version} at epoch {report.epoch}: joined the gathers")
    return report.epoch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="training steps, one sync each (0: until stopped)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between steps (a demo's pace)")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="[%(name)s %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, on_sigterm)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1 <pid>: every thread's stack to the log

    dist.init_process_group("gloo", timeout=JOB_TIMEOUT)  # torchrun's MASTER_ADDR, RANK, WORLD_SIZE
    world = dist.get_world_size()
    seed_t = torch.tensor([zlib.crc32(f"{socket.gethostname()}-{time.time_ns()}".encode())], dtype=torch.int64)
    dist.broadcast(seed_t, src=0)  # one initial model for the whole job (rank 0's seed), new at each start
    seed = int(seed_t.item())
    model = shard(build_model(seed, ballast=0), world)
    whole = build_model(0, ballast=0)  # rank 0's plain copy, for the fingerprints
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    sender = WeightSender.from_env()  # on every rank: rank 0 sends, the others join the gathers
    env = sender.env
    log(f"start: pod {socket.gethostname()} pid {os.getpid()} job rank {RANK}/{world} (pod "
        f"{env.trainer_pod_index} of {env.trainer_pods}, {env.trainer_ranks_per_pod} per pod) seed {seed}; group "
        f"{env.namespace}/{env.name}, world size {env.world_size}, backend {env.backend}; no checkpoint: "
        f"training starts at step 1")

    step, loss, last_epoch = 0, float("nan"), -1
    try:
        while args.steps == 0 or step < args.steps:
            step += 1
            try:
                loss = train_step(model, optimizer, step, seed)
            except RuntimeError as err:  # the job's own collectives: a rank is gone
                job_lost(err)
            last_epoch = synced(sender, model, whole, step, loss)
            time.sleep(args.interval)
        log(f"training done after {step} steps; holding v={step} and re-sending it whenever the group re-forms")
        while True:
            if agreed(env.current_epoch()) != last_epoch:
                last_epoch = synced(sender, model, whole, step, loss)
            time.sleep(0.5)
    finally:
        sender.close()


if __name__ == "__main__":
    sys.exit(main())
