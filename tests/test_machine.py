"""The pure state machine: examples of each transition, and properties over any sequence of inputs.

Rules: no trio, no clock; inputs are fed to `transition` directly.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from miglet import protocol
from miglet.machine import (
    LEGAL_TRANSITIONS,
    Acknowledged,
    AgentState,
    CommandArrived,
    Finished,
    Input,
    JobDone,
    JobRunning,
    Phase,
    Register,
    RegistrationAborted,
    RunnerGone,
    RunnerListening,
    Start,
    StopRequested,
    transition,
)
from tests.agents import register_runner

SEED_ORDER = [Phase.WAITING_FOR_CONTROLLER, Phase.READY, Phase.REGISTERING_RUNNER, Phase.IDLE]


def run(inputs: list[Input], state: AgentState | None = None) -> tuple[AgentState, list[protocol.AnyEvent]]:
    state = state or AgentState()
    events: list[protocol.AnyEvent] = []
    for item in inputs:
        step = transition(state, item)
        state = step.state
        events.extend(step.events)
    return state, events


START = Start(runner_name="vm-123", ephemeral=True)


def registration(command_id: str) -> CommandArrived:
    return CommandArrived(register_runner(command_id))


def test_seed_flow_reaches_idle_and_reports_registration() -> None:
    state, events = run([START, Acknowledged(), registration("c1"), RunnerListening()])
    assert state.phase is Phase.IDLE
    assert state.command_id == "c1"
    assert events == [protocol.RunnerRegistered(runner_name="vm-123", command_id="c1")]


def test_runner_exited_reports_what_the_runner_left_behind() -> None:
    listening, _ = run([START, Acknowledged(), registration("c1"), RunnerListening()])
    stopping, _ = run([StopRequested(reason="signal")], listening)
    assert run([RunnerGone(0, killed_processes=2)], stopping)[1] == [
        protocol.RunnerExited(exit_code=0, reason="stopped", killed_processes=2)
    ]
    assert run([RunnerGone(1, killed_processes=0)], listening)[1][-1] == protocol.RunnerExited(
        exit_code=1, reason="unexpected", killed_processes=0
    )
    # A backend that cannot tell says nothing of it, and neither does the event.
    [exited] = run([RunnerGone(0)], stopping)[1]
    assert b"killed_processes" not in protocol.encode_event(exited)


def test_registration_is_only_carried_out_when_ready() -> None:
    for state in (AgentState(), run([START])[0]):
        step = transition(state, registration("c1"))
        assert step.state.phase is state.phase
        assert not any(isinstance(effect, Register) for effect in step.effects)
        [refused] = step.events
        assert isinstance(refused, protocol.CommandFailed)


def test_failed_registration_returns_to_ready_and_reports() -> None:
    state, events = run(
        [START, Acknowledged(), registration("c1"), RegistrationAborted("c1", "configure_failed", "404")]
    )
    assert state.phase is Phase.READY
    assert events == [protocol.RegistrationFailed(command_id="c1", reason="configure_failed", error="404")]


def test_a_command_id_is_acted_on_once() -> None:
    state, _ = run([START, Acknowledged(), registration("c1"), RegistrationAborted("c1", "token_expired", "expired")])
    again = transition(state, registration("c1"))
    assert (again.ignored, again.events) == ("a command seen before", ())
    assert transition(state, registration("c2")).state.phase is Phase.REGISTERING_RUNNER


def test_job_cycle_and_ephemeral_end() -> None:
    state, events = run(
        [
            START,
            Acknowledged(),
            registration("c1"),
            RunnerListening(),
            JobRunning("build"),
            JobDone("build", "Succeeded"),
            RunnerGone(0),
        ]
    )
    assert state.phase is Phase.STOPPING
    assert [type(event) for event in events] == [
        protocol.RunnerRegistered,
        protocol.JobStarted,
        protocol.JobCompleted,
        protocol.RunnerExited,
        protocol.VmStopping,
    ]
    assert events[2] == protocol.JobCompleted(job_name="build", result="Succeeded")


def test_unexpected_runner_exit_returns_to_ready() -> None:
    state, events = run([START, Acknowledged(), registration("c1"), RunnerListening(), RunnerGone(1)])
    assert state.phase is Phase.READY
    assert events[-1] == protocol.RunnerExited(exit_code=1, reason="unexpected")


def test_an_ephemeral_runner_that_took_a_job_is_done_however_it_ends() -> None:
    # The runner can drop a job it could not renew without a "completed" line, then leave as after any job.
    state, events = run([START, Acknowledged(), registration("c1"), RunnerListening(), JobRunning("b"), RunnerGone(0)])
    assert state.phase is Phase.STOPPING
    assert state.job is None
    assert events[-3:] == [
        protocol.JobCompleted(job_name="b", result="Abandoned"),
        protocol.RunnerExited(exit_code=0, reason="job_done"),
        protocol.VmStopping(reason="ephemeral runner finished its job", runner_name="vm-123"),
    ]


def test_a_new_job_while_busy_ends_the_one_never_reported_finished() -> None:
    persistent = Start(runner_name="r", ephemeral=False)
    state, events = run(
        [persistent, Acknowledged(), registration("c1"), RunnerListening(), JobRunning("a"), JobRunning("b")]
    )
    assert (state.phase, state.job) == (Phase.BUSY, "b")
    assert events[-2:] == [protocol.JobCompleted(job_name="a", result="Abandoned"), protocol.JobStarted(job_name="b")]


def test_non_ephemeral_runner_exit_is_unexpected_even_after_jobs() -> None:
    inputs: list[Input] = [
        Start(runner_name="r", ephemeral=False),
        Acknowledged(),
        registration("c"),
        RunnerListening(),
        JobRunning("b"),
        JobDone("b", "Failed"),
        RunnerGone(0),
    ]
    state, _ = run(inputs)
    assert state.phase is Phase.READY


def test_a_job_that_starts_as_the_stop_begins_is_reported() -> None:
    idle: list[Input] = [START, Acknowledged(), registration("c1"), RunnerListening()]
    state, events = run(
        [
            *idle,
            StopRequested(reason="signal"),
            JobRunning("build"),
            JobDone("build", "Canceled"),
            RunnerGone(0),
            Finished(),
        ]
    )
    assert state.phase is Phase.STOPPED
    assert events[1:] == [
        protocol.VmStopping(reason="signal", runner_name="vm-123"),
        protocol.JobStarted(job_name="build"),
        protocol.JobCompleted(job_name="build", result="Canceled"),
        protocol.RunnerExited(exit_code=0, reason="stopped"),
    ]


def test_jobs_taken_while_stopping_are_paired_even_when_one_is_dropped() -> None:
    registering: list[Input] = [START, Acknowledged(), registration("c1")]
    # The stop came before the runner listened; it listens anyway, takes a job, drops it, takes another.
    inputs = [*registering, StopRequested(reason="signal"), RunnerListening(), JobRunning("a"), JobRunning("b")]
    state, events = run([*inputs, JobDone("b", "Canceled"), RunnerGone(0)])
    assert state.job is None
    assert events[1:] == [
        protocol.JobStarted(job_name="a"),
        protocol.JobCompleted(job_name="a", result="Abandoned"),
        protocol.JobStarted(job_name="b"),
        protocol.JobCompleted(job_name="b", result="Canceled"),
        protocol.RunnerExited(exit_code=0, reason="stopped"),
    ]


@pytest.mark.parametrize("stop_first", [False, True])
def test_a_job_the_runner_never_finished_is_reported_abandoned(stop_first: bool) -> None:
    # The runner crashed mid-job, or was killed at the end of its grace with the job still running.
    persistent = Start(runner_name="vm-123", ephemeral=False)
    inputs: list[Input] = [persistent, Acknowledged(), registration("c1"), RunnerListening(), JobRunning("b")]
    inputs += [StopRequested(reason="signal")] if stop_first else []
    state, events = run([*inputs, RunnerGone(137)])
    assert state.job is None
    assert events[-2:] == [
        protocol.JobCompleted(job_name="b", result="Abandoned"),
        protocol.RunnerExited(exit_code=137, reason="stopped" if stop_first else "unexpected"),
    ]


def test_stop_from_any_live_phase_then_stopped_is_terminal() -> None:
    state, events = run([START, Acknowledged(), StopRequested(reason="signal"), Finished()])
    assert state.phase is Phase.STOPPED
    assert events == [protocol.VmStopping(reason="signal", runner_name="vm-123")]
    assert not transition(state, StopRequested(reason="again")).accepted


command_ids = st.sampled_from(["c1", "c2", "c3"])
inputs = st.one_of(
    st.builds(Start, runner_name=st.just("r"), ephemeral=st.booleans()),
    st.just(Acknowledged()),
    st.builds(registration, command_ids),
    st.builds(RegistrationAborted, command_ids, st.sampled_from(["token_expired", "configure_failed"]), st.just("e")),
    st.just(RunnerListening()),
    st.builds(JobRunning, st.sampled_from(["a", "b"])),
    st.builds(JobDone, st.sampled_from(["a", "b"]), st.sampled_from(["Succeeded", "Failed"])),
    st.builds(RunnerGone, st.integers(0, 3)),
    st.builds(StopRequested, reason=st.just("signal")),
    st.just(Finished()),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(inputs, max_size=40))
def test_any_input_sequence_makes_only_legal_transitions(sequence: list[Input]) -> None:
    state = AgentState()
    visited = [state.phase]
    acted_on: list[str] = []
    for item in sequence:
        step = transition(state, item)
        if not step.accepted:
            assert step.state == state
            assert step.events == ()
            continue
        if step.state.phase is not state.phase:
            assert (state.phase, step.state.phase) in LEGAL_TRANSITIONS
            visited.append(step.state.phase)
        acted_on += [effect.command.id for effect in step.effects if isinstance(effect, Register)]
        if state.phase is Phase.STOPPED:
            assert step.state.phase is Phase.STOPPED, "Stopped is terminal"
        state = step.state
    # A command is acted on at most once.
    assert len(acted_on) == len(set(acted_on))
    # The seed's order is never skipped: each seed phase is first reached after the one before it.
    firsts = [visited.index(phase) for phase in SEED_ORDER if phase in visited]
    assert firsts == sorted(firsts)
    reached = [phase for phase in SEED_ORDER if phase in visited]
    assert reached == SEED_ORDER[: len(reached)]
    # Once stopping, nothing but Stopped follows.
    if Phase.STOPPING in visited:
        assert set(visited[visited.index(Phase.STOPPING) :]) <= {Phase.STOPPING, Phase.STOPPED}


@settings(max_examples=300, deadline=None)
@given(st.lists(inputs, max_size=40))
def test_every_job_start_is_reported_and_completion_matches(sequence: list[Input]) -> None:
    state, events = run(sequence)
    started = sum(isinstance(event, protocol.JobStarted) for event in events)
    completed = sum(isinstance(event, protocol.JobCompleted) for event in events)
    # Every job the controller heard start, it hears end, unless it is still running.
    assert started == completed + (state.job is not None)
    if state.phase is Phase.BUSY:
        assert state.job is not None
    if state.job is not None:
        assert state.phase in (Phase.BUSY, Phase.STOPPING)
