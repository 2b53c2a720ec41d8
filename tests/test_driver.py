"""The driver: inputs applied in order, effects carried out, and a bug in the machine or an effect contained.

Rules: no trio run needed; the driver is fed inputs directly and its outbox is a list.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from miglet import machine, protocol
from miglet.driver import Driver
from miglet.machine import (
    Acknowledged,
    AgentState,
    CommandArrived,
    Effect,
    Phase,
    Register,
    RegistrationAborted,
    Start,
    Step,
)
from miglet.statefile import StateFileWriter, StateRecord
from tests.agents import register_runner


class World:
    def __init__(self) -> None:
        self.sent: list[protocol.AnyEvent] = []
        self.effects: list[Effect] = []
        self.bugs: list[tuple[str, Exception]] = []
        self.driver = Driver(
            vm_id="vm-123",
            pool_id="pool-001",
            send=self.sent.append,
            on_bug=lambda where, exc: self.bugs.append((where, exc)),
        )
        self.driver.carry_out = self.effects.append
        self.driver.apply(Start(runner_name="vm-123", ephemeral=True))
        self.driver.apply(Acknowledged())


def test_a_follow_up_input_is_applied_at_once_with_each_phase_change_logged(caplog: pytest.LogCaptureFixture) -> None:
    world = World()
    for command_id in ("c1", "c2"):
        world.driver.apply(CommandArrived(register_runner(command_id)))
    caplog.set_level(logging.INFO, logger="miglet")
    world.driver.apply(RegistrationAborted("c1", "configure_failed", "404"))
    assert world.driver.state.command_id == "c2"
    assert [effect.command.id for effect in world.effects if isinstance(effect, Register)] == ["c1", "c2"]
    changes = [(record.getMessage(), getattr(record, "to", None)) for record in caplog.records if hasattr(record, "to")]
    assert changes == [
        ("State changed", "Ready"),
        ("Registration config received, transitioning to registering runner", "RegisteringRunner"),
    ]


def test_a_bug_in_the_machine_changes_nothing_and_the_command_is_answered(monkeypatch: pytest.MonkeyPatch) -> None:
    world = World()
    before = world.driver.state

    def broken(state: AgentState, event: machine.Input) -> Step:
        raise RuntimeError("a bug in the machine")

    monkeypatch.setattr(machine, "transition", broken)
    step = world.driver.apply(CommandArrived(register_runner("c1")))
    assert step.ignored == "internal error: RuntimeError"
    assert world.driver.state is before
    [(where, _)] = world.bugs
    assert where == "machine"
    [failed] = world.sent
    assert isinstance(failed, protocol.CommandFailed)
    assert (failed.command_id, failed.command_type) == ("c1", "register_runner")
    assert failed.error == "internal error: RuntimeError: a bug in the machine"


def test_an_effect_that_fails_does_not_keep_the_others_from_being_carried_out() -> None:
    world = World()

    def broken(effect: Effect) -> None:
        raise RuntimeError("a bug in carrying out an effect")

    world.driver.carry_out = broken
    world.driver.apply(machine.StopRequested(reason="test"))
    assert world.driver.phase is Phase.STOPPING
    assert [type(event) for event in world.sent] == [protocol.VmStopping]
    assert [where for where, _ in world.bugs] == ["driver"]


def test_an_observer_may_not_apply_inputs_itself() -> None:
    world = World()
    world.driver.observe(lambda before, after: world.driver.apply(machine.Finished()))
    world.driver.apply(machine.StopRequested(reason="test"))
    # Refused and reported: the observers after it would otherwise see the changes out of order.
    assert world.driver.phase is Phase.STOPPING
    [(where, exc)] = world.bugs
    assert where == "driver"
    assert "while applying" in str(exc)


def test_the_machine_refuses_a_phase_change_it_may_not_make(monkeypatch: pytest.MonkeyPatch) -> None:
    def skips_ahead(state: AgentState, event: machine.Input) -> Step:
        return Step(AgentState(phase=Phase.BUSY))

    monkeypatch.setattr(machine, "_transition", skips_ahead)
    with pytest.raises(machine.IllegalTransition, match="Initializing -> Busy"):
        machine.transition(AgentState(), Acknowledged())


def test_the_state_file_is_written_only_when_what_it_says_changes(tmp_path: Path) -> None:
    writes: list[StateRecord] = []

    class Counting(StateFileWriter):
        def write(self, record: StateRecord) -> None:
            writes.append(record)

    driver = Driver(vm_id="vm-123", pool_id="pool-001", send=lambda event: None, state_file=Counting(tmp_path / "s"))
    driver.apply(Start(runner_name="vm-123", ephemeral=True))
    driver.apply(Acknowledged())
    assert [record.state for record in writes] == ["WaitingForController", "Ready"]
    # A flood of commands the controller could not have sent (each remembered as seen) writes nothing.
    for index in range(100):
        driver.apply(machine.CommandRejected(protocol.RejectedCommand(f"x{index}", "reboot", "unknown")))
    assert len(writes) == 2
    driver.apply(machine.StopRequested(reason="test"))
    assert [record.state for record in writes][-1] == "Stopping"
