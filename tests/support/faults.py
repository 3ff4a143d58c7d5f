"""Faults for the demo group on the sandbox, and the ledger that judges what the group said about them.

Shared by the e2e fault matrix (tests/e2e/test_faults.py) and the soak (bench/soak.py).

The ledger reads every member log of a group from the node's disk (`<state>/pods/<ns>_<pod>_<uid8>/logs/`):
the logs of pods that were replaced are still there, they can be read while the API server is down, and
each line carries the time the node read it (CRI log records), so recovery times come from the logs, not
from how often a test polls. What it checks is the issue's rule: no version is reported as synced (a
trainer's `sync v=... epoch=...` line, `status.lastSync`) unless every worker holds it bit-exact (each
acknowledged rank logged `loaded` for that version and epoch with the trainer's checksum and output).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import demo_driver
from weightsync.sandbox import Sandbox, containerlog

run_demo = demo_driver.load()

OPERATOR_NAMESPACE = run_demo.OPERATOR_NAMESPACE
OPERATOR_SELECTOR = f"app.kubernetes.io/instance={run_demo.RELEASE}"


def _seconds(stamp: str) -> float:
    """An RFC 3339 time of a CRI log record (nanoseconds, `Z`) as seconds since the epoch."""
    if not stamp:
        return 0.0
    head, _, frac = stamp.rstrip("Z").partition(".")
    whole = datetime.fromisoformat(head + "+00:00").timestamp()
    return whole + (float(f"0.{frac}") if frac else 0.0)


# ------------------------------------------------------------------------------------------------ the ledger

#: A demo worker's own line (examples/demo/inference.py), and its pod's word that a worker process ended.
_WORKER_LINE = re.compile(r"^\[inference \S+ worker (?P<local>\d+) rank (?P<rank>\d+) ")
_WORKER_ENDED = re.compile(r"^\[inference \S+\] worker (?P<local>\d+) ended with exit code")


@dataclass(frozen=True)
class Record:
    """One line of a demo program, with the time the node read it."""

    at: float
    pod: str
    uid8: str
    text: str


@dataclass
class Audit:
    """What the ledger found: `lies` must be empty; `unproven` lists syncs whose missing proof is a worker
    that was killed (its log ends) before it could log what it loaded."""

    syncs: int = 0
    verified: int = 0
    lies: list[str] = field(default_factory=list)
    unproven: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"{self.syncs} syncs reported, {self.verified} verified on every worker; lies: {self.lies}; "
                f"unproven: {self.unproven}; pending: {self.pending}")


class Ledger:
    """Every member log of one WeightSync, read from the node's disk, and the checks on it."""

    def __init__(self, sandbox: Sandbox, namespace: str, name: str = "demo") -> None:
        self.sandbox = sandbox
        self.namespace = namespace
        self.name = name
        self.records: list[Record] = []
        #: status.lastSync values seen by `observe_status`: (version, epoch) -> when first seen.
        self.last_syncs: dict[tuple[int, int], float] = {}

    def _files(self, pod: str | None = None) -> list[tuple[str, str, Path]]:
        out = []
        pattern = f"{self.namespace}_{pod or self.name + '-*'}_*"
        for d in self.sandbox.state_dir.joinpath("pods").glob(pattern):
            name, uid8 = d.name[len(self.namespace) + 1:].rsplit("_", 1)
            out += [(name, uid8, f) for f in d.joinpath("logs").glob("*.log")]
        return out

    def read(self, pod: str | None = None) -> list[Record]:
        """Re-read the logs (of `pod`'s name only, when given: cheap enough to poll)."""
        records = []
        for name, uid8, path in self._files(pod):
            try:
                data = path.read_bytes()
            except OSError:
                continue
            for event in containerlog.read_events(data, complete=False):
                if isinstance(event, containerlog.Line):
                    at = _seconds(event.time)
                    records += [Record(at, name, uid8, text) for text in run_demo.records(event.text)]
        records.sort(key=lambda r: r.at)
        if pod is None:
            self.records = records
        return records

    # -- parsed
    def sent(self) -> list[tuple[float, Any]]:
        return [(r.at, s) for r in self.records if r.pod.endswith("-trainer-0")
                for s in run_demo.parse_trainer(r.text, r.uid8)]

    def loaded(self) -> list[tuple[float, Any]]:
        return [(r.at, x) for r in self.records if not r.pod.endswith("-trainer-0")
                for x in run_demo.parse_inference(r.text, r.pod, r.uid8)]

    def lines(self, pattern: str, pod: str | None = None, after: float = 0.0, *, reread: bool = False) -> list[Record]:
        """Records matching `pattern` (of `pod`, after `after`) as of the last `read()`; `reread`: as `pod`'s logs
        say now (a cheap re-read of that pod alone, which leaves `records` as they were)."""
        rx = re.compile(pattern)
        records = self.read(pod) if reread else self.records
        return [r for r in records if r.at >= after and (pod is None or r.pod == pod) and rx.search(r.text)]

    def verified_syncs(self, after: float = 0.0) -> list[tuple[float, Any]]:
        """(time the last proof arrived, Sent) of each sync reported after `after` that every acknowledged
        worker proved it holds, in order."""
        by_key: dict[tuple[int, int], tuple[float, Any, dict[int, float]]] = {}
        for at, s in self.sent():
            by_key[s.key] = (at, s, {})
        for at, x in self.loaded():
            entry = by_key.get(x.key)
            if entry is not None and (x.checksum, x.output) == (entry[1].checksum, entry[1].output):
                entry[2].setdefault(x.rank, at)
        out = []
        for at, s, ranks in by_key.values():
            if at >= after and len(ranks) == s.acked:
                out.append((max([at, *ranks.values()]), s))
        return sorted(out, key=lambda p: p[0])

    def observe_status(self, status: dict[str, Any]) -> None:
        last = status.get("lastSync") or {}
        if "version" in last and "epoch" in last:
            self.last_syncs.setdefault((int(last["version"]), int(last["epoch"])), time.time())

    def audit(self) -> Audit:
        """Every reported sync against every worker's proof (see the module's docstring)."""
        self.read()
        audit = Audit()
        sent = {s.key: (at, s) for at, s in self.sent()}
        proofs: dict[tuple[int, int], dict[int, Any]] = {}
        for _, x in self.loaded():
            entry = sent.get(x.key)
            if entry is None:
                continue  # a trainer that died before it could log the sync: it reported nothing
            s = entry[1]
            if (x.checksum, x.output) != (s.checksum, s.output):
                audit.lies.append(f"rank {x.rank} ({x.pod}) loaded v{x.version} epoch {x.epoch} with checksum "
                                  f"{x.checksum} output {x.output}; the trainer sent {s.checksum} {s.output}")
            proofs.setdefault(x.key, {})[x.rank] = x
        first_line: dict[str, float] = {}
        last_line: dict[str, float] = {}
        pods_of_rank: dict[int, set[str]] = {}  # every pod a rank wrote a line in
        rank_last_line: dict[tuple[str, int], float] = {}  # (pod, rank) -> that rank's own last line
        local_of: dict[tuple[str, int], int] = {}  # (pod, rank) -> its worker index in the pod
        ended: set[tuple[str, int]] = set()  # (pod, worker index) whose process ended (the pod said so)
        for r in self.records:
            first_line.setdefault(r.uid8, r.at)
            last_line[r.uid8] = r.at
            if (own := _WORKER_LINE.match(r.text)) is not None:  # (a `loaded` line is one of them)
                rank = int(own["rank"])
                local_of[(r.uid8, rank)] = int(own["local"])
                pods_of_rank.setdefault(rank, set()).add(r.uid8)
                rank_last_line[(r.uid8, rank)] = r.at
            elif (end := _WORKER_ENDED.match(r.text)) is not None:
                ended.add((r.uid8, int(end["local"])))
        for key, (at, s) in sent.items():
            audit.syncs += 1
            missing = sorted(set(range(1, s.acked + 1)) - set(proofs.get(key, {})))
            if not missing:
                audit.verified += 1
                continue
            # A rank whose process ended (killed) before it could log the load is unproven: its pod's log
            # ended, or its pod said the worker ended and the worker itself wrote nothing after the report
            # (its pod logs on for a moment, stopping the others). A rank still logging is pending (its line
            # may not be written yet) or, later, a lie. Only the pods of that rank that were running when the
            # sync was reported count: a replacement under the same rank, started later, never received it.
            def still_there(rank: int, uid8: str, at: float = at) -> bool:
                if not first_line.get(uid8, at) <= at < last_line.get(uid8, 0.0):
                    return False
                worker_ended = (uid8, local_of.get((uid8, rank), -1)) in ended
                return not worker_ended or rank_last_line.get((uid8, rank), 0.0) > at

            still = [r for r in missing if any(still_there(r, u) for u in pods_of_rank.get(r, ()))]
            what = f"v{s.version} epoch {s.epoch} (acked {s.acked}) lacks the proof of ranks {missing}"
            (audit.pending if still else audit.unproven).append(what)
        verified = {s.key for _, s in self.verified_syncs()}
        for key in self.last_syncs:
            if key not in verified:
                audit.pending.append(f"status.lastSync v{key[0]} epoch {key[1]} is not (yet) a verified sync")
        return audit

    def settle(self, timeout: float = 30.0) -> Audit:
        """The audit once nothing is pending (lines still being written), or as it stands at `timeout`: a
        proof still missing then is a lie."""
        deadline = time.monotonic() + timeout
        while True:
            audit = self.audit()
            if not audit.pending or time.monotonic() >= deadline:
                audit.lies += audit.pending
                audit.pending = []
                return audit
            time.sleep(0.5)


