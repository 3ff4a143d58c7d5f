"""The demo's checker (examples/demo/run_demo.py) reads each worker's line, also from a log line that holds two."""

from __future__ import annotations

from types import ModuleType

import demo_driver


def _run_demo() -> ModuleType:
    return demo_driver.load()


def _loaded(rank: int, local: int) -> str:
    return (f"[inference demo-inference-1 worker {local} rank {rank} 00:24:40] loaded v=3 epoch=0 rank={rank} "
            f"checksum=94fc7b3cf58cfa89 output=b57a766f45ceddc9 mean=-0.000012 style=into tensors=32 bytes=1326856 "
            f"seconds=0.0510 gbps=0.026 transport=gloo/tcp")


def test_two_workers_lines_fused_into_one_log_line_are_both_counted() -> None:
    run_demo = _run_demo()
    # As CI saw it: worker 1's text, worker 0's whole line, then the two newlines.
    log = _loaded(4, 1) + _loaded(3, 0) + "\n\n" + _loaded(1, 0) + "\n"
    loaded = run_demo.parse_inference(log, "demo-inference-1", "uid")
    assert sorted((x.rank, x.version, x.epoch) for x in loaded) == [(1, 3, 0), (3, 3, 0), (4, 3, 0)]
    assert all(x.line.endswith("transport=gloo/tcp") for x in loaded)  # each cut at the next one's start
    assert [r for r in run_demo.records(log) if r] == [_loaded(4, 1), _loaded(3, 0), _loaded(1, 0)]


def test_a_verdict_counts_workers_not_lines() -> None:
    run_demo = _run_demo()
    sent = run_demo.parse_trainer(
        "[trainer 00:24:40] sync v=3 epoch=0 loss=6.3 checksum=94fc7b3cf58cfa89 output=b57a766f45ceddc9 "
        "mean=0.0 tensors=32 bytes=1326856 seconds=0.05 gbps=0.026 acked=2 transport=gloo/tcp\n", "t")
    verdict = run_demo.Verdict(sent[0])
    verdict.matched += run_demo.parse_inference(_loaded(1, 0) + "\n" + _loaded(1, 0) + "\n", "p", "u")
    assert not verdict.complete  # one worker, twice
    verdict.matched += run_demo.parse_inference(_loaded(2, 1) + "\n", "p", "u")
    assert verdict.complete


def test_a_cut_line_proves_nothing() -> None:
    cut = _loaded(2, 1).split(" checksum=")[0]
    assert _run_demo().parse_inference(cut + "\n", "p", "u") == []
