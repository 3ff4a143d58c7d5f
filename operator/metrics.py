"""Prometheus metrics of the operator, served by prometheus_client on --metrics-port (default 9090)."""

from __future__ import annotations

from collections import Counter as Tally

from prometheus_client import Counter, Gauge, Histogram

RECONCILES = Counter("weightsync_reconciles", "Reconciles of WeightSync objects.")
RECONCILE_ERRORS = Counter("weightsync_reconcile_errors", "Reconciles that raised an error.")
RECONCILE_SECONDS = Histogram("weightsync_reconcile_duration_seconds", "Duration of one reconcile.")
GROUPS = Gauge("weightsync_groups", "WeightSync objects by phase.", ["phase"])
RESTARTS = Counter("weightsync_member_restarts", "Member failures (failed, exited or vanished pods).")
EPOCH_CHANGES = Counter("weightsync_epoch_changes", "Epoch bumps (the group re-forms).")
API_REQUESTS = Counter(
    "weightsync_api_requests",
    "Requests of the operator's Kubernetes client (WATCH: a watch opened; kopf's own watches not included).",
    ["verb"],
)
CACHE_MISSES = Counter("weightsync_cache_misses", "Reads that the watch caches could not answer.", ["kind"])

PHASES = ("Pending", "Forming", "Ready", "Degraded", "Failed")
_phases: dict[tuple[str, str], str] = {}


def set_phase(key: tuple[str, str], phase: str | None) -> None:
    """Record one object's phase (None: it is gone) and refresh the by-phase gauge."""
    if phase is None:
        _phases.pop(key, None)
    else:
        _phases[key] = phase
    counts = Tally(_phases.values())
    for name in PHASES:
        GROUPS.labels(phase=name).set(counts.get(name, 0))
