"""Timestamps as the API server writes them (RFC 3339, seconds, UTC). Pure."""

from __future__ import annotations

from datetime import datetime


def rfc3339(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
