"""The demo inference engine: one process per worker, each receiving the trainer's weights into its own
copy of TinyLM and proving that it holds them.

Runs in an inference pod of a WeightSync (the operator injects the WEIGHTSYNC_* environment):

    python inference.py

starts WEIGHTSYNC_LOCAL_WORLD_SIZE worker processes (local ranks 0..k-1, like the tensor-parallel
workers of an engine) and waits for them; when one ends, the others are stopped and the pod ends with
its exit code, so the operator sees the failure and re-forms the group. Each worker builds its model from
its own seed (so only a sync can make it equal to the trainer's) and prints one line per sync received:

    loaded v=3 epoch=0 rank=2 checksum=<16 hex> output=<16 hex> mean=... style=loader seconds=...

`checksum` and `output` are computed exactly as the trainer computes its own (see demo_model.py); equal
values for one version prove this worker holds the trainer's weights and gives the same output.

Even local ranks receive straight into their parameters (`receive(into=...)`); odd ones go through a
loader callback taking batches of (name, tensor), the way vLLM's `load_weights` does.

The workers share the pod's log, so each gets its own stdout and stderr, which this process relays to the
container's line by line (demo_log.py): two workers' lines never become one line of the log.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable

import demo_log
import torch
from demo_model import build_model, checksum, probe
from weightsync.runtime import ConfigMismatchError, WeightReceiver, WeightSyncError

from weightsync.contract import MemberEnv

#: Consecutive failed receives of its own before a worker gives up (its pod then fails; the operator
#: re-creates it). A failure naming only other members (`members_at_fault`: the trainer being replaced,
#: another worker lost or stalled) does not count: the group re-forms without this worker's restart.
MAX_FAILURES = 5


_stopping = False


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """The pod is being deleted: exit at once (the pod's parent forwards the signal too: ignore a second).

    The SystemExit may surface as another exception (a receive interrupted while a peer is also going
    away fails as PeerLostError), so the receive loop checks `_stopping` too."""
    global _stopping
    _stopping = True
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(0)


def run_worker(local_rank: int) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(name)s %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1 <pid>: every thread's stack to the log
    receiver = WeightReceiver.from_env(local_rank=local_rank)
    name = f"inference {socket.gethostname()} worker {local_rank} rank {receiver.rank}"

    def log(message: str) -> None:
        demo_log.emit(f"[{name} {time.strftime('%H:%M:%S')}] {message}")  # one write call per line

    model = build_model(seed=1000 + receiver.rank)
    state = model.state_dict()  # tensors sharing storage with the parameters and buffers
    style = "into" if local_rank % 2 == 0 else "loader"

    first_batch = [True]

    def load_weights(batch: Iterable[tuple[str, torch.Tensor]]) -> None:
        """vLLM-style: the views are valid during the call, so copy them into the model."""
        if first_batch[0]:  # the data of a sync is arriving (fault tests time their faults by this line)
            first_batch[0] = False
            log("receiving: the first batch of a sync arrived")
        for key, tensor in batch:
            state[key].copy_(tensor)

    log(f"start: pid {os.getpid()}, own initial weights checksum={checksum(model)}, receiving with {style}")
    failures = 0
    while True:
        first_batch[0] = True
        try:
            report = receiver.receive(into=state) if style == "into" else receiver.receive(load_weights)
        except ConfigMismatchError as err:
            if _stopping:
                return 0
            log(f"giving up: {err}")
            return 1
        except WeightSyncError as err:  # the group re-forms (by itself, or at the operator's next epoch)
            if _stopping:
                return 0
            failures += 0 if err.caused_by_others(receiver.rank) else 1
            log(f"receive failed ({failures}/{MAX_FAILURES}): {err}")
            if failures >= MAX_FAILURES:
                return 1
            log("re-joining the group")
            continue
        failures = 0
        output, mean = probe(model)
        log(f"loaded v={report.version} epoch={report.epoch} rank={receiver.rank} checksum={checksum(model)} "
            f"output={output} mean={mean:.6f} style={style} tensors={report.tensors} bytes={report.bytes} "
            f"seconds={report.seconds:.4f} gbps={report.gbps:.3f} transport={report.transport}")


def run_pod() -> int:
    """Start one worker per local rank; when one ends, stop the others and end with its exit code."""
    workers = MemberEnv.from_env().local_world_size
    procs: list[subprocess.Popen[bytes]] = []
    relays = []
    for k in range(workers):  # each with its own stdout and stderr, relayed here in whole lines
        proc, threads = demo_log.spawn([sys.executable, os.path.abspath(__file__), "--worker", str(k)])
        procs.append(proc)
        relays += threads

    terminating = False

    def on_sigterm(signum: int, frame: object) -> None:
        nonlocal terminating
        terminating = True
        stop_workers()

    def stop_workers() -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)
    pid, status = os.wait()  # the first worker to end decides the pod's fate
    code = os.waitstatus_to_exitcode(status)
    ended = next(k for k, p in enumerate(procs) if p.pid == pid)
    demo_log.emit(f"[inference {socket.gethostname()}] worker {ended} ended with exit code {code}; "
                  "stopping the others")
    stop_workers()
    for k, p in enumerate(procs):
        if p.pid != pid:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            demo_log.emit(f"[inference {socket.gethostname()}] worker {k} ended with exit code {p.returncode}")
    demo_log.drain(relays)  # the workers' last lines reach the log before the pod ends
    if terminating:
        return 0
    return code if code != 0 else 1  # a worker never ends on its own while the group lives


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", type=int, default=None, help="(internal) run worker LOCAL_RANK")
    args = parser.parse_args()
    return run_pod() if args.worker is None else run_worker(args.worker)


if __name__ == "__main__":
    sys.exit(main())
