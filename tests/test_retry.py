"""Backoff with full jitter, and Retry-After in both of its forms.

Rules: pure functions; a seeded RNG where jitter is involved.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from miglet.retry import MAX_RETRY_AFTER, RetryPolicy, is_retryable_status, parse_retry_after


def test_full_jitter_stays_under_the_capped_exponential() -> None:
    policy = RetryPolicy(base=0.5, cap=8)
    rng = random.Random(3)
    for attempt in range(12):
        ceiling = min(8, 0.5 * 2**attempt)
        delays = [policy.delay(attempt, rng) for _ in range(200)]
        assert all(0 <= delay <= ceiling for delay in delays)
        assert max(delays) > ceiling * 0.8  # it really spreads over the whole range


def test_retry_after_is_honoured_within_bounds() -> None:
    policy = RetryPolicy(base=0.5, cap=8)
    assert policy.delay(0, retry_after=3) == 3
    assert policy.delay(5, retry_after=0) == 0.5  # never a busy loop
    assert policy.delay(0, retry_after=10_000) == MAX_RETRY_AFTER


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("7", 7.0),
        (" 0 ", 0.0),
        ("Wed, 15 Jan 2024 10:30:30 GMT", 30.0),
        ("Wed, 15 Jan 2024 10:29:00 GMT", 0.0),
        ("soon", None),
        ("-5", None),
        ("\u00b2", None),  # what a 0xB2 header byte decodes to: a digit to str.isdigit(), not to float()
    ],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    now = datetime(2024, 1, 15, 10, 30, tzinfo=UTC)
    assert parse_retry_after(header, now) == expected


@given(st.text())
def test_parse_retry_after_takes_any_header_text(header: str) -> None:
    # A controller (or a proxy in front of it) can send anything; a bad header means "no hint", never a crash.
    seconds = parse_retry_after(header)
    assert seconds is None or seconds >= 0


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(408, True), (429, True), (500, True), (503, True), (400, False), (401, False), (404, False), (409, False)],
)
def test_retryable_statuses(status: int, retryable: bool) -> None:
    assert is_retryable_status(status) is retryable
