"""The fault matrix: the demo group on the sandbox under each fault of issue 14, with real processes, the real
API server and the Helm-installed operator.

Each test injects one fault into a group that trains without end, and asserts
- recovery: the group Ready again and a sync after the fault verified on every worker (checksum and output
  equal to the trainer's), with the time it took, from the node's log timestamps;
- what it cost: `status.restarts`, the epoch, which pods were replaced;
- honesty: no version was reported as synced (a trainer `sync` line, any `status.lastSync` seen) unless every
  worker proved it holds it bit-exact (faults.Ledger.settle);
- that the fault hit what it was meant to hit, from the logs (a kill "mid-broadcast" landed while the victim
  was receiving that sync's data, and that sync never completed at the old formation).

"Mid-broadcast": the demo's model syncs in a fraction of a second, so these groups carry `DEMO_BALLAST_MB`
of extra buffers (demo_model.py), which makes a sync last seconds on this machine; the kill is timed by the
trainer's `sending v=N` line and a loader worker's `receiving: the first batch ...` line (faults.mid_broadcast).

Each result is printed as `FAULT <name>: ...` and, with $WEIGHTSYNC_FAULT_RESULTS, appended there as JSON.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import faults
import pytest
from weightsync.sandbox.procs import alive

from .conftest import FORM_S, RECOVER_S, DemoGroup, group_processes

pytestmark = [pytest.mark.e2e, pytest.mark.cluster]

TRAINER, ENGINE_0, ENGINE_1, ENGINE_2 = "demo-trainer-0", "demo-inference-0", "demo-inference-1", "demo-inference-2"
#: rendezvous.timeoutSeconds of the groups whose members stall: every wait of the runtime, and the heartbeat
#: threshold, follow it.
TIMEOUT = 10.0
#: MiB of ballast that makes a sync last long enough to be hit in the middle: about 2 s on an idle 2-core
#: machine (16 MiB took 0.7 s, and the kill, issued on reading the logs, landed after the last byte).
BALLAST_MB = 48


def start(group: DemoGroup, **kwargs: Any) -> tuple[int, dict[str, str]]:
    """Apply the demo training without end; wait for a verified sync and a Ready group; (epoch, pod UIDs)."""
    kwargs.setdefault("interval", 1.0)
    group.apply(steps=0, **kwargs)
    group.complete_sync("a first sync verified on every worker", timeout=FORM_S)
    status = group.ready()
    return int(status["epoch"]), group.uids()


def recovered(group: DemoGroup, after: float, accept: Callable[[Any], bool] = lambda s: True,
              timeout: float = RECOVER_S) -> tuple[float, Any]:
    """The first sync reported after `after` (a time.time()) that `accept`s and that every worker proved it
    holds: (the time its last proof was logged, the trainer's Sent)."""

    def found() -> tuple[float, Any] | None:
        group.ledger.read()
        return next(((at, s) for at, s in group.ledger.verified_syncs(after) if accept(s)), None)

    return group.wait(found, "a sync after the fault verified on every worker", timeout)


def honest(group: DemoGroup) -> faults.Audit:
    """No version reported as synced that a worker does not hold (the trainer's lines, every lastSync seen)."""
    group.status()
    audit = group.ledger.settle()
    assert not audit.lies, audit
    assert audit.verified >= 2, audit
    return audit


def result(name: str, **values: Any) -> None:
    line = {"fault": name, **values}
    print(f"FAULT {name}: " + " ".join(f"{k}={v}" for k, v in values.items()))
    out = os.environ.get("WEIGHTSYNC_FAULT_RESULTS")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(line) + "\n")


def ranks_of(group: DemoGroup, sent: Any) -> list[int]:
    return sorted({x.rank for _, x in group.ledger.loaded() if x.key == sent.key})


def incarnations(group: DemoGroup, pod: str) -> set[str]:
    """The UIDs (first 8 characters) of every pod of that name the node ever ran for this namespace."""
    return {p.name.rsplit("_", 1)[1] for p in group.sandbox.state_dir.joinpath("pods").glob(
        f"{group.namespace}_{pod}_*")}


# ------------------------------------------------------------------------------------------------ kills


