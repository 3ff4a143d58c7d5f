"""Run the WeightSync operator: `python -m weightsync.operator`.

Watches every namespace unless given `--namespace NS` (repeatable) or WEIGHTSYNC_WATCH_NAMESPACES
(comma-separated). Liveness: http://0.0.0.0:8080/healthz (kopf's). Metrics: http://0.0.0.0:9090/metrics.
Peering: kopf peering named `weightsync-operator` (a ClusterKopfPeering when watching all namespaces,
a KopfPeering in each watched namespace otherwise; the object must exist), `--standalone` to disable.
Logs: JSON lines on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys

import kopf
from prometheus_client import start_http_server

from . import constants as c
from . import handlers


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m weightsync.operator", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=None,
        help="namespace to watch (repeatable); default: $WEIGHTSYNC_WATCH_NAMESPACES, else all namespaces",
    )
    parser.add_argument("--standalone", action="store_true", help="no peering (a single replica)")
    parser.add_argument("--peering", default=c.OPERATOR_NAME, help="kopf peering name (default %(default)s)")
    parser.add_argument(
        "--priority",
        type=int,
        default=_env_int("WEIGHTSYNC_PEERING_PRIORITY", 0),
        help="peering priority (default: $WEIGHTSYNC_PEERING_PRIORITY, else random: equal priorities freeze)",
    )
    parser.add_argument(
        "--liveness-port", type=int, default=_env_int("WEIGHTSYNC_LIVENESS_PORT", 8080), help="0 disables"
    )
    parser.add_argument(
        "--metrics-port", type=int, default=_env_int("WEIGHTSYNC_METRICS_PORT", 9090), help="0 disables"
    )
    parser.add_argument(
        "--resync-seconds",
        type=float,
        default=float(os.environ.get("WEIGHTSYNC_RESYNC_SECONDS", "30")),
        help="period of the full resync (default %(default)s)",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logs")
    args = parser.parse_args(argv)
    if args.namespace is None:
        env = os.environ.get("WEIGHTSYNC_WATCH_NAMESPACES", "")
        args.namespace = [ns.strip() for ns in env.split(",") if ns.strip()]
    args.standalone = args.standalone or os.environ.get("WEIGHTSYNC_STANDALONE", "") in ("1", "true")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat.JSON)
    if args.metrics_port:
        start_http_server(args.metrics_port)  # before kopf: a busy port fails fast, with exit code 1
    handlers.CONFIG.resync_seconds = args.resync_seconds
    handlers.CONFIG.namespaces = tuple(args.namespace)
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=args.standalone,
        peering_name=None if args.standalone else args.peering,
        priority=args.priority or None,
        liveness_endpoint=f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
