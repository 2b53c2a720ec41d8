"""How long each phase of getting a runner online took, counted from the start of the process.

The figures are the ones fleet operators watch ("time to runner online"): logged when the runner starts
listening and sent to the controller in `runner_registered` as `timings`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Final

from miglet.machine import AgentState, Phase
from miglet.procfs import clock_ticks_per_second, read_stat

# Phase changes that mark a milestone, and the name under which it is reported.
_MILESTONES: Final = {
    (Phase.WAITING_FOR_CONTROLLER, Phase.READY): "acknowledged_s",
    (Phase.READY, Phase.REGISTERING_RUNNER): "command_received_s",
}


def process_start() -> float:
    """The `time.monotonic()` reading at which this process started (now, where /proc cannot tell)."""
    now = time.monotonic()
    try:
        started = read_stat().start_ticks / clock_ticks_per_second()
        with open("/proc/uptime", "rb") as handle:
            uptime = float(handle.read(256).split()[0])
    except (OSError, ValueError, IndexError):
        return now
    age = uptime - started
    if not math.isfinite(age):  # float() also reads "inf" and "nan", which no clock shows
        return now
    return now - max(0.0, age)


class PhaseTimings:
    """Seconds from `origin` to each milestone, in the order they were reached (and a few durations)."""

    def __init__(self, origin: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._origin = origin
        self._clock = clock
        self._marks: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self._marks[name] = round(self._clock() - self._origin, 4)

    def record(self, name: str, seconds: float) -> None:
        """A duration rather than a milestone (how long the warmup ran, say)."""
        self._marks[name] = round(seconds, 4)

    def observe(self, before: AgentState, after: AgentState) -> None:
        """A `Driver` observer: marks the milestones that phase changes stand for."""
        name = _MILESTONES.get((before.phase, after.phase))
        if name is not None:
            self.mark(name)

    def snapshot(self) -> dict[str, float]:
        return dict(self._marks)