# ------------------------------------------------------------------------------------------------ processes


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        out.setdefault(ppid, []).append(int(stat.parent.name))
    return out


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    children = _children()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def pod_object(sandbox: Sandbox, namespace: str, pod: str) -> dict[str, Any]:
    return dict(json.loads(sandbox.kubectl("get", "pod", pod, "-n", namespace, "-o", "json").stdout))


def container_pid(sandbox: Sandbox, namespace: str, pod: str) -> int:
    status = pod_object(sandbox, namespace, pod)["status"]["containerStatuses"][0]
    assert "running" in status["state"], status
    return int(status["containerID"].removeprefix("sandbox://"))


def signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def kill_pod(sandbox: Sandbox, namespace: str, pod: str) -> list[int]:
    """SIGKILL every process of the pod's container (an OOM kill, a crash): no goodbye to anyone."""
    pids = process_tree(container_pid(sandbox, namespace, pod))
    signal_all(pids, signal.SIGKILL)
    return pids


def worker_pid(sandbox: Sandbox, namespace: str, pod: str, local_rank: int) -> int:
    """The process of one inference worker (inference.py --worker <local_rank>) of an engine pod."""
    for pid in process_tree(container_pid(sandbox, namespace, pod)):
        argv = cmdline(pid)
        if "--worker" in argv and argv[argv.index("--worker") + 1] == str(local_rank):
            return pid
    raise LookupError(f"no worker {local_rank} in pod {namespace}/{pod}")


