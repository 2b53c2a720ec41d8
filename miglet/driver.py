"""The driver: the one place where inputs are applied to the machine and its effects are carried out.

Every task hands what it learns to `Driver.apply` (a command, a line of the runner's, a signal, a deadline
passed). `apply` runs `machine.transition`, publishes the new state, writes the state file, logs the phase
change (the seed's verification lines among them), and carries out the step's effects: events go to the outbox,
log lines to the log, follow-up inputs back to the machine, and the effects that need the world (a registration
to carry out, a runner to stop) to the handler the agent installs. Tasks wait on the state (`wait_for`) but
never change it any other way. docs/design.md draws the whole.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable
from typing import Final

from trio_util import AsyncValue

from miglet import __version__, machine, protocol
from miglet.machine import AgentState, Effect, Phase, Step
from miglet.secret import redact
from miglet.stamp import utc_timestamp
from miglet.statefile import StateFileWriter, StateRecord
from miglet.supervision import BugReport, error_text, log_bug

log = logging.getLogger(__name__)

# Seed ("Verification"): these transitions log exactly these lines.
TRANSITION_MESSAGES: Final = {
    (Phase.WAITING_FOR_CONTROLLER, Phase.READY): "Controller acknowledgment received, transitioning to ready state",
    (Phase.READY, Phase.REGISTERING_RUNNER): "Registration config received, transitioning to registering runner",
}

# How much of a value from outside (a job's name, a stop reason) the state file keeps.
OUTSIDE_CHARS: Final = 256
# Follow-up inputs one input may lead to (a chain longer than this is a bug in the machine).
MAX_FOLLOW_UPS: Final = 64


def _outside(text: str | None) -> str | None:
    if text is None:
        return None
    masked = redact(text)
    return masked if len(masked) <= OUTSIDE_CHARS else masked[:OUTSIDE_CHARS] + "…"


def _follow_ups(step: Step) -> list[machine.Input]:
    return [effect.input for effect in step.effects if isinstance(effect, machine.Then)]


def _file_facts(state: AgentState) -> tuple[object, ...]:
    """What the state file says of `state`."""
    return (state.phase, state.runner_name, state.job, state.runner_pid, state.stop_reason)


def _ignore_effect(effect: Effect) -> None:
    """The handler until the agent installs its own: a machine driven alone (in a test) has no world to change."""


class Driver:
    """Owns the current `AgentState` of one agent: the only writer of it."""

    def __init__(
        self,
        *,
        vm_id: str,
        pool_id: str,
        send: Callable[[protocol.AnyEvent], object],
        send_first: Callable[[protocol.AnyEvent], object] | None = None,
        state_file: StateFileWriter | None = None,
        refresh_s: float = 10.0,
        on_bug: BugReport = log_bug,
    ) -> None:
        self._value: AsyncValue[AgentState] = AsyncValue(AgentState())
        self._vm_id = vm_id
        self._pool_id = pool_id
        self._send = send
        # Events the controller must hear ahead of all others (`machine.Send.first`).
        self._send_first = send_first or send
        self._state_file = state_file
        self.refresh_s = refresh_s
        self.on_bug = on_bug
        # Carries out the effects that change the world outside the machine and the outbox (installed by the agent).
        self.carry_out: Callable[[Effect], object] = _ignore_effect
        # Called with (before, after) on every accepted input: tests and benchmarks watch the agent through it.
        self._observers: list[Callable[[AgentState, AgentState], object]] = []
        self._applying = False
        # What the state file said when last written, but for the time: it is written again only when that changes.
        self._written: tuple[object, ...] | None = None

    @property
    def state(self) -> AgentState:
        return self._value.value

    @property
    def phase(self) -> Phase:
        return self._value.value.phase

    def observe(self, observer: Callable[[AgentState, AgentState], object]) -> None:
        """Call `observer(before, after)` after every accepted input; it must not apply inputs itself."""
        self._observers.append(observer)

    async def wait_for(self, predicate: Callable[[AgentState], bool], *, held_for: float = 0) -> AgentState:
        """Wait until `predicate` holds of the state (and has held for `held_for` seconds at a stretch)."""
        return await self._value.wait_value(predicate, held_for=held_for)

    def apply(self, event: machine.Input) -> Step:
        """Feed `event` to the machine and carry out what it decides; the step is returned for the caller to see.

        A bug in the machine changes nothing: it is reported, and a command it met is answered as failed.
        """
        if self._applying:
            raise RuntimeError("Driver.apply called while applying an input (from an observer or an effect)")
        self._applying = True
        try:
            step = self._apply(event)
            follow_ups = deque(_follow_ups(step))
            for _ in range(MAX_FOLLOW_UPS):
                if not follow_ups:
                    break
                follow_ups.extend(_follow_ups(self._apply(follow_ups.popleft())))
            else:
                if follow_ups:
                    self.on_bug("machine", RuntimeError(f"more than {MAX_FOLLOW_UPS} follow-up inputs"))
        finally:
            self._applying = False
        return step

    def _apply(self, event: machine.Input) -> Step:
        before = self._value.value
        try:
            step = machine.transition(before, event)
        except Exception as exc:
            self.on_bug("machine", exc)
            self._failed(event, exc)
            return Step(before, ignored=f"internal error: {type(exc).__name__}")
        after = step.state
        # What the machine says of the input comes first, then the change it makes (the seed's order of lines).
        for said in step.effects:
            if isinstance(said, machine.Log):
                self._carry_out(said)
        if step.accepted:
            self._value.value = after
            # The file first: whoever reads the log line below finds the state file already saying so.
            if _file_facts(after) != self._written:
                self.write_state_file()
            if after.phase is not before.phase:
                message = TRANSITION_MESSAGES.get((before.phase, after.phase), "State changed")
                log.info(message, extra={"from": before.phase.value, "to": after.phase.value})
        else:
            log.debug("Ignored input", extra={"input": type(event).__name__, "why": step.ignored})
        for effect in step.effects:
            if not isinstance(effect, machine.Log):
                self._carry_out(effect)
        if step.accepted:
            for observer in self._observers:
                try:
                    observer(before, after)
                except Exception as exc:
                    self.on_bug("driver", exc)
        return step

    def _carry_out(self, effect: Effect) -> None:
        try:
            match effect:
                case machine.Send(event=owed, first=first):
                    (self._send_first if first else self._send)(owed)
                case machine.Log(message=message, level=level, fields=fields):
                    log.log(level, message, extra=fields)
                case machine.Then():
                    pass  # applied by `apply` once this step is done
                case _:
                    self.carry_out(effect)
        except Exception as exc:
            # One effect failing (a bug) does not keep the others from being carried out.
            self.on_bug("driver", exc)

    def _failed(self, event: machine.Input, exc: Exception) -> None:
        """The controller hears of a command the machine could not act on."""
        if not isinstance(event, machine.CommandArrived):
            return
        command = event.command
        error = f"internal error: {type(exc).__name__}: {error_text(exc)}"
        self._carry_out(
            machine.Send(
                protocol.CommandFailed(command_id=command.id, command_type=machine.command_type(command), error=error)
            )
        )

    def write_state_file(self) -> None:
        if self._state_file is None:
            return
        state = self._value.value
        self._written = _file_facts(state)
        now = utc_timestamp()
        self._state_file.write(
            StateRecord(
                state=state.phase.value,
                since=now,
                updated_at=now,
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
