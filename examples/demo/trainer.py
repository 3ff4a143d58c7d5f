"""The demo trainer: trains TinyLM on synthetic data and syncs its weights to every inference worker.

Runs in the trainer pod of a WeightSync (the operator injects the WEIGHTSYNC_* environment):

    python trainer.py --steps 8 --interval 1

After each optimizer step it sends the whole state (`model.state_dict()`: parameters and buffers of mixed
dtypes) as version = step and prints one line per sync, which the demo and the e2e tests read:

    sync v=3 epoch=0 loss=6.0123 checksum=<16 hex> output=<16 hex> mean=... tensors=32 bytes=... gbps=...

`checksum` hashes the state it sent and `output` the logits on a fixed input; an inference worker that
received version v prints the same two values computed on its own copy of the model.

When a member is lost the send raises PeerLostError; the operator bumps the epoch, and the next send
waits for it, re-forms the group and sends the same version again. After the last step the trainer keeps
its weights and re-sends the last version whenever the epoch changes (a member was replaced, the group
was scaled), so a new member always gets the current weights. `--steps 0` trains until stopped.

The weights of a fresh trainer are seeded from `--seed`, or from the pod's name and start time when it is
not given: a trainer pod that is re-created starts from scratch (step 1, new weights) unless you give it a
checkpoint to resume from (a volume; not done here).
"""

from __future__ import annotations

import argparse
import faulthandler
import itertools
import logging
import os
import signal
import socket
import sys
import time
import zlib

import demo_log
import torch
from demo_model import build_model, checksum, checksum_of, probe, train_step
from weightsync.runtime import ConfigMismatchError, RendezvousError, SyncReport, WeightSender, WeightSyncError

#: Consecutive failed attempts at one sync before the trainer gives up (its pod then fails and the
#: operator re-creates it, within the WeightSync's failurePolicy); members still arriving at the group's
#: first formation do not count (see `sync`).
MAX_ATTEMPTS = 5


def log(message: str) -> None:
    demo_log.emit(f"[trainer {time.strftime('%H:%M:%S')}] {message}")  # one write call per line


_stopping = False


def on_sigterm(signum: int, frame: object) -> None:
    """The pod is being deleted: exit at once. The SystemExit may surface as another exception (a send
    interrupted while a peer is also going away fails as PeerLostError), so `sync` checks `_stopping` too."""
    global _stopping
    _stopping = True
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(0)


def weights(sender: WeightSender, model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """What is sent: the whole state to weightsync receivers; to vLLM engines (protocol vllm) the parameters,
    in checkpoint names, as vLLM's load_weights takes them (its wire has no bool, which the mask is)."""
    if sender.env.protocol == "vllm":
        return list(model.named_parameters())
    return list(model.state_dict().items())


def wait_for_a_change(sender: WeightSender, failures: int) -> None:
    """After a failed sync: until the operator moves the epoch (a lost member is being replaced), for at most
    a backoff of 1, 2, 4 ... 30 s. A failure that ends at once (an engine that is gone refuses connections)
    would otherwise spend every attempt before the replacement exists."""
    epoch, until = sender.env.current_epoch(), time.monotonic() + min(30.0, 2.0 ** (failures - 1))
    while time.monotonic() < until and not _stopping and sender.env.current_epoch() == epoch:
        time.sleep(0.2)


def sync(sender: WeightSender, model: torch.nn.Module, version: int) -> SyncReport:
    """Send the model's state as `version`, re-trying when the sync fails: the group re-forms (by itself, or at
    the operator's next epoch when a pod died). The trainer outlives every inference-side failure; only a
    configuration that can never work (a mismatch) ends it, or MAX_ATTEMPTS failures of its own in a row.

    A failure that names other members as its cause (`members_at_fault`: lost, stalled, not arrived within the
    timeout) is not the trainer's: the operator replaces a pod that died, a stalled member re-joins, a pod may
    still be starting (an image pull, an engine loading its model; the Ready condition says which). A trainer
    that gave up would only be re-created to wait again, at the cost of a restart and its training state."""
    failures = 0
    for attempt in itertools.count(1):
        log(f"sending v={version} (attempt {attempt})")  # fault tests time their faults by this line
        try:
            return sender.send(weights(sender, model), version=version)
        except ConfigMismatchError:
            raise
        except WeightSyncError as err:
            if _stopping:
                raise SystemExit(0) from None
            others = err.caused_by_others(0)  # not the trainer's own failure
            failures += 0 if others else 1
            log(f"sync v={version} failed (attempt {attempt}, failure {failures}/{MAX_ATTEMPTS}): {err}")
            if failures >= MAX_ATTEMPTS:
                break
            log("members have not arrived (starting, or being replaced): waiting for them"
                if isinstance(err, RendezvousError) and others else "re-forming the group and sending again")
            wait_for_a_change(sender, failures)
    raise SystemExit(f"sync v={version} failed {MAX_ATTEMPTS} times in a row; giving up")


def sent_checksum(sender: WeightSender, model: torch.nn.Module) -> str:
    return checksum_of(weights(sender, model)) if sender.env.protocol == "vllm" else checksum(model)


def report_line(report: SyncReport, model: torch.nn.Module, loss: float, sent: str) -> str:
    output, mean = probe(model)
    return demo_log.sync_line(report, loss, sent, output, mean)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="training steps, one sync each (0: until stopped)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between steps (a demo's pace)")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    parser.add_argument("--seed", type=int, default=None, help="weights and data seed (default: a new one)")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="[%(name)s %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, on_sigterm)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1 <pid>: every thread's stack to the log

    seed = args.seed if args.seed is not None else zlib.crc32(f"{socket.gethostname()}-{time.time_ns()}".encode())
    model = build_model(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    sender = WeightSender.from_env()
    env = sender.env
    log(f"start: pod {socket.gethostname()} pid {os.getpid()} seed {seed}; group {env.namespace}/{env.name}, "
        f"world size {env.world_size}, backend {env.backend}, buffers {env.num_buffers} x {env.buffer_bytes} B; "
        f"no checkpoint: training starts at step 1")

    step, loss = 0, float("nan")
    last_epoch = -1
    try:
        while args.steps == 0 or step < args.steps:
            step += 1
            loss = train_step(model, optimizer, step, seed)
            report = sync(sender, model, step)
            last_epoch = report.epoch
            log(report_line(report, model, loss, sent_checksum(sender, model)))
            time.sleep(args.interval)
        log(f"training done after {step} steps; holding v={step} and re-sending it whenever the group re-forms")
        while not _stopping:
            epoch = env.current_epoch()
            if epoch != last_epoch:
                report = sync(sender, model, step)
                last_epoch = report.epoch
                log(report_line(report, model, loss, sent_checksum(sender, model)))
            time.sleep(0.5)
    finally:
        sender.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
