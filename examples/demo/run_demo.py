"""The demo: a real weight-sync group on the local sandbox, end to end, in one command.

    hack/demo.sh [--keep]          # or: make demo; sets up the venv and binaries, then runs this file

1. starts the sandbox (a real control plane; pods run as local processes),
2. `helm install`s the operator chart (the operator runs as a pod on the sandbox node),
3. applies examples/demo.yaml: 1 trainer + 2 inference replicas x 2 workers (world size 5), gloo on CPU,
4. follows the group: phase and ready members, each sync the trainer reports, and each inference worker's
   proof that it holds the trainer's weights (its checksum and its output on a fixed input equal the
   trainer's for that version),
5. ends with `kubectl get ws` (phase Ready, epoch, last version, GB/s) and tears everything down that it
   started, unless --keep.

On failure it prints the WeightSync's status, the pods, the events and the logs that matter, and exits 1.
The log parsing and the checks (`GroupWatcher`) are shared with the e2e tests in tests/e2e/.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CODE_DIR = ROOT / "examples" / "demo"
MANIFEST = ROOT / "examples" / "demo.yaml"
CHART = ROOT / "charts" / "weightsync-operator"
RELEASE = "weightsync"
OPERATOR_NAMESPACE = "weightsync-system"
GROUP, VERSION, PLURAL = "weightsync.dev", "v1alpha1", "weightsyncs"
NAME_LABEL = "weightsync.dev/name"
DEMO_STATE_DIR = Path.home() / ".cache" / "weightsync" / "sandbox-demo"

_started = time.monotonic()


def say(message: str) -> None:
    print(f"[demo {time.monotonic() - _started:6.1f}s] {message}", flush=True)


# ---------------------------------------------------------------------------------------------- manifest


def demo_manifest(name: str = "demo", steps: int = 8, interval: float = 1.0, replicas: int | None = None,
                  code_dir: Path = CODE_DIR, timeout: float | None = None, ballast_mb: int = 0,
                  backoff: float | None = None) -> dict[str, Any]:
    """examples/demo.yaml with DEMO_CODE pointing at this checkout (the sandbox runs commands as local
    processes), and the trainer's steps and pace; `timeout` (rendezvous.timeoutSeconds), `ballast_mb` (MiB
    of ballast in the model, DEMO_BALLAST_MB: a longer sync) and `backoff` (failurePolicy.backoffSeconds)
    for fault tests."""
    ws = yaml.safe_load(MANIFEST.read_text())
    ws = copy.deepcopy(ws)
    ws["metadata"]["name"] = name
    if replicas is not None:
        ws["spec"]["inference"]["replicas"] = replicas
    if timeout is not None:
        ws["spec"]["rendezvous"]["timeoutSeconds"] = timeout
    if backoff is not None:
        ws["spec"]["failurePolicy"]["backoffSeconds"] = backoff
    for role in ("trainer", "inference"):
        for container in ws["spec"][role]["template"]["spec"]["containers"]:
            for var in container.get("env", []):
                if var["name"] == "DEMO_CODE":
                    var["value"] = str(code_dir)
            if ballast_mb:
                container.setdefault("env", []).append({"name": "DEMO_BALLAST_MB", "value": str(ballast_mb)})
    trainer = ws["spec"]["trainer"]["template"]["spec"]["containers"][0]
    trainer["command"] = [*trainer["command"][:2], "--steps", str(steps), "--interval", str(interval)]
    return ws


# ---------------------------------------------------------------------------------------------- logs


def fields(line: str) -> dict[str, str]:
    """The key=value pairs of one log line."""
    return dict(re.findall(r"(\w+)=(\S+)", line))


#: Where a line of the demo's programs starts: `[trainer 00:24:31] ` or `[inference <pod> worker 0 rank 3 00:24:31] `.
RECORD_START = re.compile(r"\[(?:trainer|inference) [^\[\]]*\] ")


def records(log: str) -> Iterator[str]:
    """The demo programs' lines in a log, one at a time, also where two of them are in one line of the log.

    The programs write each line with one write call (demo_log.py), so the runtime logs it whole; but a line
    written in pieces by one process (print under PYTHONUNBUFFERED=1: the text, then its newline) can take
    another process's line into it, in any container runtime: `...transport=gloo/tcp[inference ...] loaded
    v=3 ...`. Cut there, each of the two is still read (and counted for its own worker)."""
    for line in log.splitlines():
        starts = [m.start() for m in RECORD_START.finditer(line)]
        if not starts or starts[0] != 0:
            starts.insert(0, 0)
        for start, end in itertools.pairwise([*starts, len(line)]):
            yield line[start:end]


@dataclass(frozen=True)
class Sent:
    """One sync as the trainer logged it (`sync v=...`)."""

    pod_uid: str
    version: int
    epoch: int
    checksum: str
    output: str
    acked: int
    line: str

    @property
    def key(self) -> tuple[int, int]:
        return self.version, self.epoch


@dataclass(frozen=True)
class Loaded:
    """One sync as an inference worker logged it (`loaded v=...`)."""

    pod: str
    pod_uid: str
    rank: int
    version: int
    epoch: int
    checksum: str
    output: str
    line: str

    @property
    def key(self) -> tuple[int, int]:
        return self.version, self.epoch


SENT_KEYS = ("v", "epoch", "checksum", "output", "acked")
LOADED_KEYS = ("v", "epoch", "rank", "checksum", "output")


def parse_trainer(log: str, pod_uid: str) -> list[Sent]:
    out = []
    for line in records(log):
        # Only completed syncs: "sync v=2 failed (attempt 1/5): ..." lines carry no epoch or checksum.
        if re.search(r"\] sync v=\d+ epoch=", line):
            f = fields(line)
            if all(k in f for k in SENT_KEYS):  # else not a whole line: it proves nothing
                out.append(Sent(pod_uid, int(f["v"]), int(f["epoch"]), f["checksum"], f["output"],
                                int(f["acked"]), line))
    return out


def parse_inference(log: str, pod: str, pod_uid: str) -> list[Loaded]:
    out = []
    for line in records(log):
        if "] loaded v=" in line:
            f = fields(line)
            if all(k in f for k in LOADED_KEYS):
                out.append(Loaded(pod, pod_uid, int(f["rank"]), int(f["v"]), int(f["epoch"]), f["checksum"],
                                  f["output"], line))
    return out


@dataclass
class Verdict:
    """A sync (version, epoch) and what the workers that loaded it proved."""

    sent: Sent
    matched: list[Loaded] = field(default_factory=list)
    mismatched: list[Loaded] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every receiver of that sync loaded it, with the trainer's checksum and output."""
        return not self.mismatched and len({x.rank for x in self.matched}) == self.sent.acked


class GroupWatcher:
    """Follows one WeightSync through the API server: its status, and its member pods' logs (kept per pod
    UID, so the logs of a pod that was replaced stay available)."""

    def __init__(self, api_client: Any, namespace: str, name: str) -> None:
        from kubernetes import client

        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.namespace = namespace
        self.name = name
        self.logs: dict[str, tuple[str, str]] = {}  # pod uid -> (pod name, log text)

    def status(self) -> dict[str, Any]:
        obj = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, self.name)
        return dict(obj.get("status") or {})

    def pods(self) -> list[Any]:
        return list(self.core.list_namespaced_pod(self.namespace, label_selector=f"{NAME_LABEL}={self.name}").items)

    def refresh(self) -> None:
        """Read the log of every member pod that has started."""
        from kubernetes.client.exceptions import ApiException

        for pod in self.pods():
            statuses = pod.status.container_statuses or []
            if not statuses or (statuses[0].state.running is None and statuses[0].state.terminated is None):
                continue
            try:
                text = self.core.read_namespaced_pod_log(pod.metadata.name, self.namespace)
            except ApiException:
                continue  # deleted meanwhile, or the node has not written anything yet
            self.logs[pod.metadata.uid] = (pod.metadata.name, text)

    def sent(self) -> list[Sent]:
        return [s for uid, (pod, text) in self.logs.items() if pod.endswith("-trainer-0")
                for s in parse_trainer(text, uid)]

    def loaded(self) -> list[Loaded]:
        return [x for uid, (pod, text) in self.logs.items() if not pod.endswith("-trainer-0")
                for x in parse_inference(text, pod, uid)]

    def verdicts(self) -> list[Verdict]:
        """Every sync the trainer completed, in order, with the loads that refer to it."""
        by_key = {s.key: Verdict(s) for s in self.sent()}
        for x in self.loaded():
            verdict = by_key.get(x.key)
            if verdict is None:
                continue  # the trainer's line for it is not in its log yet
            ok = (x.checksum, x.output) == (verdict.sent.checksum, verdict.sent.output)
            (verdict.matched if ok else verdict.mismatched).append(x)
        return list(by_key.values())

    def joined(self, epoch: int) -> set[int]:
        """The ranks whose runtime logged joining the group at `epoch`."""
        pattern = re.compile(rf"rank (\d+) joined the sync group at epoch {epoch}\b")
        return {int(r) for _, text in self.logs.values() for r in pattern.findall(text)}

    def mismatches(self) -> list[Loaded]:
        return [x for v in self.verdicts() for x in v.mismatched]

    def log_of(self, pod: str) -> str:
        texts = [text for name, text in self.logs.values() if name == pod]
        return texts[-1] if texts else ""


# ---------------------------------------------------------------------------------------------- diagnosis


def diagnose(sandbox: Any, namespace: str, name: str, tail: int = 40) -> str:
    """What a user would look at when the group does not work: status, pods, events, logs."""
    out = []

    def section(title: str, *args: str) -> None:
        proc = sandbox.kubectl(*args, check=False)
        out.append(f"--- {title}\n{(proc.stdout + proc.stderr).rstrip()}")

    section(f"kubectl get ws {name} -o yaml (status)", "get", "ws", name, "-n", namespace, "-o",
            "jsonpath={.status}")
    section("kubectl get pods", "get", "pods", "-n", namespace, "-o", "wide")
    section("kubectl get events", "get", "events", "-n", namespace, "--sort-by=.lastTimestamp")
    pods = sandbox.kubectl("get", "pods", "-n", namespace, "-l", f"{NAME_LABEL}={name}", "-o",
                           "jsonpath={.items[*].metadata.name}", check=False).stdout.split()
    for pod in pods:
        section(f"kubectl logs {pod} --tail={tail}", "logs", pod, "-n", namespace, f"--tail={tail}")
    section(f"kubectl logs deploy/{RELEASE}-weightsync-operator --tail={tail}", "logs", "-n", OPERATOR_NAMESPACE,
            f"deployment/{RELEASE}-weightsync-operator", f"--tail={tail}")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- steps


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def wait_namespace_not_terminating(sandbox: Any, namespace: str) -> None:
    """A namespace still being deleted (by an earlier run) refuses new objects: wait until it is gone."""
    phase = sandbox.kubectl("get", "namespace", namespace, "-o", "jsonpath={.status.phase}", check=False).stdout
    if phase == "Terminating":
        say(f"namespace {namespace} is still being deleted by an earlier run; waiting for it to go")
        sandbox.kubectl("wait", "--for=delete", f"namespace/{namespace}", "--timeout=180s", timeout=200)


def install_operator(sandbox: Any) -> bool:
    """helm install the chart (kept as is when the release exists); True when this run installed it."""
    exists = sandbox.helm("status", RELEASE, "-n", OPERATOR_NAMESPACE, check=False).returncode == 0
    if exists:
        say(f"operator: release {RELEASE} already installed in {OPERATOR_NAMESPACE}; using it")
        return False
    wait_namespace_not_terminating(sandbox, OPERATOR_NAMESPACE)
    say(f"operator: helm install {RELEASE} charts/weightsync-operator -n {OPERATOR_NAMESPACE} --wait")
    started = time.monotonic()
    sandbox.helm("install", RELEASE, str(CHART), "-n", OPERATOR_NAMESPACE, "--create-namespace", "--wait",
                 "--timeout=240s", timeout=300)
    sandbox.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/weightsyncs.weightsync.dev")
    say(f"operator: running as pod {operator_pod(sandbox)} on the sandbox node "
        f"(ready in {time.monotonic() - started:.0f}s)")
    return True


def operator_pod(sandbox: Any) -> str:
    return str(sandbox.kubectl("get", "pods", "-n", OPERATOR_NAMESPACE, "-l",
                               f"app.kubernetes.io/instance={RELEASE}", "-o",
                               "jsonpath={.items[0].metadata.name}").stdout)


def follow(watcher: GroupWatcher, steps: int, timeout: float) -> None:
    """Print the group's progress until `steps` syncs are verified on every worker and status.lastSync
    shows the last one with the group Ready; raises on a mismatch or at the timeout."""
    deadline = time.monotonic() + timeout
    shown_status: tuple[Any, ...] = ()
    shown_sent: set[tuple[int, int]] = set()
    shown_verified: set[tuple[int, int]] = set()
    shown_joined: tuple[int, int] = (-1, 0)
    while True:
        st = watcher.status()
        now = (st.get("phase"), st.get("ready"), st.get("epoch"))
        if now != shown_status and st.get("phase"):
            say(f"ws/{watcher.name}: phase {now[0]}, {now[1]} members ready, epoch {now[2]}")
            shown_status = now
        watcher.refresh()
        if st.get("epoch") is not None and st.get("worldSize"):
            joined = (st["epoch"], len(watcher.joined(st["epoch"])))
            if joined != shown_joined and joined[1]:
                say(f"sync group: {joined[1]}/{st['worldSize']} ranks joined at epoch {joined[0]}")
                shown_joined = joined
        verdicts = watcher.verdicts()
        for v in verdicts:
            s = v.sent
            if s.key not in shown_sent:
                f = fields(s.line)
                say(f"v{s.version}: trainer sent {f['tensors']} tensors, {int(f['bytes']) / 1e6:.2f} MB in "
                    f"{float(f['seconds']):.3f}s ({f['gbps']} GB/s) to {s.acked} workers at epoch {s.epoch}, "
                    f"loss {f['loss']}")
                shown_sent.add(s.key)
            if v.complete and s.key not in shown_verified:
                ranks = sorted({x.rank for x in v.matched})
                say(f"v{s.version}: verified on {len(ranks)}/{s.acked} workers (ranks "
                    f"{','.join(str(r) for r in ranks)}): checksum "
                    f"{s.checksum} and output {s.output} equal the trainer's")
                shown_verified.add(s.key)
        bad = watcher.mismatches()
        if bad:
            raise RuntimeError("an inference worker holds other weights than the trainer sent:\n"
                               + "\n".join(x.line for x in bad))
        last = st.get("lastSync") or {}
        done = (len(shown_verified) >= steps and {k[0] for k in shown_verified} >= set(range(1, steps + 1))
                and last.get("version") == steps and st.get("phase") == "Ready")
        if done:
            say(f"status.lastSync: v{last['version']} at epoch {last.get('epoch')}, {last.get('bytes')} bytes in "
                f"{last.get('seconds')}s = {last.get('gbps')} GB/s over {last.get('transport')}")
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s: {len(shown_verified)} of {steps} syncs verified, "
                               f"status {st.get('phase')} {st.get('ready')} lastSync {last or None}")
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="leave the sandbox, operator and group running")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="sandbox state directory (default $WEIGHTSYNC_SANDBOX_STATE, else "
                        "~/.cache/weightsync/sandbox-demo, which the demo starts afresh and removes at the end); "
                        "a sandbox already running there is reused and kept")
    parser.add_argument("--namespace", default="weightsync-demo", help="namespace of the demo group")
    parser.add_argument("--steps", type=int, default=8, help="training steps (syncs) to run and verify")
    parser.add_argument("--timeout", type=float, default=300, help="seconds allowed for the group to do them")
    args = parser.parse_args(argv)

    from kubernetes import config
    from weightsync.sandbox import Sandbox

    own_state = args.state_dir is None and not os.environ.get("WEIGHTSYNC_SANDBOX_STATE")
    state_dir = args.state_dir or Path(os.environ.get("WEIGHTSYNC_SANDBOX_STATE") or DEMO_STATE_DIR)
    sandbox = Sandbox(state_dir)
    was_running = sandbox.status().running
    if not was_running and own_state and state_dir.exists():
        sandbox.down()  # leftovers of an earlier run that was stopped: the demo starts from a fresh cluster
        shutil.rmtree(state_dir)
    say(f"sandbox: {'reusing the one running in' if was_running else 'starting in'} {state_dir}")
    sandbox.up()
    say(f"sandbox: ready (export KUBECONFIG={sandbox.kubeconfig})")
    installed = created_ns = False
    name = "demo"
    ok = False
    try:
        installed = install_operator(sandbox)
        wait_namespace_not_terminating(sandbox, args.namespace)
        if sandbox.kubectl("get", "namespace", args.namespace, check=False).returncode != 0:
            sandbox.kubectl("create", "namespace", args.namespace)
            created_ns = True
        ws = demo_manifest(name, steps=args.steps)
        sandbox.kubectl("apply", "-n", args.namespace, "-f", "-", input=yaml.safe_dump(ws))
        inference = ws["spec"]["inference"]
        say(f"applied WeightSync {name} in namespace {args.namespace}: 1 trainer + {inference['replicas']} "
            f"inference replicas x {inference['workersPerReplica']} workers (world size "
            f"{1 + inference['replicas'] * inference['workersPerReplica']}), {ws['spec']['transport']['backend']}, "
            f"{ws['spec']['transport']['bufferSizeBytes'] // 1024} KiB buffers")
        api = config.new_client_from_config(config_file=str(sandbox.kubeconfig))
        try:
            follow(GroupWatcher(api, args.namespace, name), args.steps, args.timeout)
        finally:
            api.close()
        print()
        print(f"$ kubectl get ws -n {args.namespace}")
        print(sandbox.kubectl("get", "ws", "-n", args.namespace).stdout, flush=True)
        ok = True
    except Exception as err:
        say(f"FAILED: {err}")
        print(diagnose(sandbox, args.namespace, name), flush=True)
    finally:
        if args.keep:
            say(f"kept running (--keep): export KUBECONFIG={sandbox.kubeconfig}; kubectl get ws -A; "
                f"stop with: {sys.executable} -m weightsync.sandbox down (WEIGHTSYNC_SANDBOX_STATE={state_dir})")
        else:
            teardown(sandbox, args.namespace, name, installed, created_ns, stop_sandbox=not was_running)
            if not was_running and own_state:
                shutil.rmtree(state_dir, ignore_errors=True)
    return 0 if ok else 1


def teardown(sandbox: Any, namespace: str, name: str, installed: bool, created_ns: bool, stop_sandbox: bool) -> None:
    """Remove what this run created, in the order a user would."""
    say("tearing down: deleting the WeightSync (its pods go with it)")
    sandbox.kubectl("delete", "ws", name, "-n", namespace, "--ignore-not-found", "--timeout=60s", check=False)
    sandbox.kubectl("wait", "--for=delete", "pods", "-n", namespace, "-l", f"{NAME_LABEL}={name}", "--timeout=60s",
                    check=False)
    if created_ns:
        sandbox.kubectl("delete", "namespace", namespace, "--timeout=120s", check=False)
    if installed:
        say(f"tearing down: helm uninstall {RELEASE}")
        sandbox.helm("uninstall", RELEASE, "-n", OPERATOR_NAMESPACE, "--wait", "--timeout=120s", check=False)
        sandbox.kubectl("delete", "namespace", OPERATOR_NAMESPACE, "--timeout=120s", check=False)
    if stop_sandbox:
        say("tearing down: stopping the sandbox")
        sandbox.down()
    say("done")


if __name__ == "__main__":
    sys.exit(main())
