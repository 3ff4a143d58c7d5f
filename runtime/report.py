"""The sync report, and its trip to the WeightSync's status.

The trainer patches one annotation on its own pod (it is granted `patch` on that pod alone); the operator
copies it into `status.lastSync`. Posting runs on a background thread and never delays a sync.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from weightsync.contract import LAST_SYNC_ANNOTATION

log = logging.getLogger("weightsync.runtime")

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclass(frozen=True)
class SyncReport:
    version: int
    tensors: int
    bytes: int
    seconds: float
    gbps: float
    acked: tuple[int, ...]
    transport: str
    epoch: int
    time: str
    #: Seconds spent forming the group before this sync (0 when it was formed already); not in `seconds`.
    formation_seconds: float = 0.0

    @classmethod
    def make(cls, version: int, tensors: int, nbytes: int, seconds: float, acked: tuple[int, ...],
             transport: str, epoch: int, formation_seconds: float = 0.0) -> SyncReport:
        gbps = nbytes / seconds / 1e9 if seconds > 0 else 0.0
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return cls(version, tensors, nbytes, round(seconds, 6), round(gbps, 3), acked, transport, epoch, stamp,
                   round(formation_seconds, 6))

    def summary(self) -> str:
        formed = f"; group formed in {self.formation_seconds:.3f}s before it" if self.formation_seconds else ""
        return (f"sync v{self.version}: {self.tensors} tensors, {self.bytes / 1e6:.1f} MB in {self.seconds:.3f}s "
                f"= {self.gbps:.2f} GB/s over {self.transport} to {len(self.acked)} members (epoch {self.epoch})"
                f"{formed}")

    def to_json(self) -> str:
        doc = asdict(self)
        doc["acked"] = list(self.acked)
        return json.dumps(doc, separators=(",", ":"))


class PodAnnotator:
    """Posts reports onto the trainer's own pod through the Kubernetes API, when running in a pod.

    One background thread posts the newest report only: a report still waiting when a newer one comes is
    dropped, so an older report can never land after a newer one (the operator copies whatever the pod
    holds into status.lastSync). A post that fails (an API server restart) is retried with a backoff until it
    succeeds, a newer report replaces it, or RETRY_FOR_S pass."""

    RETRY_FIRST_S = 1.0
    RETRY_MAX_S = 15.0
    RETRY_FOR_S = 600.0

    def __init__(self, namespace: str, pod: str) -> None:
        self.namespace = namespace
        self.pod = pod
        self._warned = False
        self._changed = threading.Condition()
        self._pending: SyncReport | None = None
        self._thread: threading.Thread | None = None

    @staticmethod
    def available() -> bool:
        return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and (SERVICE_ACCOUNT_DIR / "token").exists()

    def post(self, report: SyncReport) -> None:
        with self._changed:
            self._pending = report
            self._changed.notify_all()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="weightsync-report", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._changed:
                report, self._pending = self._pending, None
                if report is None:
                    self._thread = None
                    return
            delay, give_up = self.RETRY_FIRST_S, time.monotonic() + self.RETRY_FOR_S
            while not self._send(report) and time.monotonic() < give_up:
                with self._changed:  # a newer report ends the retries of this one
                    if self._pending is None:
                        self._changed.wait(delay)
                    if self._pending is not None:
                        break
                delay = min(self.RETRY_MAX_S, delay * 2)

    def _send(self, report: SyncReport) -> bool:
        host = os.environ["KUBERNETES_SERVICE_HOST"]
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if ":" in host:
            host = f"[{host}]"
        url = f"https://{host}:{port}/api/v1/namespaces/{self.namespace}/pods/{self.pod}"
        body = json.dumps({"metadata": {"annotations": {LAST_SYNC_ANNOTATION: report.to_json()}}}).encode()
        request = urllib.request.Request(url, data=body, method="PATCH", headers={
            "Authorization": f"Bearer {(SERVICE_ACCOUNT_DIR / 'token').read_text().strip()}",
            "Content-Type": "application/merge-patch+json",
        })
        context = ssl.create_default_context(cafile=str(SERVICE_ACCOUNT_DIR / "ca.crt"))
        try:
            with urllib.request.urlopen(request, context=context, timeout=10):
                pass
        except Exception as err:  # reporting is best effort; the sync itself succeeded
            if not self._warned:
                log.warning("could not post the sync report to pod %s/%s: %s (retrying)", self.namespace,
                            self.pod, err)
                self._warned = True
            return False
        return True
