"""sync_report.py: the trainer's report annotation is untrusted input, parsed against bounds."""

from __future__ import annotations

import json
from typing import Any

import pytest
from weightsync.operator import sync_report

from weightsync.api.models import MAX_STATUS_INT, MAX_SYNC_REPORT_BYTES

#: What the runtime writes (runtime/report.py: SyncReport.to_json()).
REPORT = {"version": 7, "tensors": 339, "bytes": 15_231_200_000, "seconds": 0.054, "gbps": 280.81,
          "acked": [1, 2], "transport": "nccl over IB", "epoch": 3, "time": "2026-01-01T00:00:00Z",
          "formation_seconds": 1.25}  # fmt: skip


def with_(**fields: Any) -> str:
    return json.dumps({**REPORT, **fields})


def test_the_runtimes_report_is_accepted_and_unknown_fields_ignored() -> None:
    last = sync_report.parse(json.dumps({**REPORT, "someday": {"nested": [1, 2]}}))
    assert last.model_dump(by_alias=True, exclude_none=True) == {
        k: v for k, v in REPORT.items() if k not in ("acked", "formation_seconds")
    }


@pytest.mark.parametrize(
    "fields",
    [
        {"version": MAX_STATUS_INT, "tensors": 0, "bytes": MAX_STATUS_INT, "epoch": MAX_STATUS_INT},
        {"seconds": 0, "gbps": 0.0, "transport": "x" * 128, "time": "2026-12-31T23:59:59.123456789+05:30"},
        {"tensors": None, "bytes": None, "seconds": None, "gbps": None, "transport": None, "time": None},
    ],
    ids=["integer-bounds", "other-bounds", "nulls"],
)
def test_values_at_the_bounds_are_accepted(fields: dict[str, Any]) -> None:
    sync_report.parse(with_(**fields))


def test_the_integer_bound_is_exact_in_a_float64() -> None:
    """The CRD's bound is a float64 on the API server: 2^63 - 1 would read as 2^63, outside int64."""
    assert int(float(MAX_STATUS_INT)) == MAX_STATUS_INT < 2**63 - 1 < int(float(2**63 - 1))


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (with_(version=99999999999999999999), "version: Input should be less than or equal to"),
        (with_(version=MAX_STATUS_INT + 1), "version: Input should be less than or equal to"),
        (with_(version=-1), "version: Input should be greater than or equal to 0"),
        (with_(bytes=-5), "bytes: Input should be greater than or equal to 0"),
        (with_(epoch=2**64), "epoch: Input should be less than or equal to"),
        (with_(version="7"), "version: Input should be a valid integer, not a string"),
        (with_(version=7.5), "version: Input should be a valid integer, not a number"),
        (with_(version=True), "version: Input should be a valid integer, not a boolean"),
        (with_(tensors=[1]), "tensors: Input should be a valid integer, not an array"),
        (with_(seconds=-0.5), "seconds: Input should be greater than or equal to 0"),
        (with_(gbps="fast"), "gbps: Input should be a valid number, not a string"),
        (with_(transport="x" * 129), "transport: String should have at most 128 characters"),
        (with_(transport=5), "transport: Input should be a valid string, not an integer"),
        (with_(time="yesterday"), "time: must be an RFC 3339 timestamp"),
        (with_(time="2026-02-30T00:00:00Z"), "time: must be an RFC 3339 timestamp"),
        (with_(time="2026-01-01 00:00:00"), "time: must be an RFC 3339 timestamp"),
        (with_(time="2026-01-01T00:00:00Z\n"), "time: must be an RFC 3339 timestamp"),
        (with_(time="2" * 65), "time: String should have at most 64 characters"),
        (json.dumps({"tensors": 3}), "version: Field required"),
        (with_(version=None), "version: Input should be a valid integer, not null"),
        ('{"version": 1, "gbps": 1e400}', "gbps: Input should be a finite number"),
        ('{"version": 1, "gbps": NaN}', "not JSON: NaN is not a number"),
        ('{"version": 1, "seconds": -Infinity}', "not JSON: -Infinity is not a number"),
        ("not json", "not JSON: Expecting value"),
        ('{"version": 1', "not JSON:"),
        ("[1, 2]", "not a JSON object but list"),
        ('"7"', "not a JSON object but str"),
        ("[" * 5000 + "]" * 5000, "nested too deeply"),
        ('{"version": 1' + "0" * 5000 + "}", "not JSON: Exceeds the limit"),
        (with_(padding="x" * MAX_SYNC_REPORT_BYTES), f"more than the {MAX_SYNC_REPORT_BYTES} allowed"),
    ],
)
def test_a_bad_report_is_refused_naming_the_field_and_why(raw: str, problem: str) -> None:
    with pytest.raises(sync_report.InvalidSyncReport) as err:
        sync_report.parse(raw)
    assert problem in str(err.value)
    assert len(str(err.value)) <= sync_report.MAX_MESSAGE_LENGTH


def test_the_message_never_quotes_the_value_and_is_bounded() -> None:
    secret = "s3cr3t-" * 10
    raw = json.dumps({"version": secret, "tensors": secret, "bytes": secret, "seconds": secret, "gbps": secret})
    with pytest.raises(sync_report.InvalidSyncReport) as err:
        sync_report.parse(raw)
    assert "s3cr3t" not in str(err.value)
    assert str(err.value).startswith("version: ") and str(err.value).endswith("and 2 more")


def test_the_digest_tells_reports_apart() -> None:
    assert sync_report.digest("a") == sync_report.digest("a") != sync_report.digest("b")
    assert len(sync_report.digest("\ud800 lone surrogate")) == 64  # json.loads makes these from "\\ud800"


def test_large_finite_numbers_are_accepted() -> None:
    assert sync_report.parse(with_(gbps=1e308, seconds=5e-324)).gbps == 1e308
