"""The seam between the runner supervisor and a runner: what a registration is and what a backend does.

`ProcessRunner` drives GitHub's real `config.sh`/`run.sh`; an in-process fake with the same behaviour lets one
process simulate many agents. The supervisor only ever talks to this protocol.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import msgspec
import trio

from miglet.secret import Secret

# Called with (stream name, line) for each line the runner prints, as it prints it.
LineSink = Callable[[str, str], object]


class Registration(msgspec.Struct, frozen=True, kw_only=True):
    """Everything needed to configure and start one runner, from a `register_runner` command and the config."""

    command_id: str
    url: str
    name: str
    labels: tuple[str, ...]
    group: str
    ephemeral: bool
    token: Secret | None = None
    jit_config: Secret | None = None
    disable_update: bool = False


class ConfigureFailed(Exception):
    """`config.sh` did not register the runner; the message is the runner's own error, secrets masked."""


class Grace:
    """How long a stopping runner may take before it is killed; a second stop request cuts it short."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._cut = trio.Event()
        # The latest moment any grace may last until, once something (a preemption's deadline) set one.
        self._latest = math.inf
        self._waiting: set[trio.CancelScope] = set()

    def cut_short(self) -> None:
        self._cut.set()

    def shorten(self, seconds: float) -> None:
        """However long the grace, it is over within `seconds` from now (also a grace already begun)."""
        self._latest = min(self._latest, trio.current_time() + seconds)
        for scope in self._waiting:
            scope.deadline = min(scope.deadline, self._latest)

    async def wait(self) -> None:
        """Return when the grace period is over (or was cut short)."""
        with trio.move_on_after(self.seconds) as scope:
            scope.deadline = min(scope.deadline, self._latest)
            self._waiting.add(scope)
            try:
                await self._cut.wait()
            finally:
                self._waiting.discard(scope)


class Started(msgspec.Struct, frozen=True):
    """The runner is running (as process `pid`, when it is a process)."""

    pid: int | None


class Line(msgspec.Struct, frozen=True):
    """A line the runner printed on `stream` ("stdout" or "stderr"), secrets masked, not yet cleaned."""

    stream: str
    text: str


class Exited(msgspec.Struct, frozen=True):
    """The runner is gone. `killed_processes`: how many processes it left behind, which were killed (None when
    the backend cannot tell)."""

    exit_code: int
    killed_processes: int | None = None


# What a running runner tells its supervisor, in order: Started, its Lines, and Exited last.
RunEvent = Started | Line | Exited


class RunnerBackend(Protocol):
    async def configure(self, registration: Registration, on_line: LineSink) -> None:
        """Register the runner with GitHub; raises ConfigureFailed."""

    async def run(self, registration: Registration, events: trio.MemorySendChannel[RunEvent]) -> None:
        """Run the runner until it exits, telling `events` what it does.

        Cancelling this call stops the runner gracefully (SIGINT, then SIGKILL once the grace period is over)
        and returns only once it is gone; `Exited` is sent either way, even while cancelled, as long as someone
        reads. Raises ConfigureFailed when the runner cannot be started at all.
        """

    async def warmup(self) -> bool:
        """Warm the runner up before a registration (`Runner.Listener warmup`: its code loaded and compiled ahead);
        False when it has nothing to warm up. Cancelling it stops it at once. Raises ConfigureFailed when it fails.
        """

    async def remove(self, token: Secret, on_line: LineSink) -> None:
        """Deregister the runner (`config.sh remove`); raises ConfigureFailed."""

    async def clean(self) -> None:
        """Forget any local runner configuration, so the next registration starts fresh."""
