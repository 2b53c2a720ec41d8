"""The agent's current state: the pure machine applied, with its effects on the world.

`StateHolder.apply` is the only way the state changes. It runs the transition, logs every phase change with
`from` and `to`, writes the state file, queues the events the machine says are owed, and publishes the new
state in an `AsyncValue` that tasks wait on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Final

from trio_util import AsyncValue

from miglet import __version__, machine, protocol
from miglet.machine import AgentState, Phase
from miglet.secret import redact
from miglet.stamp import utc_timestamp
from miglet.statefile import StateFileWriter, StateRecord

log = logging.getLogger(__name__)

# Seed ("Verification"): these transitions log exactly these lines.
TRANSITION_MESSAGES: Final = {
    (Phase.WAITING_FOR_CONTROLLER, Phase.READY): "Controller acknowledgment received, transitioning to ready state",
    (Phase.READY, Phase.REGISTERING_RUNNER): "Registration config received, transitioning to registering runner",
}


# How much of a value from outside (a job's name, a stop reason) the state file keeps.
OUTSIDE_CHARS: Final = 256


def _outside(text: str | None) -> str | None:
    if text is None:
        return None
    masked = redact(text)
    return masked if len(masked) <= OUTSIDE_CHARS else masked[:OUTSIDE_CHARS] + "…"


class StateHolder:
    """Owns the current `AgentState` of one agent."""

    def __init__(
        self,
        *,
        vm_id: str,
        pool_id: str,
        emit: Callable[[protocol.AnyEvent], object],
        state_file: StateFileWriter | None = None,
        refresh_s: float = 10.0,
    ) -> None:
        self.value: AsyncValue[AgentState] = AsyncValue(AgentState())
        self._vm_id = vm_id
        self._pool_id = pool_id
        self._emit = emit
        self._state_file = state_file
        self.refresh_s = refresh_s
        # Called with (before, after) on every accepted input: tests and benchmarks watch the agent through it.
        self.observers: list[Callable[[AgentState, AgentState], object]] = []
        self._since = utc_timestamp()

    @property
    def state(self) -> AgentState:
        return self.value.value

    @property
    def phase(self) -> Phase:
        return self.value.value.phase

    def apply(self, event: machine.Input) -> bool:
        """Feed `event` to the machine; False (and nothing changes) when it does not apply now.

        Observers must not call `apply` themselves: the observers after them would see the changes out of order.
        """
        before = self.value.value
        step = machine.transition(before, event)
        if not step.accepted:
            log.debug("Ignored input", extra={"input": type(event).__name__, "phase": before.phase.value})
            return False
        after = step.state
        changed = after.phase is not before.phase
        if changed:
            self._since = utc_timestamp()
        self.value.value = after
        # The file first: whoever reads the log line below finds the state file already saying so.
        self.write_state_file()
        if changed:
            message = TRANSITION_MESSAGES.get((before.phase, after.phase), "State changed")
            log.info(message, extra={"from": before.phase.value, "to": after.phase.value})
        for owed in step.events:
            self._emit(owed)
        for observer in self.observers:
            observer(before, after)
        return True

    def record_runner_pid(self, pid: int | None) -> None:
        """Note the runner process now running (`config.sh` or `run.sh`; None: none), in the state file at once: a
        MIGlet started after this one died stops it (`Agent._clear_leftovers`)."""
        self.apply(machine.RunnerProcess(pid))

    def write_state_file(self) -> None:
        if self._state_file is None:
            return
        state = self.value.value
        self._state_file.write(
            StateRecord(
                state=state.phase.value,
                since=self._since,
                updated_at=utc_timestamp(),
                vm_id=self._vm_id,
                pool_id=self._pool_id,
                runner_name=state.runner_name,
                # Both come from outside (a job's name from the runner's output, a reason from a shutdown command):
                # masked and bounded, so that the file never holds a secret, nor grows too large to be read.
                job=_outside(state.job),
                pid=os.getpid(),
                version=__version__,
                runner_pid=state.runner_pid,
                stop_reason=_outside(state.stop_reason),
                refresh_s=self.refresh_s,
            )
        )
