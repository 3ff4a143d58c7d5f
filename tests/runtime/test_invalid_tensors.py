"""A trainer's mistakes in what it passes to `send()`: refused before any byte moves, named, the group intact.

Real processes over gloo: a trainer driven by commands and a long-lived receiver that reports every outcome.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from local_members import (
    digest,
    end_on_command,
    group_envs,
    make_tensors,
    run_receiver_until,
    run_trainer_on_command,
    sparse_victim,
)
from weightsync.runtime import InvalidTensorsError
from weightsync.runtime.errors import ConfigMismatchError
from weightsync.runtime.source import as_source, pair_problem

COUNT = 40


def _next(results: Any, rank: int, pending: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    while not pending.get(rank):
        r = results.get(timeout=60)
        pending.setdefault(r["rank"], []).append(r)
    return pending[rank].pop(0)


@contextlib.contextmanager
def trainer_and_engine() -> Iterator[tuple[Any, Any, Any, Any]]:
    """A trainer sending on command and a receiver reporting every outcome until it holds v4: (results,
    commands, trainer, engine)."""
    ctx = mp.get_context("spawn")
    results, commands = ctx.Queue(), ctx.Queue()
    envs = group_envs(replicas=1, workers_per_replica=1, timeout=30)
    trainer = ctx.Process(target=run_trainer_on_command, args=(envs[0], COUNT, commands, results))
    engine = ctx.Process(target=run_receiver_until, args=(envs[1], 0, COUNT, 4, results))
    trainer.start()
    engine.start()
    try:
        yield results, commands, trainer, engine
    finally:
        end_on_command(commands, trainer, engine)


def test_a_sparse_tensor_under_a_known_name_is_refused_before_the_group_hears_of_it() -> None:
    victim = make_tensors(COUNT, 0)[sparse_victim(make_tensors(COUNT, 0))][0]
    pending: dict[int, list[dict[str, Any]]] = {}
    with trainer_and_engine() as (results, commands, trainer, engine):
        commands.put(0)
        first = _next(results, 0, pending)
        assert "error" not in first, first
        assert _next(results, 1, pending)["digest"] == first["digest"]

        # Same names, shapes and dtypes as v0 (the cached tensor list), one tensor not dense; then a name twice.
        for version, variant, words in ((1, "sparse", f"tensor {victim!r} is torch.sparse_coo"),
                                        (2, "csr", f"tensor {victim!r} is torch.sparse_csr"),
                                        (3, "duplicate", "appears twice")):
            commands.put((version, variant))
            sent = _next(results, 0, pending)
            assert sent["error"] == "InvalidTensorsError" and sent["value_error"], sent
            assert words in sent["message"], sent

        # The group was never touched: the next sync (a state dict this time) arrives with no re-formation,
        # in the same processes, and it is the receiver's next outcome: none of the refused ones reached it.
        commands.put((4, "mapping"))
        sent, got = _next(results, 0, pending), _next(results, 1, pending)
        assert "error" not in sent and "error" not in got, (sent, got)
        assert got["version"] == 4 and got["digest"] == sent["digest"] == digest(make_tensors(COUNT, 4))
        report = json.loads(sent["report"])
        assert report["epoch"] == 0 and report["formation_seconds"] == 0, report
        assert got["pid"] == engine.pid and sent["pid"] == trainer.pid


def test_a_first_sync_with_a_mistake_is_refused_before_the_group_hears_of_it() -> None:
    pending: dict[int, list[dict[str, Any]]] = {}
    with trainer_and_engine() as (results, commands, _, _):
        for version, variant, words in ((0, "triple", "item 0 is a tuple"), (1, "sparse", "sparse_coo"),
                                        (2, "csr", "sparse_csr"), (3, "duplicate", "appears twice")):
            commands.put((version, variant))
            sent = _next(results, 0, pending)
            assert sent["error"] == "InvalidTensorsError" and sent["value_error"], sent
            assert words in sent["message"], sent
        commands.put(4)
        sent, got = _next(results, 0, pending), _next(results, 1, pending)
        assert "error" not in sent and got["version"] == 4 and got["digest"] == sent["digest"], (sent, got)
        assert json.loads(sent["report"])["formation_seconds"] > 0  # the group formed only now


@pytest.mark.parametrize(("given", "words"), [
    ("abc", "not str"),
    (torch.zeros(3), "not Tensor"),
    (42, "not int"),
    ([("a", torch.zeros(1)), "bc"], "item 1 is a str: 'bc'"),
    ([("a", torch.zeros(1)), ("b",)], "item 1 is a tuple"),
    ([(3, torch.zeros(1))], "item 0's name is a int, not a str"),
    ([("w", [1.0, 2.0])], "tensor 'w' (item 0) is a list, not a torch.Tensor"),
])
def test_what_is_not_name_tensor_pairs_is_named(given: object, words: str) -> None:
    with pytest.raises(InvalidTensorsError, match=words.replace("(", r"\(").replace(")", r"\)")) as caught:
        _, items, _ = as_source(given)
        problem = pair_problem(items)
        if problem is not None:
            raise InvalidTensorsError(problem)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, ConfigMismatchError)


def test_a_state_dict_is_taken_as_its_items() -> None:
    named = make_tensors(5, 0)
    source, items, tensors = as_source(dict(named))
    assert source is None and [n for n, _ in items] == [n for n, _ in named]
    assert all(a is b for a, (_, b) in zip(tensors, named, strict=True))
