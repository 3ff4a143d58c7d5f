"""Container probes (httpGet, tcpSocket, exec) and their success/failure thresholds."""

from __future__ import annotations

import http.client
import socket
import ssl
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass

from weightsync.sandbox.podspec import Obj


def _port(probe_port: int | str, container: Obj) -> int:
    if isinstance(probe_port, int) or str(probe_port).isdigit():
        return int(probe_port)
    for p in container.get("ports", []):
        if p.get("name") == probe_port:
            return int(p["containerPort"])
    raise ValueError(
        f"probe names port {probe_port!r}, which container {container['name']!r} does not declare"
    )


def run_probe(probe: Obj, container: Obj, pod_ip: str, pid: int | None, env: Mapping[str, str]) -> bool:
    """One probe attempt: True on success."""
    timeout = float(probe.get("timeoutSeconds", 1))
    try:
        if "httpGet" in probe:
            get = probe["httpGet"]
            host = get.get("host") or pod_ip
            port = _port(get["port"], container)
            conn: http.client.HTTPConnection
            if get.get("scheme", "HTTP").upper() == "HTTPS":
                conn = http.client.HTTPSConnection(
                    host, port, timeout=timeout, context=ssl._create_unverified_context()
                )
            else:
                conn = http.client.HTTPConnection(host, port, timeout=timeout)
            try:
                headers = {h["name"]: h["value"] for h in get.get("httpHeaders", [])}
                conn.request("GET", get.get("path", "/"), headers=headers)
                return 200 <= conn.getresponse().status < 400
            finally:
                conn.close()
        if "tcpSocket" in probe:
            tcp = probe["tcpSocket"]
            with socket.create_connection(
                (tcp.get("host") or pod_ip, _port(tcp["port"], container)), timeout
            ):
                return True
        if "exec" in probe:
            if pid is None:
                return False
            argv = ["nsenter", "-t", str(pid), "--net", "--mount", "--uts", "--", *probe["exec"]["command"]]
            proc = subprocess.run(argv, env=dict(env), capture_output=True, timeout=timeout, check=False)
            return proc.returncode == 0
    except (OSError, subprocess.TimeoutExpired, http.client.HTTPException, ValueError):
        return False
    return True  # grpc and unknown handlers: not probed, counted as success


@dataclass
class ProbeState:
    """Where one probe stands: the verdict so far and when it runs next."""

    probe: Obj
    passing: bool
    successes: int = 0
    failures: int = 0
    next_at: float = 0.0

    @classmethod
    def start(cls, probe: Obj, initially_passing: bool) -> ProbeState:
        return cls(
            probe, initially_passing, next_at=time.monotonic() + float(probe.get("initialDelaySeconds", 0))
        )

    def due(self) -> bool:
        return time.monotonic() >= self.next_at

    def record(self, ok: bool) -> bool:
        """Counts one result; returns True when the verdict changed."""
        self.next_at = time.monotonic() + float(self.probe.get("periodSeconds", 10))
        before = self.passing
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            if self.successes >= int(self.probe.get("successThreshold", 1)):
                self.passing = True
        else:
            self.successes, self.failures = 0, self.failures + 1
            if self.failures >= int(self.probe.get("failureThreshold", 3)):
                self.passing = False
        return before != self.passing
