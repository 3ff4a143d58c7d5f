"""The fault tests' ledger (tests/support/faults.py): a missing proof is a lie only if its worker lived on.

Logs are written as the sandbox's node writes them (CRI records under <state>/pods/<ns>_<pod>_<uid8>/logs/), in
the demo programs' line formats.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from faults import Ledger
from weightsync.sandbox import containerlog

T0 = 1_800_000_000.0
SYNC = "checksum=abc output=0.5"


def _write(state: Path, pod: str, uid8: str, lines: list[tuple[float, str]]) -> None:
    logs = state / "pods" / f"ns_{pod}_{uid8}" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with (logs / "main.log").open("a") as f:
        for at, text in lines:
            f.write(f"{containerlog.timestamp(int(at * 1e9))} stdout F {text}\n")


def _trainer_reports_v2(state: Path) -> None:
    _write(state, "demo-trainer-0", "t0000000", [
        (T0, "[trainer demo-trainer-0 00:00:00] start"),
        (T0 + 1, f"[trainer demo-trainer-0 00:00:01] sync v=2 epoch=9 loss=0.1 {SYNC} mean=0.1 acked=2"),
        (T0 + 5, "[trainer demo-trainer-0 00:00:05] still here"),
    ])


def _worker(rank: int, local: int, at: float, text: str) -> tuple[float, str]:
    return at, f"[inference demo-inference-0 worker {local} rank {rank} 00:00:00] {text}"


def _loaded(rank: int, local: int, at: float) -> tuple[float, str]:
    return _worker(rank, local, at, f"loaded v=2 epoch=9 rank={rank} {SYNC} style=into")


def _ledger(state: Path) -> Ledger:
    return Ledger(SimpleNamespace(state_dir=state), "ns")  # type: ignore[arg-type]


def test_a_worker_killed_between_its_acknowledgement_and_its_proof_is_unproven_not_a_lie(tmp_path: Path) -> None:
    _trainer_reports_v2(tmp_path)
    _write(tmp_path, "demo-inference-0", "i0000000", [
        _worker(1, 0, T0 - 1, "start"), _worker(2, 1, T0 - 1, "start"),
        _worker(2, 1, T0 + 0.5, "receiving: the first batch of a sync arrived"),
        _loaded(1, 0, T0 + 1.1),
        # worker 1 (rank 2) is SIGKILLed after the trainer's report, before it logged the load: its pod
        # says so, and stops worker 0, which logs on for a moment
        (T0 + 1.3, "[inference demo-inference-0] worker 1 ended with exit code -9; stopping the others"),
        _worker(1, 0, T0 + 1.4, "stopping"),
    ])
    audit = _ledger(tmp_path).settle(timeout=0)
    assert audit.lies == [] and audit.unproven == ["v2 epoch 9 (acked 2) lacks the proof of ranks [2]"], audit


def test_a_worker_that_lived_on_without_proving_the_reported_sync_is_a_lie(tmp_path: Path) -> None:
    _trainer_reports_v2(tmp_path)
    _write(tmp_path, "demo-inference-0", "i0000000", [
        _worker(1, 0, T0 - 1, "start"), _worker(2, 1, T0 - 1, "start"),
        _loaded(1, 0, T0 + 1.1),
        _worker(2, 1, T0 + 1.2, "receive failed (1/5): sync v2 was abandoned"),  # alive, past the sync
        (T0 + 1.3, "[inference demo-inference-0] worker 1 ended with exit code -9; stopping the others"),
    ])
    audit = _ledger(tmp_path).settle(timeout=0)
    assert audit.lies == ["v2 epoch 9 (acked 2) lacks the proof of ranks [2]"], audit


def test_a_worker_whose_process_goes_on_is_pending_until_its_proof_arrives(tmp_path: Path) -> None:
    _trainer_reports_v2(tmp_path)
    _write(tmp_path, "demo-inference-0", "i0000000", [
        _worker(1, 0, T0 - 1, "start"), _worker(2, 1, T0 - 1, "start"),
        _loaded(1, 0, T0 + 1.1), _worker(1, 0, T0 + 2, "idle"),
    ])
    ledger = _ledger(tmp_path)
    assert ledger.audit().pending == ["v2 epoch 9 (acked 2) lacks the proof of ranks [2]"]
    _write(tmp_path, "demo-inference-0", "i0000000", [_loaded(2, 1, T0 + 3)])
    audit = ledger.settle(timeout=0)
    assert audit.lies == [] and audit.unproven == [] and audit.verified == audit.syncs == 1, audit
