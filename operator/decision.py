"""What planning decides: the status to write, the actions to take, the events to post.

Pure data (no kopf, no client); `reconcile.py` carries a Decision out: the status first, then the actions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Obj = dict[str, Any]


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Create:
    obj: Obj
    event: Event | None = None

    @property
    def kind(self) -> str:
        return str(self.obj["kind"])

    @property
    def name(self) -> str:
        return str(self.obj["metadata"]["name"])


@dataclass(frozen=True)
class Patch:
    kind: str
    name: str
    patch: Obj
    event: Event | None = None


@dataclass(frozen=True)
class Delete:
    kind: str
    name: str
    uid: str
    event: Event | None = None


Action = Create | Patch | Delete


def is_member_action(action: Action) -> bool:
    """An action on a member pod (the group's membership), as opposed to its Service, Secret or Role."""
    return action.kind == "Pod"


@dataclass(frozen=True)
class Decision:
    status: Obj
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None
    failures: int = 0
    epoch_changed: bool = False
    #: Creates not made now (members wait for the token Secret) but dry-run with the others, so that a
    #: template the API server refuses is known before anything at all is created.
    probes: list[Create] = field(default_factory=list)
