"""Supervision of the agent's own tasks: a task that fails with a bug is reported and started again.

A failure caught here is a bug in MIGlet: faults of the controller or of the runner are handled where they occur.
It is logged with its traceback, reported to the controller as `internal_error`, and the task is restarted after
a backoff, while the other tasks (and a job in progress) go on. Only repeated failures, MAX_FAILURES within
WINDOW_S, end the agent, through the ordinary stop path.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from miglet import protocol
from miglet.retry import RetryPolicy
from miglet.secret import redact

log = logging.getLogger(__name__)

MAX_FAILURES: Final = 5
WINDOW_S: Final = 600.0
RESTART_POLICY: Final = RetryPolicy(base=1.0, cap=30.0)
MAX_ERROR_CHARS: Final = 1000

# Told of a bug met inside a task that goes on: (where, the exception).
BugReport = Callable[[str, Exception], object]


def log_bug(where: str, exc: Exception) -> None:
    """A `BugReport` for a task run on its own (in a test): the log is all there is to tell."""
    log.critical("Internal error", exc_info=exc, extra={"task": where})


def error_text(exc: BaseException) -> str:
    """An exception's message, secrets masked, bounded; never raises (an exception's __str__ may)."""
    try:
        text = str(exc)
    except Exception:  # a broken __str__ is one more bug, not a reason to lose the report
        text = "<the exception's message could not be read>"
    return redact(text)[:MAX_ERROR_CHARS]


class TaskSupervisor:
    """Counts the agent's internal errors, reports them, restarts failed tasks, and gives up when they pile up."""

    def __init__(
        self,
        *,
        report: Callable[[protocol.AnyEvent], object],
        give_up: Callable[[], None],
        policy: RetryPolicy = RESTART_POLICY,
        rng: random.Random | None = None,
        max_failures: int = MAX_FAILURES,
        window_s: float = WINDOW_S,
    ) -> None:
        self._report = report
        self._give_up = give_up
        self._policy = policy
        self._rng = rng
        self._max_failures = max_failures
        self._window_s = window_s
        self._recent: deque[float] = deque()
        self.failures = 0
        self.gave_up = False

    def failed(self, task: str, exc: Exception) -> bool:
        """Record a bug in `task`; True when there have been too many and the agent is being stopped."""
        self.failures += 1
        now = trio.current_time()
        self._recent.append(now)
        while self._recent[0] <= now - self._window_s:
            self._recent.popleft()
        log.critical("A task of the agent failed", exc_info=exc, extra={"task": task})
        self._report(protocol.InternalError(task=task, error_class=type(exc).__name__, error=error_text(exc)))
        if len(self._recent) >= self._max_failures and not self.gave_up:
            self.gave_up = True
            log.critical(
                "Too many internal errors; stopping",
                extra={"failures": len(self._recent), "window_s": self._window_s},
            )
            self._give_up()
        return self.gave_up

    async def run(self, task: str, function: Callable[[], Awaitable[object]]) -> None:
        """Run `function` until it returns; after each failure with a bug, restart it after a backoff."""
        while True:
            try:
                await function()
            except Exception as exc:
                if self.failed(task, exc):
                    return
            else:
                return
            delay = self._policy.delay(len(self._recent) - 1, self._rng)
            log.warning("Restarting a failed task", extra={"task": task, "in_s": round(delay, 3)})
            await trio.sleep(delay)
