"""The seam between the runner supervisor and a runner: what a registration is and what a backend does.

`ProcessRunner` drives GitHub's real `config.sh`/`run.sh`; an in-process fake with the same behaviour lets one
process simulate many agents. The supervisor only ever talks to this protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import msgspec

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


class RunnerBackend(Protocol):
    async def configure(self, registration: Registration, on_line: LineSink) -> None:
        """Register the runner with GitHub; raises ConfigureFailed."""

    async def run(self, registration: Registration, on_line: LineSink, on_started: Callable[[int | None], None]) -> int:
        """Run the runner until it exits and return its exit code.

        Cancelling this call stops the runner gracefully (SIGINT to its process group, then SIGKILL after the
        grace period) and returns only once it is gone.
        """
        ...

    async def remove(self, token: Secret, on_line: LineSink) -> None:
        """Deregister the runner (`config.sh remove`); raises ConfigureFailed."""

    async def clean(self) -> None:
        """Forget any local runner configuration, so the next registration starts fresh."""
