"""The trainer's sync report (pod annotation weightsync.dev/last-sync) -> `LastSync`, or why not.

The trainer writes the annotation on its own pod, so whatever it holds is untrusted input: it is parsed
against bounds (`weightsync.api.models.LastSync`: integers within int64, numbers finite and not negative,
strings bounded, the whole annotation at most `MAX_SYNC_REPORT_BYTES`), unknown fields are ignored, and a
report that does not fit is refused with a message naming the field and why. Nothing of it can then reach
a status write the API server would refuse.

Pure: no kopf, no client.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import ValidationError

from weightsync.api.models import MAX_SYNC_REPORT_BYTES, LastSync

#: At most this many problems are named in one message (a report can be wrong in every field).
MAX_PROBLEMS = 3
#: Longest message (it goes into an event and into status.rejectedSyncReport.message).
MAX_MESSAGE_LENGTH = 1000


class InvalidSyncReport(ValueError):
    """The annotation is not a report the operator accepts; the message says what is wrong."""


def digest(raw: str) -> str:
    """SHA-256 (hex) of an annotation value: identifies a bad report, so that it is announced once."""
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def parse(raw: str) -> LastSync:
    """The report in `raw`; InvalidSyncReport when it is not one (or out of bounds)."""
    size = len(raw.encode("utf-8", "surrogatepass"))
    if size > MAX_SYNC_REPORT_BYTES:
        raise InvalidSyncReport(f"the annotation holds {size} bytes, more than the {MAX_SYNC_REPORT_BYTES} allowed")
    try:
        doc = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise InvalidSyncReport("not JSON the operator reads: nested too deeply") from None
    except ValueError as err:  # JSONDecodeError, NaN/Infinity, an integer of more than 4300 digits
        raise InvalidSyncReport(f"not JSON: {err}") from None
    if not isinstance(doc, dict):
        raise InvalidSyncReport(f"not a JSON object but {type(doc).__name__}")
    try:
        return LastSync.model_validate(doc)
    except ValidationError as err:
        errors = err.errors(include_url=False, include_context=False)
        problems = [_describe(e) for e in errors[:MAX_PROBLEMS]]
        if len(errors) > MAX_PROBLEMS:
            problems.append(f"and {len(errors) - MAX_PROBLEMS} more")
        raise InvalidSyncReport(_bounded("; ".join(problems))) from None


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
               float: "a number", type(None): "null"}  # fmt: skip


def _describe(error: Any) -> str:
    """`field: why`, never quoting the value (it is untrusted, and may be long)."""
    where = ".".join(str(part) for part in error["loc"]) or "the report"
    kind = str(error["type"])
    message = str(error["msg"]).removeprefix("Value error, ")
    if kind == "less_than_equal":
        message += " (the API server stores 64-bit integers)"
    elif kind.endswith("_type"):
        message += f", not {_JSON_TYPES.get(type(error.get('input')), 'that')}"
    return f"{where}: {message}"


def _bounded(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE_LENGTH else text[: MAX_MESSAGE_LENGTH - 3] + "..."
