"""Deadlines that keep a stuck VM from idling forever: each one a limit on how long the agent may stay in a phase.

A deadline restarts every time its phase is entered. When it passes, the agent stops with the given reason; the
controller sees it in `vm_stopping` and can recycle the VM.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from miglet.machine import Phase
from miglet.state import StateHolder

log = logging.getLogger(__name__)


async def phase_deadline_task(holder: StateHolder, phase: Phase, seconds: float, on_expiry: Callable[[], None]) -> None:
    """Call `on_expiry` when the agent has stayed in `phase` for `seconds` at a stretch (0 disables it)."""
    if seconds <= 0:
        return
    while True:
        await holder.value.wait_value(lambda state: state.phase is phase)
        with trio.move_on_after(seconds) as scope:
            await holder.value.wait_value(lambda state: state.phase is not phase)
        if not scope.cancelled_caught:
            continue
        log.warning("Deadline passed", extra={"phase": phase.value, "limit_s": seconds})
        on_expiry()
        return
