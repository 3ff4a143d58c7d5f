"""Pure pod-status rules of the node agent: the phase and the conditions from the containers' progress."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from weightsync.sandbox.podspec import Obj


@dataclass(frozen=True)
class Progress:
    """Where one (init) container stands."""

    init: bool
    runs: int = 0  # how often it was started
    done: bool = False  # exited and will not run again
    succeeded: bool = False  # done with exit code 0
    ready: bool = False


def phase(restart_policy: str, containers: Sequence[Progress]) -> str:
    """Pending, Running, Succeeded or Failed, as a kubelet decides it."""
    inits = [c for c in containers if c.init]
    apps = [c for c in containers if not c.init]
    if restart_policy == "Never" and any(c.done and not c.succeeded for c in inits):
        return "Failed"
    if not all(c.done for c in inits):
        return "Pending"
    if all(c.done for c in apps):
        return "Succeeded" if all(c.succeeded for c in apps) else "Failed"
    if all(c.runs > 0 for c in apps):
        return "Running"
    return "Pending"


def conditions(
    old: Sequence[Obj], containers: Sequence[Progress], pod_phase: str, sandbox_ready: bool, now: str
) -> list[Obj]:
    """Our conditions recomputed (transition times kept while unchanged); others' (PodScheduled) kept."""
    previous = {c["type"]: c for c in old}
    initialized = all(c.done for c in containers if c.init)
    ready = pod_phase == "Running" and all(c.ready for c in containers if not c.init)
    wanted = {
        "PodReadyToStartContainers": (sandbox_ready, None),
        "Initialized": (initialized, None if initialized else "ContainersNotInitialized"),
        "ContainersReady": (ready, None if ready else "ContainersNotReady"),
        "Ready": (ready, None if ready else "ContainersNotReady"),
    }
    result = [c for t, c in previous.items() if t not in wanted]
    for ctype, (ok, reason) in wanted.items():
        status = "True" if ok else "False"
        prev = previous.get(ctype)
        unchanged = prev is not None and prev.get("status") == status
        cond: Obj = {
            "type": ctype,
            "status": status,
            "lastProbeTime": None,
            "lastTransitionTime": prev["lastTransitionTime"] if prev is not None and unchanged else now,
        }
        if reason:
            cond["reason"] = reason
        result.append(cond)
    return result
