"""Polling with a deadline: every wait in the sandbox goes through here and names what it waited for."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(TimeoutError):
    """A condition did not hold within its timeout; the message says which and what was seen last."""


def wait_for(
    condition: Callable[[], T | None],
    timeout: float,
    what: str,
    interval: float = 0.1,
    describe: Callable[[], str] | None = None,
) -> T:
    """Polls `condition` until it returns something truthy, which is returned; WaitTimeout after `timeout`."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception as e:
            last_error = e
        if time.monotonic() >= deadline:
            detail = describe() if describe else ""
            if last_error is not None:
                detail += f" (last error: {last_error})"
            raise WaitTimeout(
                f"timed out after {timeout:.0f}s waiting for {what}{': ' if detail else ''}{detail}"
            )
        time.sleep(interval)
