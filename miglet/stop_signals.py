"""The signals that stop MIGlet, and what they do while the agent is not listening for them.

SIGTERM, SIGINT and SIGHUP each ask for an orderly stop; the agent listens for them while it runs. Before that,
from the first lines of `miglet run`, `HeldSignals` records them instead of letting them kill the process (or
raise KeyboardInterrupt), and the agent acts on what was recorded as soon as it listens. Once the agent has
stopped, `ignore_stop_signals` leaves them no effect: an orderly stop's exit code is the one the process exits
with, however many signals arrive.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Final

STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class HeldSignals:
    """Stop signals that arrived while nothing was listening for them, oldest first."""

    def __init__(self) -> None:
        self._received: list[int] = []

    def hold(self) -> None:
        """Record stop signals from now on; the agent's own receiver takes over while it runs (and hands them
        back here when it stops listening)."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._record)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self._received.append(signum)

    def take(self) -> list[int]:
        """The signals recorded so far, which are forgotten here."""
        taken = list(self._received)
        del self._received[: len(taken)]
        return taken


def ignore_stop_signals() -> None:
    """Ignore stop signals from now on: for a process whose agent has stopped, with nothing left to stop.

    Ignored rather than recorded because Python resets the handlers it runs to the default (death) while it
    shuts down, but leaves an ignored signal ignored."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
