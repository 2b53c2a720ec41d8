"""Fault injection for the fake controller: the misbehaviour a real controller shows under load and restarts.

Faults come from three sources, in this order: windows of time during which every request to an endpoint gets
the same fault (an outage, a token the controller no longer accepts), a script (exact answers for the next
requests to an endpoint, taken in order, for tests that need a precise sequence), and a plan of random rates
(for chaos). A fault either replaces the controller's answer before the request is processed (the request is
lost, as with a crash), or, for `drop_after` and `trickle`, comes after it was processed (the client cannot tell
whether it was, and retries: a duplicate).
"""

from __future__ import annotations

import random
from collections import deque
from typing import Final, Literal

import httpx
import msgspec
import trio

Endpoint = Literal["events", "commands"]
FaultKind = Literal[
    "status", "malformed", "wrong_shape", "huge", "nested", "bad_utf8", "drop", "drop_after", "latency", "trickle"
]
# A 200 answer the agent cannot use: not JSON, the wrong shape, nested 1,000 deep, a string that is not UTF-8.
GARBLED: Final[list[FaultKind]] = ["malformed", "wrong_shape", "nested", "bad_utf8"]


class Fault(msgspec.Struct, frozen=True, kw_only=True):
    """One injected misbehaviour."""

    kind: FaultKind = "status"
    status: int = 503
    retry_after: str | None = None
    # latency: the wait before answering; trickle: the wait before each byte of the answer.
    delay_s: float = 0.0


class Window(msgspec.Struct, frozen=True, kw_only=True):
    """Every request to `endpoint` between `start` and `end` (trio clock) gets `fault`."""

    endpoint: Endpoint
    start: float
    end: float
    fault: Fault


class FaultPlan(msgspec.Struct, kw_only=True):
    """Random faults, each rate a probability per request."""

    error_rate: float = 0.0
    error_statuses: list[int] = msgspec.field(default_factory=lambda: [500, 502, 503, 429, 408])
    retry_after_s: float | None = None
    malformed_rate: float = 0.0
    drop_rate: float = 0.0
    drop_after_rate: float = 0.0
    latency_s: float = 0.0
    duplicate_commands: bool = False
    seed: int | None = None


class DroppedConnection(httpx.RemoteProtocolError):
    """Raised by the app mid-response: the HTTP server closes the connection without a complete answer.

    An httpx transport error, so that a client calling the app in-process (`httpx.ASGITransport`) sees what
    it would see over a real connection.
    """


class FaultInjector:
    """Decides, per request, whether and how to misbehave."""

    def __init__(self, plan: FaultPlan | None = None) -> None:
        self.plan = plan or FaultPlan()
        self._rng = random.Random(self.plan.seed)
        self._scripts: dict[str, deque[Fault | None]] = {"events": deque(), "commands": deque()}
        self._windows: list[Window] = []
        self.injected = 0

    def set_plan(self, plan: FaultPlan) -> None:
        self.plan = plan
        self._rng = random.Random(plan.seed)

    def script(self, endpoint: Endpoint, faults: list[Fault | None]) -> None:
        """Answer the next requests to `endpoint` with `faults`, in order (None: answer normally)."""
        self._scripts[endpoint].extend(faults)

    def window(self, endpoint: Endpoint, fault: Fault, *, start: float, end: float) -> None:
        """Answer every request to `endpoint` between `start` and `end` (trio clock) with `fault`."""
        self._windows.append(Window(endpoint=endpoint, start=start, end=end, fault=fault))

    def choose(self, endpoint: Endpoint) -> Fault | None:
        now = trio.current_time()
        for window in self._windows:
            if window.endpoint == endpoint and window.start <= now < window.end:
                self.injected += 1
                return window.fault
        script = self._scripts[endpoint]
        fault = script.popleft() if script else self._random()
        if fault is not None and fault.kind == "drop_after" and endpoint == "commands" and not script:
            # Dropped after processing, a poll's commands would be gone for good (the seed's controller sends
            # each once): random chaos loses answers to events only.
            fault = Fault(kind="drop")
        if fault is not None:
            self.injected += 1
        return fault

    def _random(self) -> Fault | None:
        plan, roll = self.plan, self._rng.random()
        for rate, make in (
            (plan.error_rate, self._error),
            (plan.malformed_rate, lambda: Fault(kind=self._rng.choice(GARBLED))),
            (plan.drop_rate, lambda: Fault(kind="drop")),
            (plan.drop_after_rate, lambda: Fault(kind="drop_after")),
        ):
            if roll < rate:
                return make()
            roll -= rate
        if plan.latency_s > 0:
            return Fault(kind="latency", delay_s=self._rng.uniform(0, plan.latency_s))
        return None

    def _error(self) -> Fault:
        status = self._rng.choice(self.plan.error_statuses)
        retry_after = None
        if status in (429, 503) and self.plan.retry_after_s is not None:
            retry_after = f"{self.plan.retry_after_s:g}"
        return Fault(kind="status", status=status, retry_after=retry_after)
