"""A small JSON client for the API server (client-certificate auth), used by the sandbox and its node agent.

It speaks plain dicts shaped like the API's JSON, so the agent's pure logic works on the same objects the
API server sends. Every request opens its own connection: safe to share between threads.
"""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]


class ApiError(RuntimeError):
    """The API server answered with an error status; `status` is the HTTP code, `reason` the API's reason."""

    def __init__(self, status: int, reason: str, message: str, method: str, path: str) -> None:
        super().__init__(f"{method} {path}: {status} {reason}: {message}")
        self.status = status
        self.reason = reason


class KubeClient:
    def __init__(self, server: str, ca_file: Path, cert_file: Path, key_file: Path) -> None:
        url = urllib.parse.urlsplit(server)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or 443
        self.context = ssl.create_default_context(cafile=str(ca_file))
        self.context.load_cert_chain(str(cert_file), str(key_file))

    @classmethod
    def from_kubeconfig(cls, path: Path) -> KubeClient:
        config = yaml.safe_load(path.read_text())
        cluster = config["clusters"][0]["cluster"]
        user = config["users"][0]["user"]
        return cls(
            cluster["server"],
            Path(cluster["certificate-authority"]),
            Path(user["client-certificate"]),
            Path(user["client-key"]),
        )

    def _connect(self, timeout: float) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(self.host, self.port, context=self.context, timeout=timeout)

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Obj | None = None,
        params: dict[str, str] | None = None,
        content_type: str = "application/json",
        timeout: float = 30.0,
    ) -> Obj:
        """Sends one request; returns the decoded JSON answer or raises ApiError."""
        full = path + ("?" + urllib.parse.urlencode(params) if params else "")
        conn = self._connect(timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Accept": "application/json"}
            if payload is not None:
                headers["Content-Type"] = content_type
            conn.request(method, full, body=payload, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if resp.status >= 400:
            try:
                status = json.loads(data)
                reason, message = status.get("reason", ""), status.get("message", "")
            except ValueError:
                reason, message = resp.reason, data.decode(errors="replace")[:500]
            raise ApiError(resp.status, reason, message, method, path)
        decoded: Obj = json.loads(data) if data else {}
        return decoded

    def ready(self, timeout: float = 5.0) -> bool:
        """True when GET /readyz answers 200."""
        conn = self._connect(timeout)
        try:
            conn.request("GET", "/readyz")
            return conn.getresponse().status == 200
        finally:
            conn.close()

    def get(self, path: str, params: dict[str, str] | None = None) -> Obj:
        return self.request("GET", path, params=params)

    def post(self, path: str, body: Obj) -> Obj:
        return self.request("POST", path, body=body)

    def merge_patch(self, path: str, body: Obj) -> Obj:
        return self.request("PATCH", path, body=body, content_type="application/merge-patch+json")

    def delete(self, path: str, body: Obj | None = None) -> Obj:
        return self.request("DELETE", path, body=body)

    def watch(
        self, path: str, resource_version: str, params: dict[str, str] | None = None, timeout_s: int = 60
    ) -> Iterator[tuple[str, Obj]]:
        """Streams (type, object) events from `resource_version` for up to `timeout_s` seconds."""
        query = {
            **(params or {}),
            "watch": "1",
            "resourceVersion": resource_version,
            "timeoutSeconds": str(timeout_s),
            "allowWatchBookmarks": "true",
        }
        conn = self._connect(timeout_s + 15)
        try:
            conn.request(
                "GET", path + "?" + urllib.parse.urlencode(query), headers={"Accept": "application/json"}
            )
            resp = conn.getresponse()
            if resp.status >= 400:
                raise ApiError(
                    resp.status, resp.reason, resp.read().decode(errors="replace")[:500], "WATCH", path
                )
            while True:
                line = resp.readline()
                if not line:
                    return
                event = json.loads(line)
                yield event["type"], event["object"]
        finally:
            conn.close()
