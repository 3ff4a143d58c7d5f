"""`weightsync-sandbox up | down | status` (also `python -m weightsync.sandbox ...`)."""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
from pathlib import Path

from weightsync.sandbox.controlplane import Sandbox


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="weightsync-sandbox",
        description="A real Kubernetes control plane here plus a node agent running pods as processes.",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="state directory (default $WEIGHTSYNC_SANDBOX_STATE or ~/.cache/weightsync/sandbox-state)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start (or reuse) the sandbox; prints the kubeconfig path")
    down = sub.add_parser("down", help="stop every process, pod namespace and the bridge")
    down.add_argument(
        "--purge", action="store_true", help="also delete the state directory (etcd data, certs)"
    )
    status = sub.add_parser("status", help="what is running; exit code 0 only when everything is up")
    status.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, _interrupt)  # like Ctrl-C: an interrupted `up` stops what it started
    sandbox = Sandbox(args.state_dir)
    if args.command == "up":
        sandbox.up()
        print(f"export KUBECONFIG={sandbox.kubeconfig}")
        print(f"export PATH={sandbox.bin_dir}:$PATH")
        return 0
    if args.command == "down":
        sandbox.down()
        if args.purge:
            shutil.rmtree(sandbox.state_dir, ignore_errors=True)
        return 0
    st = sandbox.status()
    if args.json:
        print(json.dumps(st.to_json(), indent=2))
    else:
        print(f"state dir:   {st.state_dir}")
        print(f"kubeconfig:  {st.kubeconfig}")
        print(f"API server:  {st.api_server_url or '-'} ({'ready' if st.api_ready else 'not ready'})")
        print(f"node:        {'Ready' if st.node_ready else 'not ready'}")
        for name, pid in st.processes.items():
            print(f"  {name:24} {'pid ' + str(pid) if pid else 'stopped'}")
        print(f"pod network namespaces: {len(st.pod_netns)}")
    return 0 if st.running else 1


if __name__ == "__main__":
    sys.exit(main())
