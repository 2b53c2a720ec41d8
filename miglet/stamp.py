"""The header every event carries: who sent it, a unique id that stays the same across retries, and when."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

import msgspec

from miglet import protocol

E = TypeVar("E", bound=protocol.Event)


def utc_timestamp() -> str:
    """Now as RFC 3339 UTC with milliseconds, e.g. 2024-01-15T10:30:00.123Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Stamper:
    """Fills the header every event carries: who sent it, a unique id, and when."""

    def __init__(
        self,
        vm_id: str,
        pool_id: str,
        org_id: str | None,
        new_id: Callable[[], str] = lambda: os.urandom(16).hex(),
        now: Callable[[], str] = utc_timestamp,
    ) -> None:
        self._header = {"vm_id": vm_id, "pool_id": pool_id, "org_id": org_id}
        self._new_id = new_id
        self._now = now

    def stamp(self, event: E) -> E:
        return msgspec.structs.replace(event, **self._header, event_id=self._new_id(), timestamp=self._now())
