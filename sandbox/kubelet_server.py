"""The slice of the kubelet's HTTPS API that `kubectl logs` needs: /containerLogs/<ns>/<pod>/<container>.

The API server proxies pods/log here (node InternalIP, daemonEndpoints.kubeletEndpoint.Port). Clients must
present a certificate from the sandbox's CA (the API server does); the server presents the API server's
certificate, whose SANs include the bridge address.
"""

from __future__ import annotations

import re
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HEADER = re.compile(r"==== \d{4}-\d\d-\d\dT")  # the line the agent writes before each start
NEXT_RUN = re.compile(rb"\n==== \d{4}-\d\d-\d\dT")
FOLLOW_POLL_S = 0.2


def current_run(text: str, previous: bool) -> str:
    """The output of the container's latest run (or the one before) from its log, which marks each start."""
    runs: list[list[str]] = []
    for line in text.splitlines(keepends=True):
        if HEADER.match(line):
            runs.append([])
        elif runs:
            runs[-1].append(line)
    wanted = -2 if previous else -1
    return "".join(runs[wanted]) if len(runs) >= -wanted else ""


def tail(text: str, lines: int | None) -> str:
    if lines is None:
        return text
    kept = text.splitlines(keepends=True)
    return "".join(kept[-lines:]) if lines > 0 else ""


class _Handler(BaseHTTPRequestHandler):
    server: KubeletServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        parts = url.path.strip("/").split("/")
        if url.path == "/healthz":
            self._send(200, "ok")
            return
        if len(parts) != 4 or parts[0] != "containerLogs":
            self._send(404, f"{url.path} is not served by the weightsync sandbox node agent")
            return
        _, namespace, pod, container = parts
        log = self.server.find_log(namespace, pod, container)
        if log is None:
            self._send(404, f"no log for container {container!r} of pod {namespace}/{pod} on this node")
            return
        previous = query.get("previous", ["false"])[0] == "true"
        lines = int(query["tailLines"][0]) if "tailLines" in query else None
        text = log.read_text(errors="replace")
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(tail(current_run(text, previous), lines).encode())
        if query.get("follow", ["false"])[0] != "true" or previous:
            return
        offset = len(text.encode())
        while True:  # until this run of the container ends, as a kubelet's follow does
            running = self.server.running(namespace, pod, container)
            with open(log, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            restarted = NEXT_RUN.search(chunk)
            try:
                self.wfile.write(chunk[: restarted.start() + 1] if restarted else chunk)
                self.wfile.flush()
            except OSError:
                return
            if restarted or not running:
                return
            time.sleep(FOLLOW_POLL_S)

    def _send(self, code: int, body: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(body.encode())


class KubeletServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], pki: Path, pods_dir: Path, running: Callable[[str, str, str], bool]
    ) -> None:
        super().__init__(address, _Handler)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.crt"))
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_cert_chain(str(pki / "apiserver.crt"), str(pki / "apiserver.key"))
        self.socket = context.wrap_socket(self.socket, server_side=True)
        self.pods_dir = pods_dir
        self.running = running

    def find_log(self, namespace: str, pod: str, container: str) -> Path | None:
        found = sorted(
            self.pods_dir.glob(f"{namespace}_{pod}_*/logs/{container}.log"), key=lambda p: p.stat().st_mtime
        )
        return found[-1] if found else None

    def serve_in_background(self) -> None:
        threading.Thread(target=self.serve_forever, name="kubelet-server", daemon=True).start()