def test_an_inference_worker_killed_mid_broadcast(demo_group: DemoGroup) -> None:
    epoch, before = start(demo_group, ballast_mb=BALLAST_MB)
    ledger, sb, ns = demo_group.ledger, demo_group.sandbox, demo_group.namespace
    version = faults.mid_broadcast(ledger, TRAINER, ENGINE_1)
    t0 = time.time()
    killed = faults.kill_pod(sb, ns, ENGINE_1)

    status = demo_group.ready(epoch_at_least=epoch + 1)
    assert status["epoch"] == epoch + 1 and status["restarts"] == 1, status
    after = demo_group.uids()
    assert after[ENGINE_1] != before[ENGINE_1] and after[TRAINER] == before[TRAINER]
    assert after[ENGINE_0] == before[ENGINE_0]
    assert not any(alive(p) for p in killed)
    at, sent = recovered(demo_group, t0, lambda s: s.epoch == epoch + 1)
    assert ranks_of(demo_group, sent) == [1, 2, 3, 4]

    # It landed mid-broadcast: the killed pod was receiving v, which never completed at the old epoch; the
    # trainer's attempt failed naming the pod, the survivors abandoned v, and v was sent again at epoch + 1.
    ledger.read()
    assert (version, epoch) not in {s.key for _, s in ledger.sent()}
    assert ledger.lines(rf"\] sync v={version} failed .*{ENGINE_1}", TRAINER), ledger.lines("failed", TRAINER)
    assert ledger.lines(rf"receive failed .*v{version} was abandoned", ENGINE_0)
    assert not ledger.lines(rf"\] loaded v={version} epoch={epoch} ", ENGINE_1)
    assert (version, epoch + 1) in {s.key for _, s in ledger.verified_syncs()}
    demo_group.wait(lambda: (demo_group.status().get("lastSync") or {}).get("epoch") == epoch + 1,
                    "status.lastSync to report a sync at the new epoch")
    audit = honest(demo_group)
    result("inference worker killed mid-broadcast", restarts=status["restarts"], recovery_s=round(at - t0, 1),
           version=version, syncs=audit.syncs)


def test_an_inference_worker_killed_while_idle(demo_group: DemoGroup) -> None:
    epoch, before = start(demo_group, interval=5.0)
    ledger, sb, ns = demo_group.ledger, demo_group.sandbox, demo_group.namespace

    def idle() -> int | None:
        """The last sync verified on every worker, and the trainer not sending the next one yet."""
        ledger.read()
        last = [r for r in ledger.records if r.pod == TRAINER and r.text.startswith("[trainer ")]
        done = ledger.verified_syncs()
        if not last or not done or faults.SENDING.search(last[-1].text) or done[-1][1].epoch != epoch:
            return None
        s = done[-1][1]
        return s.version if last[-1].text == s.line and time.time() - done[-1][0] < 2.0 else None

    version = faults.poll(idle, RECOVER_S, "the group to be idle between two syncs", interval=0.1)
    t0 = time.time()
    faults.kill_pod(sb, ns, ENGINE_1)

    status = demo_group.ready(epoch_at_least=epoch + 1)
    assert status["epoch"] == epoch + 1 and status["restarts"] == 1, status
    after = demo_group.uids()
    assert after[ENGINE_1] != before[ENGINE_1] and after[TRAINER] == before[TRAINER]
    at, sent = recovered(demo_group, t0, lambda s: s.epoch == epoch + 1)
    assert ranks_of(demo_group, sent) == [1, 2, 3, 4]
    # It landed while idle: v was complete before it, the next sync began after it.
    ledger.read()
    assert (version, epoch) in {s.key for _, s in ledger.verified_syncs()}
    assert ledger.lines(rf"\] sending v={version + 1} ", TRAINER)[0].at > t0
    assert not ledger.lines(rf"\] sync v={version} failed", TRAINER, after=t0)
    audit = honest(demo_group)
    result("inference worker killed while idle", restarts=status["restarts"], recovery_s=round(at - t0, 1),
           syncs=audit.syncs)


def test_the_trainer_killed_mid_broadcast(demo_group: DemoGroup) -> None:
    epoch, before = start(demo_group, ballast_mb=BALLAST_MB)
    ledger, sb, ns = demo_group.ledger, demo_group.sandbox, demo_group.namespace
    version = faults.mid_broadcast(ledger, TRAINER, ENGINE_0)
    t0 = time.time()
    faults.kill_pod(sb, ns, TRAINER)

    status = demo_group.ready(epoch_at_least=epoch + 1)
    assert status["epoch"] == epoch + 1 and status["restarts"] == 1, status
    after = demo_group.uids()
    assert after[TRAINER] != before[TRAINER]
    assert after[ENGINE_0] == before[ENGINE_0] and after[ENGINE_1] == before[ENGINE_1], "workers re-joined in place"
    at, sent = recovered(demo_group, t0, lambda s: s.epoch == epoch + 1)
    assert ranks_of(demo_group, sent) == [1, 2, 3, 4]
    assert after[TRAINER].startswith(sent.pod_uid), "the re-created trainer's weights"

    # Mid-broadcast: rank 2 had begun to receive v; the old trainer never reported v, and the workers
    # abandoned it (their into= destinations marked incomplete until the new trainer's first sync).
    ledger.read()
    old = before[TRAINER][:8]
    assert version not in {s.version for _, s in ledger.sent() if s.pod_uid == old}
    abandoned = ledger.lines(rf"receive failed .*v{version} was abandoned", after=t0 - 1)
    assert any(r.pod == ENGINE_0 and " worker 1 " in r.text for r in abandoned), abandoned
    assert not ledger.lines(rf"\] loaded v={version} epoch={epoch} ")
    audit = honest(demo_group)
    result("trainer killed mid-broadcast", restarts=status["restarts"], recovery_s=round(at - t0, 1),
           version=version, syncs=audit.syncs)


