"""The HTTP control plane of one stock vLLM server (vLLM 0.33's RL routes), as the trainer drives it.

Every call is bounded: the socket's own timeout, and a watchdog that closes the connection when the
call's whole time is up (a server that answers a byte at a time cannot stretch it). Every failure is an
`EngineError` naming the server, the step, the sync, the HTTP status and the body.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
from typing import Any
from urllib.parse import urlencode, urlsplit

from weightsync.runtime.errors import WeightSyncError

#: At most this much of a response body is kept (and quoted in errors).
MAX_BODY_BYTES = 64 << 10
_QUOTED = 500


class EngineError(WeightSyncError):
    """A vLLM server's call failed: an HTTP error status, an unexpected answer, no answer within the
    timeout, or no connection. `url`, `step` (the route's name, e.g. `update_weights`), `version` (the
    sync's version, None while forming), `status` (None without an HTTP answer), `body` (the answer's
    text, cut to 64 KiB), `ranks` (the server's worker ranks in the group)."""

    def __init__(self, message: str, *, url: str, step: str, version: int | None, status: int | None,
                 body: str, ranks: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.url, self.step, self.version, self.status, self.body, self.ranks = (
            url, step, version, status, body, ranks)

    @property
    def members_at_fault(self) -> tuple[int, ...]:
        return self.ranks


def _quote(body: str) -> str:
    body = body.strip()
    return repr(body if len(body) <= _QUOTED else body[:_QUOTED] + "...")


class EngineClient:
    """One vLLM server at `url` (`http(s)://host[:port]`); `ranks` are its workers' ranks in the group."""

    def __init__(self, url: str, timeout: float, ranks: tuple[int, ...] = ()) -> None:
        parts = urlsplit(url)
        assert parts.hostname is not None
        self.url = url
        self.timeout = timeout
        self.ranks = ranks
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)

    def __repr__(self) -> str:
        return f"EngineClient({self.url!r})"

    def bounded(self, timeout: float) -> EngineClient:
        """The same server with every call bounded by `timeout` seconds."""
        return EngineClient(self.url, timeout, self.ranks)

    def describe(self) -> str:
        if not self.ranks:
            return f"vLLM server {self.url}"
        return f"vLLM server {self.url} (ranks {self.ranks[0]}..{self.ranks[-1]})"

    # ------------------------------------------------------------------------------ the routes (§1)
    def get_world_size(self) -> int:
        doc = self.call("get_world_size", "GET", "/get_world_size", query={"include_dp": "true"})
        return self._int(doc, "world_size", "get_world_size", None)

    def pause(self, mode: str, version: int) -> None:
        self.call("pause", "POST", "/pause", query={"mode": mode}, version=version)

    def resume(self, version: int | None) -> None:
        self.call("resume", "POST", "/resume", version=version)

    def init(self, init_info: dict[str, Any]) -> None:
        self.call("init_weight_transfer_engine", "POST", "/init_weight_transfer_engine", body={"init_info": init_info})

    def shutdown(self, version: int | None = None) -> None:
        self.call("shutdown_weight_transfer_engine", "POST", "/shutdown_weight_transfer_engine", version=version)

    def start(self, version: int) -> None:
        self.call("start_weight_update", "POST", "/start_weight_update", version=version)

    def update(self, update_info: dict[str, Any], version: int) -> None:
        self.call("update_weights", "POST", "/update_weights", body={"update_info": update_info}, version=version)

    def finish(self, version: int, weight_version: str | None) -> None:
        body = None if weight_version is None else {"weight_version": weight_version}
        self.call("finish_weight_update", "POST", "/finish_weight_update", body=body, version=version)

    def set_weight_version(self, weight_version: str, version: int) -> None:
        self.call("update_weight_version", "POST", "/update_weight_version", body={"new_version": weight_version},
                  version=version)

    def weight_version(self, version: int) -> str:
        doc = self.call("weight_info", "GET", "/weight_info", version=version)
        value = doc.get("weight_version")
        if not isinstance(value, str):
            raise self._error("weight_info", version, 200, json.dumps(doc), "answered without a weight_version")
        return value

    # ----------------------------------------------------------------------------------- transport
    def call(self, step: str, method: str, path: str, *, query: dict[str, str] | None = None,
             body: dict[str, Any] | None = None, version: int | None = None,
             timeout: float | None = None) -> dict[str, Any]:
        """One request; the JSON object of a 2xx answer, else EngineError."""
        timeout = self.timeout if timeout is None else timeout
        target = path + (f"?{urlencode(query)}" if query else "")
        data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        connection: http.client.HTTPConnection
        if self._https:
            connection = http.client.HTTPSConnection(self._host, self._port, timeout=timeout)
        else:
            connection = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            sock = connection.sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

        watchdog = threading.Timer(timeout, expire)
        watchdog.daemon = True
        started = time.monotonic()
        watchdog.start()
        try:
            connection.request(method, target, body=data, headers=headers)
            response = connection.getresponse()
            raw = response.read(MAX_BODY_BYTES)
            status = response.status
        except (OSError, http.client.HTTPException) as err:
            waited = time.monotonic() - started
            if expired.is_set() or isinstance(err, TimeoutError):
                why = f"no answer within {timeout:g}s"
            else:
                why = f"no answer ({type(err).__name__}: {err}) after {waited:.1f}s"
            raise self._error(step, version, None, "", why, f"{method} {target}") from None
        finally:
            watchdog.cancel()
            connection.close()
        text = raw.decode(errors="replace")
        if not 200 <= status < 300:
            raise self._error(step, version, status, text, f"HTTP {status}", f"{method} {target}")
        try:
            doc = json.loads(text) if text.strip() else {}
        except ValueError:
            raise self._error(step, version, status, text, "answered with a body that is not JSON",
                              f"{method} {target}") from None
        if not isinstance(doc, dict):
            raise self._error(step, version, status, text, "answered with JSON that is not an object",
                              f"{method} {target}")
        return doc

    def _int(self, doc: dict[str, Any], key: str, step: str, version: int | None) -> int:
        value = doc.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self._error(step, version, 200, json.dumps(doc), f"answered without an integer {key!r}")
        return value

    def _error(self, step: str, version: int | None, status: int | None, body: str, why: str,
               request: str = "") -> EngineError:
        sync = f"sync v{version}" if version is not None else "forming the group"
        where = f" ({request})" if request else ""
        text = f"{self.describe()}: {step}{where} failed during {sync}: {why}"
        if body.strip():
            text += f"; body: {_quote(body)}"
        return EngineError(text, url=self.url, step=step, version=version, status=status, body=body,
                           ranks=self.ranks)