def operator_pod(sandbox: Sandbox) -> str:
    return str(sandbox.kubectl("get", "pods", "-n", OPERATOR_NAMESPACE, "-l", OPERATOR_SELECTOR, "-o",
                               "jsonpath={.items[0].metadata.name}").stdout)


def operator_restarts(sandbox: Sandbox) -> int:
    pod = pod_object(sandbox, OPERATOR_NAMESPACE, operator_pod(sandbox))
    return int(pod["status"]["containerStatuses"][0]["restartCount"])


def kill_operator(sandbox: Sandbox) -> list[int]:
    """SIGKILL the Helm-installed operator's process (its pod's container: the node restarts it)."""
    return kill_pod(sandbox, OPERATOR_NAMESPACE, operator_pod(sandbox))


def pod_netns(sandbox: Sandbox, namespace: str, pod: str) -> str:
    return sandbox.net.netns_name(pod_object(sandbox, namespace, pod)["metadata"]["uid"])


def set_link(netns: str, up: bool) -> None:
    """The pod's side of its veth pair (eth0) down or up: its network is cut, or back."""
    subprocess.run(["ip", "-n", netns, "link", "set", "eth0", "up" if up else "down"], check=True, timeout=30)


# ------------------------------------------------------------------------------------------------ timing


def poll(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """`condition()` until truthy (returned); TimeoutError naming `what` at `timeout`. Exceptions propagate."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


SENDING = re.compile(r"\] sending v=(\d+) ")
RECEIVING = "] receiving: the first batch of a sync arrived"


def mid_broadcast(ledger: Ledger, trainer: str, receiver: str, timeout: float = 120.0) -> int:
    """Wait until the trainer is sending a version and `receiver`'s loader worker has begun to get its data
    (the demo's `sending v=N` and `receiving: ...` lines are the last of each log, read from the node's
    disk); returns N. The caller acts at once: a sync of the ballasted demo lasts seconds."""

    def now_sending() -> int | None:
        t = [x for x in ledger.read(trainer) if x.text.startswith("[trainer ")]
        if not t or not (m := SENDING.search(t[-1].text)):
            return None
        # the loader-style worker (local rank 1) logs the first batch of each sync
        worker = [x for x in ledger.read(receiver) if x.text.startswith("[inference ") and " worker 1 " in x.text]
        if worker and RECEIVING in worker[-1].text and worker[-1].at >= t[-1].at:
            return int(m[1])
        return None

    return int(poll(now_sending, timeout, f"{receiver} to be mid-way through receiving a sync"))
