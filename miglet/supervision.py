"""Supervision of the agent's own tasks: a task that fails with a bug is reported and started again.

A failure caught here is a bug in MIGlet: faults of the controller or of the runner are handled where they occur.
It is logged with its traceback, reported to the controller as `internal_error`, and the task is restarted after
a backoff, while the other tasks (and a job in progress) go on. A bug that a task meets and survives (one line of
the runner's output it could not follow, one command it could not route) is reported the same way, at most once
a minute for the same bug, and the task simply goes on. Only tasks that keep failing, MAX_FAILURES restarts within
WINDOW_S, end the agent, through the ordinary stop path; even then every task is still restarted, so that the
stop itself (the outbox, the signal watcher) can finish.
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
# Once the agent is stopping, a failed task is restarted at least this often: the stop has little time.
MAX_RESTART_WHILE_STOPPING: Final = 1.0
# The same bug, met again and again by a task that survives it, is reported at most this often.
REPORT_EVERY_S: Final = 60.0
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
    """Reports the agent's internal errors, restarts failed tasks, and gives up when they keep failing."""

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
        self._restarts: deque[float] = deque()
        self._last_reported: dict[tuple[str, str, str], float] = {}
        self._hurry = trio.Event()
        self.bugs = 0
        self.gave_up = False

    def hurry(self) -> None:
        """The agent is stopping: a failed task is restarted without a long backoff."""
        self._hurry.set()

    def bug(self, where: str, exc: Exception) -> None:
        """Tell of a bug that a task met and survives (a `BugReport`). Never raises."""
        self.bugs += 1
        try:
            text = error_text(exc)
            key = (where, type(exc).__name__, text)
            now = trio.current_time()
            last = self._last_reported.get(key)
            if last is not None and now - last < REPORT_EVERY_S:
                log.debug("Internal error again", extra={"task": where, "error_class": type(exc).__name__})
                return
            self._last_reported[key] = now
            log.critical("A task of the agent failed", exc_info=exc, extra={"task": where})
            self._report(protocol.InternalError(task=where, error_class=type(exc).__name__, error=text))
        except Exception:
            # Reporting is best effort: a bug here must not take the task that met the first one down with it.
            log.exception("Cannot report an internal error", extra={"task": where})

    async def run(self, task: str, function: Callable[[], Awaitable[object]]) -> None:
        """Run `function` until it returns; after each failure with a bug, restart it after a backoff.

        A failure that comes with a cancellation (a task with a nursery of its own, stopped while failing) is
        reported, and the cancellation goes on.
        """
        while True:
            try:
                await function()
            except Exception as exc:
                self.bug(task, exc)
            except BaseExceptionGroup as group:
                bugs, rest = group.split(Exception)
                if bugs is not None:
                    self.bug(task, bugs)
                if rest is not None:
                    raise rest from None
            else:
                return
            self._restarted()
            await self._backoff(task)

    def _restarted(self) -> None:
        now = trio.current_time()
        self._restarts.append(now)
        while self._restarts[0] <= now - self._window_s:
            self._restarts.popleft()
        if len(self._restarts) >= self._max_failures and not self.gave_up:
            self.gave_up = True
            log.critical(
                "Too many internal errors; stopping",
                extra={"failures": len(self._restarts), "window_s": self._window_s},
            )
            try:
                self._give_up()
            except Exception:
                log.exception("Cannot begin the stop")

    async def _backoff(self, task: str) -> None:
        delay = self._policy.delay(len(self._restarts) - 1, self._rng)
        if self._hurry.is_set():
            delay = min(delay, MAX_RESTART_WHILE_STOPPING)
        log.warning("Restarting a failed task", extra={"task": task, "in_s": round(delay, 3)})
        with trio.move_on_after(delay):
            await self._hurry.wait()
        if self._hurry.is_set():
            # Hurried, but never a busy loop of a task that fails at once.
            await trio.sleep(min(delay, MAX_RESTART_WHILE_STOPPING))