# ------------------------------------------------------------------------------------------------ stalls


def _stalled(group: DemoGroup, t0: float, ranks: tuple[int, ...]) -> float:
    """Wait until the trainer's sync failed naming one of `ranks` and the stall has outlasted the timeout
    by a fifth; returns the stall's length so far."""
    names = "|".join(f"rank {r} " for r in ranks)
    group.wait(lambda: group.ledger.lines(rf"\] sync v=\d+ failed .*({names})", TRAINER, after=t0, reread=True),
               "the trainer to give up on the stalled member", RECOVER_S)
    faults.poll(lambda: time.time() - t0 >= 1.2 * TIMEOUT, 2 * TIMEOUT, "the stall to outlast the timeout")
    return time.time() - t0


def _healed_in_place(group: DemoGroup, epoch: int, before: dict[str, str], t1: float) -> tuple[float, Any]:
    at, sent = recovered(group, t1, lambda s: s.epoch == epoch)
    assert ranks_of(group, sent) == [1, 2, 3, 4]
    status = group.ready()
    assert status["epoch"] == epoch and status.get("restarts", 0) == 0, status
    assert group.uids() == before, "no pod replaced: the group healed in place"
    return at, sent


def test_a_member_stopped_past_the_timeout_then_resumed(demo_group: DemoGroup) -> None:
    epoch, before = start(demo_group, timeout=TIMEOUT)
    sb, ns = demo_group.sandbox, demo_group.namespace
    pid = faults.worker_pid(sb, ns, ENGINE_1, 0)  # rank 3
    t0 = time.time()
    os.kill(pid, signal.SIGSTOP)
    try:
        stalled = _stalled(demo_group, t0, (3,))
    finally:
        os.kill(pid, signal.SIGCONT)
    t1 = time.time()
    at, _ = _healed_in_place(demo_group, epoch, before, t1)
    assert alive(pid), "the stopped worker lives on and re-joined"
    assert demo_group.ledger.lines(r"no heartbeat", TRAINER, after=t0), "declared lost by its heartbeat"
    audit = honest(demo_group)
    result("member stopped past the timeout, resumed", restarts=0, stalled_s=round(stalled, 1),
           recovery_s=round(at - t1, 1), syncs=audit.syncs)


def test_a_member_cut_off_the_network_past_the_timeout_then_restored(demo_group: DemoGroup) -> None:
    epoch, before = start(demo_group, timeout=TIMEOUT)
    sb, ns = demo_group.sandbox, demo_group.namespace
    netns = faults.pod_netns(sb, ns, ENGINE_1)  # ranks 3 and 4
    pids = group_processes(ns, "demo")
    t0 = time.time()
    faults.set_link(netns, up=False)
    try:
        stalled = _stalled(demo_group, t0, (3, 4))
    finally:
        faults.set_link(netns, up=True)
    t1 = time.time()
    at, _ = _healed_in_place(demo_group, epoch, before, t1)
    assert group_processes(ns, "demo") == pids, "every process lives on"
    audit = honest(demo_group)
    result("member network cut past the timeout, restored", restarts=0, cut_s=round(stalled, 1),
           recovery_s=round(at - t1, 1), syncs=audit.syncs)


# ------------------------------------------------------------------------------------------------ the operator


def test_the_operator_killed_during_a_re_formation(demo_group: DemoGroup) -> None:
    # A backoff of 5 s before the replacement is created: the operator is killed between counting the
    # failure (epoch bumped) and creating the new pod.
    epoch, before = start(demo_group, backoff=5.0)
    sb, ns = demo_group.sandbox, demo_group.namespace
    operator_runs = faults.operator_restarts(sb)
    t0 = time.time()
    faults.kill_pod(sb, ns, ENGINE_1)
    demo_group.wait(lambda: demo_group.status().get("epoch") == epoch + 1, "the operator to bump the epoch", 60)
    assert len(incarnations(demo_group, ENGINE_1)) == 1, "killed before the replacement was created"
    faults.kill_operator(sb)

    status = demo_group.ready(epoch_at_least=epoch + 1)
    assert status["epoch"] == epoch + 1 and status["restarts"] == 1, status
    demo_group.wait(lambda: faults.operator_restarts(sb) == operator_runs + 1, "the operator's container to "
                    "restart once", 120)
    after = demo_group.uids()
    assert after[ENGINE_1] != before[ENGINE_1] and {after[TRAINER], after[ENGINE_0]} == {before[TRAINER],
                                                                                         before[ENGINE_0]}
    assert len(incarnations(demo_group, ENGINE_1)) == 2, "replaced exactly once"
    at, sent = recovered(demo_group, t0, lambda s: s.epoch == epoch + 1)
    assert ranks_of(demo_group, sent) == [1, 2, 3, 4]
    audit = honest(demo_group)
    result("operator killed during a re-formation", restarts=status["restarts"], recovery_s=round(at - t0, 1),
           syncs=audit.syncs)


