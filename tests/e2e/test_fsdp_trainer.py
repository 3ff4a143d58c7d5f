"""A trainer of several pods on the sandbox: examples/fsdp.yaml, an FSDP2 job of two trainer pods (torchrun in each,
its arguments written from the trainer pods' injected environment; gloo on CPU; the demo's TinyLM `fully_shard`ed
over the job) and two inference pods running the demo's engine, wired by the Helm-installed operator.

What a user checks: every sync the job's rank 0 reports was loaded bit for bit by every inference worker (their
checksum and output equal the trainer's), and every other rank of the job took part; `kubectl get ws -o wide`
shows both trainer pods ready. An inference pod killed is replaced and the job, which has finished training,
re-sends its weights to it (every rank, together) without a trainer pod restarted. Then trainer pod 1 is
SIGKILLed: the job is lost, so the operator re-creates both trainer pods (new UIDs) at a new epoch, counting one
restart; the inference pods stay (same UIDs) and re-join in place; the new job's syncs reach every worker.
"""

from __future__ import annotations

import re
from typing import Any

import faults
import pytest
import yaml
from weightsync.sandbox.procs import alive

from .conftest import FORM_S, ROOT, DemoGroup, run_demo

pytestmark = [pytest.mark.e2e, pytest.mark.cluster]

NAME = "fsdp"
TRAINER_0, TRAINER_1 = f"{NAME}-trainer-0", f"{NAME}-trainer-1"
ENGINE_0, ENGINE_1 = ENGINES = (f"{NAME}-inference-0", f"{NAME}-inference-1")
MANIFEST = ROOT / "examples" / "fsdp.yaml"
#: Training steps, a sync each; then the job holds the last version and re-sends it at each new epoch.
STEPS = 3
#: torchrun workers per trainer pod: a job of 2 x RANKS_PER_POD ranks.
RANKS_PER_POD = 2
WORLD = 2 * RANKS_PER_POD


def manifest() -> dict[str, Any]:
    """examples/fsdp.yaml with EXAMPLES pointing at this checkout (the sandbox runs the commands as local
    processes), STEPS steps, RANKS_PER_POD ranks in each trainer pod."""
    ws = yaml.safe_load(MANIFEST.read_text())
    ws["metadata"]["name"] = NAME
    ws["spec"]["trainer"]["ranksPerPod"] = RANKS_PER_POD
    for role in ("trainer", "inference"):
        for container in ws["spec"][role]["template"]["spec"]["containers"]:
            for var in container["env"]:
                if var["name"] == "EXAMPLES":
                    var["value"] = str(ROOT / "examples")
    command = ws["spec"]["trainer"]["template"]["spec"]["containers"][0]["command"]
    assert "--steps 8" in command[-1], command
    command[-1] = command[-1].replace("--steps 8", f"--steps {STEPS}")
    return ws


@pytest.fixture
def fsdp_group(demo_group: DemoGroup, kube_api: Any) -> DemoGroup:
    """The demo_group fixture (its clean-up, its log parsing and checks), for this group's name."""
    demo_group.name = NAME
    demo_group.watcher = run_demo.GroupWatcher(kube_api, demo_group.namespace, NAME)
    demo_group.ledger = faults.Ledger(demo_group.sandbox, demo_group.namespace, NAME)
    return demo_group


def workers(verdict: run_demo.Verdict) -> dict[int, str]:
    """Rank -> pod UID of the workers that loaded this sync with the trainer's checksum and output."""
    return {x.rank: x.pod_uid for x in verdict.matched}


def every_rank_joined(group: DemoGroup, version: int, epoch: int) -> None:
    """Each rank of the job started with torchrun's rank from the injected env (RANKS_PER_POD in each pod), and
    each rank other than 0 logged joining the gathers of sync `version` at `epoch`."""

    def joined(rank: int) -> bool:
        pod = rank // RANKS_PER_POD
        log = group.watcher.log_of(f"{NAME}-trainer-{pod}")
        started = f"job rank {rank}/{WORLD} (pod {pod} of 2, {RANKS_PER_POD} per pod)" in log
        line = rf"\[trainer rank {rank} [\d:]+\] sync v={version} at epoch {epoch}: joined the gathers"
        return started and (rank == 0 or re.search(line, log) is not None)

    def check() -> bool:
        group.watcher.refresh()
        return all(joined(rank) for rank in range(WORLD))

    group.wait(check, f"every trainer rank to log joining sync v{version} at epoch {epoch}")


