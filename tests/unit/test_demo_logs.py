"""The demo's log parsing (examples/demo/run_demo.py), which the demo and the e2e tests judge syncs by."""

from __future__ import annotations

from types import ModuleType

import demo_driver


def _run_demo() -> ModuleType:
    return demo_driver.load()


TRAINER_LOG = """\
[trainer 00:24:31] sync v=1 epoch=0 loss=6.4 checksum=94fc7b3cf58cfa89 output=b57a766f45ceddc9 mean=-0.0 tensors=32 \
bytes=1326856 seconds=0.36 gbps=0.004 acked=4 transport=gloo/tcp
[trainer 00:24:36] sync v=2 failed (attempt 1/5): rank 4 (inference replica 1 worker 1, pod demo-inference-1) died \
during sync v2 at epoch 0 (gloo broadcast failed: Connection closed by peer [10.77.147.5]:53425.)
[trainer 00:24:36] waiting for the operator's next epoch to re-form the group
[trainer 00:24:40] sync v=2 epoch=1 loss=6.3 checksum=0123456789abcdef output=fedcba9876543210 mean=0.0 tensors=32 \
bytes=1326856 seconds=0.05 gbps=0.026 acked=4 transport=gloo/tcp
"""


def test_a_failed_attempt_in_the_trainer_log_is_not_a_sync() -> None:
    sent = _run_demo().parse_trainer(TRAINER_LOG, "uid")
    assert [(s.version, s.epoch, s.acked) for s in sent] == [(1, 0, 4), (2, 1, 4)]
