"""The operator with a crash hook, for tests: `python crashing_operator.py N <operator args>` runs
`python -m weightsync.operator <operator args>` and exits abruptly (exit 137, as a SIGKILL would) right
after its N-th write to the API server, to prove that a reconcile killed at any point is repaired by the
next one. The hook lives here, not in the product."""

from __future__ import annotations

import logging
import os
import sys

from weightsync.operator import kube
from weightsync.operator.__main__ import main


def install(after_writes: int) -> None:
    wrote = kube.Kube._wrote

    def crash_after(self: kube.Kube) -> None:
        wrote(self)
        if self.writes >= after_writes:
            logging.getLogger("crashing_operator").warning("exiting abruptly after %d writes", self.writes)
            logging.shutdown()
            os._exit(137)

    kube.Kube._wrote = crash_after  # type: ignore[method-assign]


if __name__ == "__main__":
    install(int(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