def test_the_operator_killed_while_a_scale_is_under_way(demo_group: DemoGroup) -> None:
    epoch, before = start(demo_group)
    sb, _ns = demo_group.sandbox, demo_group.namespace
    operator_runs = faults.operator_restarts(sb)
    t0 = time.time()
    demo_group.kubectl("scale", "ws", "demo", "--replicas=3")
    demo_group.wait(lambda: demo_group.status().get("epoch") == epoch + 1, "the operator to begin the scale", 60)
    faults.kill_operator(sb)

    status = demo_group.ready(epoch_at_least=epoch + 1, world_size=7)
    assert status["epoch"] == epoch + 1 and status.get("restarts", 0) == 0, status
    demo_group.wait(lambda: faults.operator_restarts(sb) == operator_runs + 1, "the operator's container to "
                    "restart once", 120)
    after = demo_group.uids()
    assert {k: after[k] for k in before} == before
    assert len(incarnations(demo_group, ENGINE_2)) == 1, "the new replica created once"
    at, sent = recovered(demo_group, t0, lambda s: s.epoch == epoch + 1)
    assert sent.acked == 6 and ranks_of(demo_group, sent) == [1, 2, 3, 4, 5, 6]
    audit = honest(demo_group)
    result("operator killed while a scale is under way", restarts=status.get("restarts", 0),
           recovery_s=round(at - t0, 1), syncs=audit.syncs)


# ------------------------------------------------------------------------------------------------ the node


def test_the_api_server_and_etcd_restarted_during_syncs(demo_group: DemoGroup) -> None:
    epoch, before = start(demo_group, interval=0.2)
    sb, ledger = demo_group.sandbox, demo_group.ledger
    pids = group_processes(demo_group.namespace, "demo")
    t0 = time.time()
    sb.restart("kube-apiserver")
    t1 = time.time()
    sb.restart("etcd")
    t2 = time.time()

    # Syncs went on while the control plane was away (they need nothing from it).
    ledger.read()
    during_api = [s for at, s in ledger.verified_syncs(t0) if at <= t1]
    during_etcd = [s for at, s in ledger.verified_syncs(t1) if at <= t2]
    assert during_api and during_etcd, (t0, t1, t2, ledger.verified_syncs(t0 - 5))
    assert all(s.epoch == epoch for s in during_api + during_etcd)
    # Status catches up: lastSync reaches a version the trainer sent after the restarts.
    _at, latest = recovered(demo_group, t2)
    demo_group.wait(lambda: (demo_group.status().get("lastSync") or {}).get("version", 0) >= latest.version,
                    f"status.lastSync to catch up with v{latest.version}")
    status = demo_group.ready()
    assert status["epoch"] == epoch and status.get("restarts", 0) == 0, status
    assert demo_group.uids() == before and group_processes(demo_group.namespace, "demo") == pids
    audit = honest(demo_group)
    result("API server and etcd restarted during syncs", restarts=0, outage_s=round(t2 - t0, 1),
           syncs_during=len(during_api) + len(during_etcd), status_caught_up_s=round(time.time() - t2, 1),
           syncs=audit.syncs)


def test_the_node_agent_restarted(demo_group: DemoGroup) -> None:
    epoch, before = start(demo_group, interval=0.5)
    sb, ns = demo_group.sandbox, demo_group.namespace
    pids = group_processes(ns, "demo")
    counts = {p: demo_group.pod(p)["status"]["containerStatuses"][0]["restartCount"] for p in before}
    t0 = time.time()
    sb.restart("node-agent")
    t1 = time.time()

    at, _ = recovered(demo_group, t1)
    status = demo_group.ready()
    assert status["epoch"] == epoch and status.get("restarts", 0) == 0, status
    assert demo_group.uids() == before, "no pod replaced"
    assert group_processes(ns, "demo") == pids, "the same processes, none added (nothing started twice)"
    assert {p: demo_group.pod(p)["status"]["containerStatuses"][0]["restartCount"] for p in before} == counts
    assert all(len(incarnations(demo_group, p)) == 1 for p in before)
    audit = honest(demo_group)
    result("node agent restarted", restarts=0, agent_restart_s=round(t1 - t0, 1), recovery_s=round(at - t1, 1),
           syncs=audit.syncs)
