"""The demo group through failures, a scale and its deletion, with real processes on the sandbox.

The trainer trains without end (`--steps 0`, a sync a second). Each test acts on the group mid-run and then
checks what a user would: `kubectl get ws` (phase, epoch, world size, lastSync), which pods were replaced
and which re-joined in place (their UIDs), and that the next sync reached every worker with the trainer's
weights (the checksum and the output each worker logs for that version equal the trainer's).
"""

from __future__ import annotations

import pytest
from weightsync.sandbox.procs import alive

from .conftest import FORM_S, GONE_S, DemoGroup, group_processes, run_demo

pytestmark = [pytest.mark.e2e, pytest.mark.cluster]

TRAINER, ENGINE_0, ENGINE_1, ENGINE_2 = "demo-trainer-0", "demo-inference-0", "demo-inference-1", "demo-inference-2"


def start(group: DemoGroup, replicas: int = 2) -> tuple[int, dict[str, str]]:
    """Apply the demo training without end; wait for a verified sync and a Ready group; (epoch, pod UIDs)."""
    group.apply(steps=0, interval=1.0, replicas=replicas)
    group.complete_sync("a first sync verified on every worker", timeout=FORM_S)
    status = group.ready()
    return status["epoch"], group.uids()


def ranks(verdict: run_demo.Verdict) -> list[int]:
    return sorted({x.rank for x in verdict.matched})


def test_an_inference_pod_killed_mid_run_is_replaced_and_the_next_sync_reaches_every_member(
    demo_group: DemoGroup,
) -> None:
    epoch, before = start(demo_group)
    killed = demo_group.kill_pod_processes(ENGINE_1)

    status = demo_group.ready(epoch_at_least=epoch + 1)
    assert status["epoch"] == epoch + 1, status
    assert status["restarts"] == 1, status
    after = demo_group.uids()
    assert after[ENGINE_1] != before[ENGINE_1], "the killed pod is replaced by a new one"
    assert after[TRAINER] == before[TRAINER] and after[ENGINE_0] == before[ENGINE_0], "the others re-joined in place"
    assert not any(alive(pid) for pid in killed)

    verdict = demo_group.complete_sync("a sync at the new epoch verified on every worker",
                                       lambda v: v.sent.epoch == epoch + 1)
    assert ranks(verdict) == [1, 2, 3, 4]
    assert {x.pod_uid for x in verdict.matched if x.rank in (3, 4)} == {after[ENGINE_1]}
    demo_group.wait(lambda: (demo_group.status().get("lastSync") or {}).get("epoch") == epoch + 1,
                    "status.lastSync to report a sync at the new epoch")


def test_a_scale_from_2_to_3_replicas_during_training_reaches_all_in_the_next_sync(demo_group: DemoGroup) -> None:
    epoch, before = start(demo_group, replicas=2)
    demo_group.kubectl("scale", "ws", "demo", "--replicas=3")

    status = demo_group.ready(epoch_at_least=epoch + 1, world_size=7)
    assert status["epoch"] == epoch + 1 and status["ready"] == "4/4", status
    assert status.get("restarts", 0) == 0, "a scale is not a failure"
    after = demo_group.uids()
    assert {k: after[k] for k in before} == before, "the trainer and both engines re-joined without a restart"
    assert ENGINE_2 in after

    verdict = demo_group.complete_sync("a sync at the new epoch verified on all 6 workers",
                                       lambda v: v.sent.epoch == epoch + 1)
    assert verdict.sent.acked == 6
    assert ranks(verdict) == [1, 2, 3, 4, 5, 6]
    assert {x.pod for x in verdict.matched if x.rank in (5, 6)} == {ENGINE_2}


def test_a_killed_trainer_is_recreated_and_the_group_resumes(demo_group: DemoGroup) -> None:
    epoch, before = start(demo_group)
    demo_group.watcher.refresh()
    old_syncs = [s for s in demo_group.watcher.sent() if s.pod_uid == before[TRAINER]]
    demo_group.kill_pod_processes(TRAINER)

    status = demo_group.ready(epoch_at_least=epoch + 1)
    assert status["epoch"] == epoch + 1, status
    after = demo_group.uids()
    assert after[TRAINER] != before[TRAINER], "the trainer pod is re-created"
    assert after[ENGINE_0] == before[ENGINE_0] and after[ENGINE_1] == before[ENGINE_1], (
        "the inference pods re-joined the new trainer in place")

    verdict = demo_group.complete_sync("a sync of the re-created trainer verified on every worker",
                                       lambda v: v.sent.pod_uid == after[TRAINER])
    assert ranks(verdict) == [1, 2, 3, 4] and verdict.sent.epoch == epoch + 1
    # The demo trainer keeps no checkpoint: the new one starts again at step 1 from new random weights, and
    # the workers now hold those (their checksums equal the new trainer's, not the old one's).
    new_syncs = [s for s in demo_group.watcher.sent() if s.pod_uid == after[TRAINER]]
    assert new_syncs[0].version == 1
    old_v1 = next(s for s in old_syncs if s.version == 1)
    assert new_syncs[0].checksum != old_v1.checksum
    demo_group.wait(lambda: (demo_group.status().get("lastSync") or {}).get("epoch") == epoch + 1,
                    "status.lastSync to report the new trainer's sync")


def test_deleting_the_weightsync_ends_every_process(demo_group: DemoGroup) -> None:
    start(demo_group)
    processes = group_processes(demo_group.namespace, "demo")
    # the trainer, two engine pods and their four workers
    assert len(processes) >= 7, processes
    containers = {int(p["status"]["containerStatuses"][0]["containerID"].removeprefix("sandbox://"))
                  for p in (demo_group.pod(n) for n in (TRAINER, ENGINE_0, ENGINE_1))}
    assert containers <= set(processes)

    demo_group.kubectl("delete", "ws", "demo", "--timeout=60s")
    demo_group.wait(lambda: not demo_group.watcher.pods(), "every member pod to be gone", GONE_S)
    demo_group.wait(lambda: not any(alive(pid) for pid in processes), "every member process to end", GONE_S)
    assert group_processes(demo_group.namespace, "demo") == []
    demo_group.wait(lambda: demo_group.kubectl("get", "services,secrets,roles,rolebindings", "-l",
                                               "weightsync.dev/name=demo", "-o", "name") == "",
                    "the group's Service, Secret, Role and RoleBinding to be collected", GONE_S)