def test_an_fsdp_trainer_of_two_pods_keeps_every_worker_in_step_and_is_re_created_whole_when_a_pod_dies(
    fsdp_group: DemoGroup,
) -> None:
    group = fsdp_group
    group.sandbox.kubectl("apply", "-n", group.namespace, "-f", "-", input=yaml.safe_dump(manifest()))

    # Every step's sync of the sharded model, each loaded bit for bit by both workers.
    group.complete_sync(f"{STEPS} syncs verified on every worker", lambda v: v.sent.version == STEPS, FORM_S)
    verified = {v.sent.version: v for v in group.watcher.verdicts() if v.complete}
    assert sorted(verified) == list(range(1, STEPS + 1)), sorted(verified)
    assert all(sorted(workers(verified[v])) == [1, 2] for v in verified)
    assert len({v.sent.checksum for v in verified.values()}) == STEPS, "each step changed the weights"
    assert "tensors=30 " in verified[1].sent.line, "every parameter of TinyLM, gathered from its shards"
    every_rank_joined(group, STEPS, 0)

    status = group.ready()
    assert (status["epoch"], status["trainerReady"], status["ready"]) == (0, "2/2", "4/4"), status
    table = group.kubectl("get", "ws", NAME, "-o", "wide").splitlines()
    row = dict(zip(table[0].split(), table[1].split(), strict=True))
    assert (row["PHASE"], row["READY"], row["TRAINER"], row["RESTARTS"]) == ("Ready", "4/4", "2/2", "0"), table

    # An inference pod dies: it is replaced, and the job re-sends the version it holds, every rank together.
    before = group.uids()
    group.kill_pod_processes(ENGINE_1)
    status = group.ready(epoch_at_least=1)
    assert (status["epoch"], status["restarts"]) == (1, 1), status
    after = group.uids()
    assert after[ENGINE_1] != before[ENGINE_1], "the killed engine pod is replaced"
    stayed = (TRAINER_0, TRAINER_1, ENGINE_0)
    assert {n: after[n] for n in stayed} == {n: before[n] for n in stayed}, "the job and the other engine stay"
    verdict = group.complete_sync("the held version re-sent at the new epoch, verified on every worker",
                                  lambda v: v.sent.epoch == 1)
    assert verdict.sent.version == STEPS and verdict.sent.checksum == verified[STEPS].sent.checksum, verdict.sent
    assert workers(verdict) == {1: after[ENGINE_0], 2: after[ENGINE_1]}
    every_rank_joined(group, STEPS, 1)

    # Trainer pod 1 dies: the job is lost, so both trainer pods are re-created; the engines stay.
    before = group.uids()
    killed = group.kill_pod_processes(TRAINER_1)
    status = group.ready(epoch_at_least=2)
    assert (status["epoch"], status["restarts"]) == (2, 2), status
    after = group.uids()
    assert after[TRAINER_0] != before[TRAINER_0] and after[TRAINER_1] != before[TRAINER_1], (
        "both trainer pods are re-created")
    assert {n: after[n] for n in ENGINES} == {n: before[n] for n in ENGINES}, "the engines re-joined in place"
    assert not any(alive(pid) for pid in killed)

    verdict = group.complete_sync("a sync of the re-created job verified on every worker",
                                  lambda v: v.sent.pod_uid == after[TRAINER_0])
    assert verdict.sent.epoch == 2, verdict.sent.line
    assert workers(verdict) == {1: after[ENGINE_0], 2: after[ENGINE_1]}
    every_rank_joined(group, verdict.sent.version, 2)
    group.wait(lambda: (group.status().get("lastSync") or {}).get("epoch") == 2,
               "status.lastSync to report a sync of the re-created job")
    status = group.status()
    assert (status["epoch"], status["restarts"], status["trainerReady"]) == (2, 2, "2/2"), (
        "one failure, one new epoch, however many pods the job lost")
