"""The soak: the demo group on the sandbox through a seeded series of random member kills and stalls.

    python bench/soak.py --seed 1 --faults 30 --min-syncs 50 --out bench/results/soak-<date>.json

Starts a sandbox of its own (or uses --state-dir), `helm install`s the operator, applies the demo group
(1 trainer + 2 inference replicas x 2 workers, gloo, a short rendezvous timeout, `DEMO_BALLAST_MB` so a
sync lasts long enough to be hit in the middle), and then, fault after fault:

1. waits a random moment (0 to 1.5 syncs' time after the last verified sync: faults land mid-sync or idle);
2. injects a random fault (`--seed`: the same seed gives the same series of choices): SIGKILL of an
   inference pod, of one inference worker process, of the trainer; SIGSTOP of a worker or of the trainer
   for less than the timeout (nothing may fail) or for longer (the group heals in place), then SIGCONT;
3. waits, bounded (`--recover-bound`), for the group to be Ready with every member and for a sync after the
   fault verified on every worker (the demo's checksums), and records the recovery time (from the end of
   the fault to that sync's last proof, by the node's log timestamps) and the restarts it cost.

A wait that runs past its bound is a hang: recorded, and the soak stops. At the end every sync the trainer
reported and every `status.lastSync` seen is audited against the workers' proofs (tests/support/faults.py):
no version may be reported as synced that a worker does not hold. The result is one JSON document: the seed,
the command, each fault, recovery median and worst per kind and overall, syncs, lies, hangs.

`run()` is also the short e2e test (tests/e2e/test_soak.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))

import faults  # noqa: E402

run_demo = faults.run_demo

NAME = "demo"
TRAINER = f"{NAME}-trainer-0"
ENGINES = (f"{NAME}-inference-0", f"{NAME}-inference-1")
#: rendezvous.timeoutSeconds of the soak's group (every runtime wait and the heartbeat threshold).
TIMEOUT = 10.0
BALLAST_MB = 4
#: failurePolicy.maxBackoffSeconds of the soak's group (see `manifest`).
MAX_BACKOFF_S = 2.0
KINDS = ("kill-inference-pod", "kill-worker", "kill-trainer", "stop-worker-short", "stop-worker-long",
         "stop-trainer-short", "stop-trainer-long")


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Hang(Exception):
    """A wait ran past its bound."""


@dataclass
class Fault:
    n: int
    kind: str
    target: str
    at_s: float  # since the soak's first fault
    delay_s: float  # after the last verified sync
    length_s: float  # how long the fault lasted (a stop), 0 for a kill
    landed: str  # "mid-sync" (the trainer was sending) or "idle", from the trainer's log
    recovery_s: float = 0.0
    restarts: int = 0  # status.restarts it cost
    epochs: int = 0  # epochs it cost
    error: str = ""


@dataclass
class Soak:
    seed: int
    command: str
    timeout_s: float = TIMEOUT
    ballast_mb: int = BALLAST_MB
    max_backoff_s: float = MAX_BACKOFF_S
    faults: list[Fault] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    syncs_reported: int = 0
    syncs_verified: int = 0
    last_syncs_seen: int = 0
    lies: list[str] = field(default_factory=list)
    unproven: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        def stats(values: list[float]) -> dict[str, Any]:
            return {"count": len(values), "median_s": round(statistics.median(values), 2) if values else None,
                    "worst_s": round(max(values), 2) if values else None}

        done = [f for f in self.faults if not f.error]
        by_kind = {k: stats([f.recovery_s for f in done if f.kind == k]) for k in KINDS}
        return {"recovery": stats([f.recovery_s for f in done]), "recovery_by_kind": by_kind,
                "restarts": sum(f.restarts for f in self.faults), "hangs": len(self.hangs), "lies": len(self.lies),
                "syncs_reported": self.syncs_reported, "syncs_verified": self.syncs_verified}


class Group:
    """The soak's view of its group: status through the API server, logs from the node's disk."""

    def __init__(self, sandbox: Any, namespace: str, api_client: Any) -> None:
        self.sandbox = sandbox
        self.namespace = namespace
        self.watcher = run_demo.GroupWatcher(api_client, namespace, NAME)
        self.ledger = faults.Ledger(sandbox, namespace, NAME)

    def status(self) -> dict[str, Any]:
        try:
            status = self.watcher.status()
        except Exception:  # the API server is busy: the caller's wait goes on
            return {}
        self.ledger.observe_status(status)
        return status

    def wait(self, condition: Callable[[], Any], bound: float, what: str) -> Any:
        try:
            return faults.poll(condition, bound, what, interval=0.2)
        except TimeoutError as err:
            raise Hang(str(err)) from None

    def ready(self, bound: float) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            st = self.status()
            ready, _, total = (st.get("ready") or "0/?").partition("/")
            return st if st.get("phase") == "Ready" and ready == total else None

        return dict(self.wait(check, bound, "the group to be Ready with every member"))

    def verified_after(self, after: float, bound: float) -> tuple[float, Any]:
        def found() -> tuple[float, Any] | None:
            self.ledger.read()
            return next(iter(self.ledger.verified_syncs(after)), None)

        return tuple(self.wait(found, bound, "a sync verified on every worker"))  # type: ignore[return-value]


def manifest() -> dict[str, Any]:
    ws = run_demo.demo_manifest(NAME, steps=0, interval=0.2, timeout=TIMEOUT, ballast_mb=BALLAST_MB, backoff=1.0)
    ws["spec"]["failurePolicy"]["maxRestarts"] = 10_000  # the soak counts restarts; it never wants Failed
    # The backoff doubles with every restart over the object's life (up to maxBackoffSeconds, 60 s by default):
    # thirty faults in twenty minutes would measure the configured backoff, not the recovery.
    ws["spec"]["failurePolicy"]["maxBackoffSeconds"] = MAX_BACKOFF_S
    return ws


def _sending(group: Group) -> bool:
    t = [r for r in group.ledger.read(TRAINER) if r.text.startswith("[trainer ")]
    return bool(t) and faults.SENDING.search(t[-1].text) is not None


def inject(group: Group, kind: str, rng: random.Random) -> tuple[str, float, Callable[[], None]]:
    """Start the fault; (its target, how long it lasts, what ends it)."""
    sb, ns = group.sandbox, group.namespace
    if kind == "kill-inference-pod":
        pod = rng.choice(ENGINES)
        faults.kill_pod(sb, ns, pod)
        return pod, 0.0, lambda: None
    if kind == "kill-worker":
        pod, local = rng.choice(ENGINES), rng.randrange(2)
        faults.signal_all([faults.worker_pid(sb, ns, pod, local)], signal.SIGKILL)
        return f"{pod} worker {local}", 0.0, lambda: None
    if kind == "kill-trainer":
        faults.kill_pod(sb, ns, TRAINER)
        return TRAINER, 0.0, lambda: None
    length = rng.uniform(0.2, 0.6) * TIMEOUT if kind.endswith("-short") else rng.uniform(1.1, 1.5) * TIMEOUT
    if kind.startswith("stop-worker"):
        pod, local = rng.choice(ENGINES), rng.randrange(2)
        pids, target = [faults.worker_pid(sb, ns, pod, local)], f"{pod} worker {local}"
    else:
        pids, target = [faults.container_pid(sb, ns, TRAINER)], TRAINER  # the trainer's main process
    faults.signal_all(pids, signal.SIGSTOP)
    return target, length, lambda: faults.signal_all(pids, signal.SIGCONT)


def run(sandbox: Any, namespace: str, api_client: Any, seed: int, n_faults: int, min_syncs: int,
        recover_bound: float = 240.0, form_bound: float = 300.0, command: str = "") -> Soak:
    rng = random.Random(seed)
    log(f"seed {seed}: {n_faults} faults, at least {min_syncs} syncs, every wait bounded ({recover_bound:.0f}s)")
    soak = Soak(seed, command)
    group = Group(sandbox, namespace, api_client)
    sandbox.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest()))
    began = time.time()
    try:
        group.verified_after(0.0, form_bound)
        group.ready(form_bound)
        first = time.time()
        n = 0
        while n < n_faults or group.ledger.audit().verified < min_syncs:
            n += 1
            kind = rng.choice(KINDS)
            group.ledger.read()
            last_at, last = group.ledger.verified_syncs()[-1]
            delay = rng.uniform(0.0, 1.5) * max(float(run_demo.fields(last.line).get("seconds", 1.0)), 0.3)
            faults.poll(lambda: time.time() >= last_at + delay, recover_bound, "the fault's moment")  # noqa: B023
            before = group.status()
            landed = "mid-sync" if _sending(group) else "idle"
            t0 = time.time()
            fault = Fault(n, kind, "", round(t0 - first, 2), round(delay, 2), 0.0, landed)
            try:
                fault.target, length, end = inject(group, kind, rng)
            except (LookupError, AssertionError, OSError) as err:  # the target was being replaced itself
                fault.error = f"not injected: {err}"
                soak.faults.append(fault)
                log(f"fault {n}: {kind} not injected ({err})")
                continue
            if length:
                faults.poll(lambda: time.time() >= t0 + length, length + 5, "the stop to last")  # noqa: B023
                end()
            t1 = time.time()
            fault.length_s = round(t1 - t0, 2)
            at, sent = group.verified_after(t1, recover_bound)
            while sent.acked != 4:  # a sync at a full group (not one that raced the fault's detection)
                at, sent = group.verified_after(at, recover_bound)
            status = group.ready(recover_bound)
            fault.recovery_s = round(at - t1, 2)
            fault.restarts = int(status.get("restarts") or 0) - int(before.get("restarts") or 0)
            fault.epochs = int(status.get("epoch") or 0) - int(before.get("epoch") or 0)
            soak.faults.append(fault)
            log(f"fault {n}: {kind} on {fault.target} ({landed}, {fault.length_s:.1f}s): recovered in "
                f"{fault.recovery_s:.1f}s, {fault.restarts} restarts, {fault.epochs} epochs")
    except Hang as err:
        soak.hangs.append(str(err))
        log(f"HANG: {err}")
    audit = group.ledger.settle()
    soak.syncs_reported, soak.syncs_verified = audit.syncs, audit.verified
    soak.lies, soak.unproven = audit.lies, audit.unproven
    soak.last_syncs_seen = len(group.ledger.last_syncs)
    soak.seconds = round(time.time() - began, 1)
    log(f"done in {soak.seconds:.0f}s: {audit}; summary {json.dumps(soak.summary())}")
    return soak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=None, help="the series of faults (default: a new one, printed)")
    parser.add_argument("--faults", type=int, default=30)
    parser.add_argument("--min-syncs", type=int, default=50)
    parser.add_argument("--recover-bound", type=float, default=240.0, help="seconds any one wait may last")
    parser.add_argument("--state-dir", type=Path, default=None, help="a sandbox to use (default: a fresh one)")
    parser.add_argument("--out", type=Path, default=None, help="the JSON result")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    print(f"seed {seed}", flush=True)

    from kubernetes import config
    from weightsync.sandbox import Sandbox

    state_dir = args.state_dir or Path.home() / ".cache" / "weightsync" / f"sandbox-soak-{os.getpid()}"
    sandbox = Sandbox(state_dir)
    was_running = sandbox.status().running
    sandbox.up()
    namespace = "soak"
    soak = None
    try:
        run_demo.install_operator(sandbox)
        sandbox.kubectl("create", "namespace", namespace, check=False)
        api = config.new_client_from_config(config_file=str(sandbox.kubeconfig))
        command = shlex.join(["python", "bench/soak.py", "--seed", str(seed), "--faults", str(args.faults),
                              "--min-syncs", str(args.min_syncs)] + (["--out", str(args.out)] if args.out else []))
        soak = run(sandbox, namespace, api, seed, args.faults, args.min_syncs, args.recover_bound, command=command)
    finally:
        sandbox.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        if not was_running:
            sandbox.down()
            # A sandbox of its own is ~70 MB of logs and etcd data: kept to read when the soak failed.
            if args.state_dir is None and soak is not None and not soak.hangs and not soak.lies:
                shutil.rmtree(state_dir, ignore_errors=True)
            else:
                print(f"the sandbox's logs and state are kept in {state_dir}", flush=True)
    doc = {"seed": soak.seed, "command": soak.command, "date": time.strftime("%Y-%m-%d"),
           "machine": f"{os.cpu_count()} cores, shared", "summary": soak.summary(), **asdict(soak)}
    text = json.dumps(doc, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(json.dumps(doc["summary"], indent=1))
    return 0 if not soak.hangs and not soak.lies else 1


if __name__ == "__main__":
    sys.exit(main())
