"""runtime/report.py's PodAnnotator: the newest report only, never an older one after a newer one, and a
failed post retried until it lands or a newer report replaces it. The HTTP call is replaced by a recorder
whose answers the test controls; the thread and its ordering are the real ones."""

from __future__ import annotations

import queue
import threading

from weightsync.runtime.report import PodAnnotator, SyncReport


def report(version: int) -> SyncReport:
    return SyncReport.make(version, 1, 10, 0.1, (1,), "gloo/tcp", 0)


class Recorder(PodAnnotator):
    RETRY_FIRST_S = 0.01
    RETRY_MAX_S = 0.02

    def __init__(self, answers: list[bool]) -> None:
        super().__init__("ns", "pod")
        self.answers = answers  # what each send answers, in order; then True
        self.sent: queue.Queue[tuple[int, bool]] = queue.Queue()
        self.gate = threading.Event()
        self.gate.set()
        self.sending = threading.Event()

    def _send(self, r: SyncReport) -> bool:
        self.sending.set()
        self.gate.wait(10)
        ok = self.answers.pop(0) if self.answers else True
        self.sent.put((r.version, ok))
        return ok


def drain(rec: Recorder, until: int) -> list[tuple[int, bool]]:
    out = []
    while not out or out[-1] != (until, True):
        out.append(rec.sent.get(timeout=10))
    return out


def test_reports_waiting_behind_a_slow_post_collapse_to_the_newest() -> None:
    rec = Recorder([])
    rec.gate.clear()  # the first post hangs (a slow API server)
    rec.post(report(1))
    assert rec.sending.wait(10)
    rec.post(report(2))
    rec.post(report(3))
    rec.gate.set()
    assert drain(rec, 3) == [(1, True), (3, True)], "v2 was never newest when the poster was free"


def test_a_failed_post_is_retried_until_it_lands() -> None:
    rec = Recorder([False, False, False])
    rec.post(report(7))
    assert drain(rec, 7) == [(7, False), (7, False), (7, False), (7, True)]


def test_a_newer_report_replaces_one_that_keeps_failing() -> None:
    rec = Recorder([False] * 1000)
    rec.post(report(1))
    assert rec.sent.get(timeout=10) == (1, False)
    rec.answers.clear()
    rec.post(report(2))
    sent = drain(rec, 2)
    assert sent[-1] == (2, True) and (1, True) not in sent, "an older report never lands after a newer one"
