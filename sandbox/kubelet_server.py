"""The slice of the kubelet's HTTPS API that `kubectl logs` needs: /containerLogs/<ns>/<pod>/<container>.

The API server proxies pods/log here (node InternalIP, daemonEndpoints.kubeletEndpoint.Port). Clients must
present a certificate from the sandbox's CA (the API server does); the server presents the API server's
certificate, whose SANs include the bridge address.

It serves whole lines only (containerlog.py), with `previous`, `follow`, `tailLines`, `timestamps`,
`sinceSeconds` and `sinceTime`, as a kubelet does.
"""

from __future__ import annotations

import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from weightsync.sandbox.containerlog import Line, LogReader, RunStart, read_events, runs, timestamp

FOLLOW_POLL_S = 0.2


def run_lines(events: Sequence[Line | RunStart], previous: bool) -> list[Line]:
    """The lines of the container's latest run (or the one before) from its log, which marks each start."""
    found = runs(events)
    wanted = -2 if previous else -1
    return found[wanted] if len(found) >= -wanted else []


def current_run(text: str, previous: bool) -> str:
    """run_lines of a whole log, as text."""
    return "".join(line.render() for line in run_lines(read_events(text.encode(), complete=True), previous))


def tail(text: str, lines: int | None) -> str:
    if lines is None:
        return text
    kept = text.splitlines(keepends=True)
    return "".join(kept[-lines:]) if lines > 0 else ""


def since(query: dict[str, list[str]], now_ns: int | None = None) -> str | None:
    """The earliest timestamp `sinceSeconds` or `sinceTime` asks for, in the log's format; None: all of it."""
    if "sinceSeconds" in query:
        now_ns = time.time_ns() if now_ns is None else now_ns
        return timestamp(now_ns - int(query["sinceSeconds"][0]) * 1_000_000_000)
    if "sinceTime" in query:
        moment = datetime.fromisoformat(query["sinceTime"][0]).astimezone(UTC)
        return timestamp(int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1000)
    return None


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
        follow = query.get("follow", ["false"])[0] == "true" and not previous
        timestamps = query.get("timestamps", ["false"])[0] == "true"
        try:
            lines = int(query["tailLines"][0]) if "tailLines" in query else None
            earliest = since(query)
        except ValueError as err:
            self._send(400, f"bad query: {err}")
            return
        # Whole lines only: a record the pump is appending, or the first parts of a long line, wait until
        # they are complete (or the container has ended: then nothing more comes).
        running = self.server.running(namespace, pod, container)
        reader = LogReader()
        with open(log, "rb") as f:
            data = f.read()
        offset = len(data)
        events = reader.feed(data)
        if not running:
            events += reader.finish()
        selected = run_lines(events, previous)
        if earliest is not None:
            selected = [line for line in selected if line.time >= earliest]
        if lines is not None:
            selected = selected[-lines:] if lines > 0 else []
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write("".join(line.render(timestamps) for line in selected).encode())
        if not follow:
            return
        while True:  # until this run of the container ends, as a kubelet's follow does
            running = self.server.running(namespace, pod, container)
            with open(log, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            events = reader.feed(chunk)
            if not running:
                events += reader.finish()
            out: list[str] = []
            restarted = False
            for event in events:
                if isinstance(event, RunStart):
                    restarted = True
                    break
                out.append(event.render(timestamps))
            try:
                self.wfile.write("".join(out).encode())
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
