"""The operator at scale on the sandbox: N WeightSyncs of sleeping pods (1 trainer + 1 inference each).

    python bench/operator_scale.py --groups 200 --out bench/results/operator-scale-200.json

Starts a sandbox of its own (node capacity and pod subnet sized for the run: WEIGHTSYNC_SANDBOX_NODE_PODS,
WEIGHTSYNC_SANDBOX_SUBNET), installs the CRDs, runs the operator (`python -m weightsync.operator
--standalone --namespace bench`, default resync 30 s), applies every WeightSync at once, and measures:

- seconds from the apply until every group is Ready (status polled once a second);
- the operator's RSS (VmRSS of its process) when all are Ready and after the idle window;
- the operator's API requests per second (its `weightsync_api_requests_total` metric, by verb) while the
  groups form and during an idle window of `--idle-seconds` afterwards (WATCH: watches opened);
- reconciles per second and the operator's CPU seconds over the same windows (on the sandbox the node
  agent, which starts every pod, is the bottleneck of the time to Ready, not the operator).

Progress is printed as it goes; the result is one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "bench"


def log(message: str) -> None:
    print(f"[operator-scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def weightsync(name: str) -> dict[str, Any]:
    sleeper = {"name": "main", "image": "ignored", "command": ["sleep", "infinity"]}
    template = {"spec": {"terminationGracePeriodSeconds": 1, "containers": [sleeper]}}
    return {"apiVersion": "weightsync.dev/v1alpha1", "kind": "WeightSync", "metadata": {"name": name},
            "spec": {"trainer": {"template": template}, "inference": {"replicas": 1, "template": template},
                     "transport": {"backend": "gloo"}}}  # fmt: skip


def metrics(port: int) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r'weightsync_api_requests_total\{verb="(\w+)"\} (\S+)', line)
        if m:
            out[m[1]] = float(m[2])
        elif line.startswith("weightsync_reconciles_total "):
            out["reconciles"] = float(line.split()[1])
    return out


def rate(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    return {k: round((after.get(k, 0) - before.get(k, 0)) / seconds, 3) for k in sorted(set(before) | set(after))}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=200)
    parser.add_argument("--idle-seconds", type=float, default=90.0)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    os.environ.setdefault("WEIGHTSYNC_SANDBOX_NODE_PODS", str(2 * args.groups + 50))
    os.environ.setdefault("WEIGHTSYNC_SANDBOX_SUBNET", "10.79.0.0/21")
    from weightsync.sandbox import Sandbox

    from weightsync.ports import free_port

    state = Path(tempfile.mkdtemp(prefix="operator-scale-", dir=Path.home() / ".cache" / "weightsync"))
    sandbox = Sandbox(state)
    sandbox.up()
    operator = None
    try:
        sandbox.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
        sandbox.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/weightsyncs.weightsync.dev")
        sandbox.kubectl("create", "namespace", NAMESPACE)
        metrics_port = free_port()
        env = {**os.environ, "KUBECONFIG": str(sandbox.kubeconfig)}
        operator_log = open(state / "operator.log", "wb")  # noqa: SIM115
        operator = subprocess.Popen(
            [sys.executable, "-m", "weightsync.operator", "--standalone", "--namespace", NAMESPACE,
             "--metrics-port", str(metrics_port), "--liveness-port", str(free_port())],
            stdout=operator_log, stderr=subprocess.STDOUT, env=env, cwd="/",
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                metrics(metrics_port)
                break
            except OSError:
                if time.monotonic() > deadline or operator.poll() is not None:
                    raise RuntimeError("the operator did not start") from None
                time.sleep(0.5)
        log(f"operator pid {operator.pid}; applying {args.groups} WeightSyncs")

        before = metrics(metrics_port)
        cpu_before = cpu_seconds(operator.pid)
        started = time.monotonic()
        objects = {"apiVersion": "v1", "kind": "List", "items": [weightsync(f"g{i:03d}") for i in range(args.groups)]}
        sandbox.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=yaml.safe_dump(objects), timeout=600)
        ready = 0
        while ready < args.groups:
            if time.monotonic() - started > args.timeout:
                raise RuntimeError(f"only {ready}/{args.groups} Ready after {args.timeout}s")
            out = sandbox.kubectl("get", "ws", "-n", NAMESPACE, "-o", "json", timeout=120).stdout
            phases = [(o.get("status") or {}).get("phase") for o in json.loads(out)["items"]]
            now_ready = phases.count("Ready")
            if now_ready != ready:
                log(f"{now_ready}/{args.groups} Ready after {time.monotonic() - started:.0f}s")
            ready = now_ready
            time.sleep(1.0)
        formed_s = time.monotonic() - started
        formed = metrics(metrics_port)
        cpu_formed = cpu_seconds(operator.pid)
        rss_ready = rss_mib(operator.pid)
        log(f"all Ready in {formed_s:.1f}s; operator RSS {rss_ready} MiB; idle for {args.idle_seconds:.0f}s")
        time.sleep(args.idle_seconds)  # the idle window is what is measured
        idle = metrics(metrics_port)
        cpu_idle = cpu_seconds(operator.pid)
        result = {
            "command": f"python bench/operator_scale.py --groups {args.groups} --idle-seconds {args.idle_seconds:g}",
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True, check=False).stdout.strip(),
            "groups": args.groups,
            "pods": 2 * args.groups,
            "resync_seconds": 30,
            "seconds_to_all_ready": round(formed_s, 1),
            "operator_rss_mib_all_ready": rss_ready,
            "operator_rss_mib_after_idle": rss_mib(operator.pid),
            "operator_cpu_seconds_while_forming": round(cpu_formed - cpu_before, 2),
            "operator_cpu_seconds_while_idle": round(cpu_idle - cpu_formed, 2),
            "per_second_while_forming": rate(before, formed, formed_s),
            "per_second_while_idle": rate(formed, idle, args.idle_seconds),
            "machine": f"{os.cpu_count()} cores; sandbox node capacity "
            f"{os.environ['WEIGHTSYNC_SANDBOX_NODE_PODS']} pods",
        }
        text = json.dumps(result, indent=2)
        print(text)
        if args.out is not None:
            args.out.write_text(text + "\n")
    finally:
        if operator is not None:
            operator.terminate()
            operator.wait(timeout=30)
        sandbox.down()
        shutil.rmtree(state, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
