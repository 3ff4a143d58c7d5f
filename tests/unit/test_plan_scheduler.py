"""The reconcile scheduler: one reconcile at a time per object, coalesced triggers, delayed re-triggers."""

from __future__ import annotations

import asyncio
import threading

from weightsync.operator.scheduler import Key, Scheduler

KEY: Key = ("ns", "ws")


def test_triggers_during_a_reconcile_coalesce_into_one_rerun() -> None:
    started, release = threading.Event(), threading.Event()
    calls: list[Key] = []

    def reconcile(key: Key) -> float | None:
        calls.append(key)
        if len(calls) == 1:
            started.set()
            assert release.wait(10)
        return None

    async def scenario() -> None:
        sched = Scheduler(reconcile)
        first = asyncio.create_task(sched.trigger(KEY))
        await asyncio.to_thread(started.wait, 10)
        await asyncio.gather(*(sched.trigger(KEY) for _ in range(5)))  # return at once: coalesced
        release.set()
        await asyncio.wait_for(first, 10)

    asyncio.run(scenario())
    assert calls == [KEY, KEY]


def test_requeue_after_runs_again_unless_forgotten_or_paused() -> None:
    calls: list[Key] = []

    def reconcile(key: Key) -> float | None:
        calls.append(key)
        return 0.01 if len(calls) < 3 else None

    async def scenario() -> None:
        sched = Scheduler(reconcile)
        await sched.trigger(KEY)
        for _ in range(200):
            if len(calls) >= 3:
                break
            await asyncio.sleep(0.01)
        sched.later(KEY, 0.01)
        sched.forget(KEY)
        sched.paused = True
        sched.known.add(KEY)
        sched.later(KEY, 0.01)
        await asyncio.sleep(0.05)  # long enough for both timers to have fired, had they been kept

    asyncio.run(scenario())
    assert calls == [KEY] * 3


def test_a_failing_reconcile_is_retried_later() -> None:
    calls: list[Key] = []

    def reconcile(key: Key) -> float | None:
        calls.append(key)
        raise RuntimeError("API server unreachable")

    async def scenario() -> Scheduler:
        sched = Scheduler(reconcile)
        await sched.trigger(KEY)
        return sched

    sched = asyncio.run(scenario())
    assert calls == [KEY]
    assert KEY in sched._timers
