"""When to try a controller call again, and how long to wait first.

Exponential backoff with full jitter (each wait is uniform between zero and the capped exponential), so that a
fleet of agents that lost their controller together does not come back in lockstep; a `Retry-After` from the
controller is honoured instead when it is given.
"""

from __future__ import annotations

import email.utils
import random
from datetime import UTC, datetime
from typing import Final

import msgspec

RETRYABLE_STATUS: Final = frozenset({408, 429})
MAX_RETRY_AFTER: Final = 300.0


class RetryPolicy(msgspec.Struct, frozen=True):
    base: float = 0.5
    cap: float = 30.0

    def delay(self, attempt: int, rng: random.Random | None = None, retry_after: float | None = None) -> float:
        """Seconds to wait before try number `attempt + 1` (attempt counts from 0)."""
        if retry_after is not None:
            # Never less than the base: "Retry-After: 0" from a struggling controller must not become a busy loop.
            return min(max(retry_after, self.base), MAX_RETRY_AFTER)
        ceiling = min(self.cap, self.base * 2 ** min(attempt, 32))
        return (rng or random).uniform(0, ceiling)


class Backoff:
    """The waits between the tries of one request, attempt after attempt, under a policy; `reset` once it works."""

    def __init__(self, policy: RetryPolicy, rng: random.Random | None = None) -> None:
        self._policy = policy
        self._rng = rng
        self.attempts = 0

    def next_delay(self, retry_after: float | None = None) -> float:
        """Seconds to wait before the next try (the controller's `Retry-After` when it gave one)."""
        delay = self._policy.delay(self.attempts, self._rng, retry_after)
        self.attempts += 1
        return delay

    def reset(self) -> None:
        self.attempts = 0


def is_retryable_status(status: int) -> bool:
    return status in RETRYABLE_STATUS or status >= 500


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or an HTTP date), capped at MAX_RETRY_AFTER; None when
    absent or unusable, whatever the text."""
    if value is None:
        return None
    value = value.strip()
    # ASCII only: str.isdigit() also accepts "²", which a Latin-1 header byte decodes to and float() refuses.
    if value.isascii() and value.isdigit():
        # float(), unlike int(), takes any number of digits: a huge value becomes inf, and then the cap.
        return min(float(value), MAX_RETRY_AFTER)
    try:
        moment = email.utils.parsedate_to_datetime(value)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        seconds = (moment - (now or datetime.now(UTC))).total_seconds()
    except (TypeError, ValueError, OverflowError):
        # Not a date, or one the calendar cannot hold: a year past 9999 is a ValueError, past a C long an
        # OverflowError.
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER)
