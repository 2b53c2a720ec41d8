"""The pure state machine: examples of each transition, and properties over any sequence of inputs.

Rules: no trio, no clock; inputs are fed to `transition` directly.
"""

from __future__ import annotations

import itertools

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from miglet import exitcodes, protocol
from miglet.machine import (
    LEGAL_TRANSITIONS,
    MAX_PENDING_REGISTRATIONS,
    PREEMPTED_REFUSAL,
    SEEN_COMMANDS_KEPT,
    SEEN_GENERATION,
    Acknowledged,
    AgentState,
    CommandArrived,
    CommandRejected,
    CutGrace,
    CutShort,
    DeadlinePassed,
    Finished,
    Input,
    JobDone,
    JobIdentified,
    JobRunning,
    ListenTimedOut,
    Phase,
    PreemptionDue,
    PreemptionNoticed,
    Register,
    RegistrationAborted,
    RunnerGone,
    RunnerListening,
    RunnerProcess,
    Send,
    ShortenGrace,
    SignalReceived,
    Start,
    Step,
    StopJobIn,
    StopRequested,
    StopRunner,
    TakeNext,
    Then,
    Undelivered,
    transition,
)
from miglet.secret import Secret
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
    st.builds(
        JobIdentified,
        st.sampled_from(["started", "completed"]),
        st.builds(protocol.GithubContext, repository=st.sampled_from(["o/a", "o/b"])),
    ),
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
    # A job's workflow run is told at most once, between its start and its end, and rides on its end.
    known: protocol.GithubContext | None = None
    running = False
    for event in events:
        if isinstance(event, protocol.JobStarted):
            running, known = True, None
        elif isinstance(event, protocol.JobIdentified):
            assert running
            assert known is None
            known = event.github
        elif isinstance(event, protocol.JobCompleted):
            assert event.github == known
            running, known = False, None
    if state.phase is Phase.BUSY:
        assert state.job is not None
    if state.job is not None:
        assert state.phase in (Phase.BUSY, Phase.STOPPING)


# --- Commands, registrations waiting, stops and signals, driven without trio -----------------------------------


def shutdown(command_id: str, *, grace: float | None = None, remove_token: str | None = None) -> CommandArrived:
    parameters = protocol.ShutdownParameters(
        reason=f"asked by {command_id}",
        grace_period_s=grace,
        remove_token=None if remove_token is None else Secret(remove_token),
    )
    return CommandArrived(protocol.Shutdown(id=command_id, parameters=parameters))


def refusals(events: list[protocol.AnyEvent]) -> list[str]:
    return [event.command_id for event in events if isinstance(event, protocol.CommandFailed)]


def ready() -> AgentState:
    return run([START, Acknowledged()])[0]


def test_a_registration_during_another_waits_for_its_outcome_then_is_carried_out() -> None:
    state = ready()
    steps = []
    for item in [registration("c1"), registration("c2"), registration("c3")]:
        step = transition(state, item)
        steps.append(step)
        state = step.state
    assert [[effect.command.id for effect in s.effects if isinstance(effect, Register)] for s in steps] == [
        ["c1"],
        [],
        [],
    ]
    assert [command.id for command in state.pending] == ["c2", "c3"]
    failed = transition(state, RegistrationAborted("c1", "configure_failed", "404"))
    # Ready again, and told to take the next: the phase changes are the ones the seed's flow makes.
    assert failed.state.phase is Phase.READY
    assert [effect.input for effect in failed.effects if isinstance(effect, Then)] == [TakeNext()]
    taken = transition(failed.state, TakeNext())
    assert taken.state.phase is Phase.REGISTERING_RUNNER
    assert taken.state.command_id == "c2"
    assert [effect.command.id for effect in taken.effects if isinstance(effect, Register)] == ["c2"]
    # c2 succeeds: the runner is registered, and c3 can no longer be carried out.
    listening = transition(taken.state, RunnerListening())
    assert listening.state.pending == ()
    assert refusals(list(listening.events)) == ["c3"]


def test_registrations_waiting_are_bounded() -> None:
    state = transition(ready(), registration("first")).state
    events: list[protocol.AnyEvent] = []
    for index in range(MAX_PENDING_REGISTRATIONS + 3):
        step = transition(state, registration(f"c{index}"))
        state, events = step.state, events + list(step.events)
    assert len(state.pending) == MAX_PENDING_REGISTRATIONS
    assert refusals(events) == [
        f"c{index}" for index in range(MAX_PENDING_REGISTRATIONS, MAX_PENDING_REGISTRATIONS + 3)
    ]


def test_commands_seen_are_remembered_up_to_a_bound_the_oldest_forgotten_first() -> None:
    state = run([START, Acknowledged(), StopRequested(reason="x")])[0]
    for index in range(SEEN_COMMANDS_KEPT + 1):
        state = transition(state, registration(f"c{index}")).state
    remembered = [index for index in range(SEEN_COMMANDS_KEPT + 1) if state.has_seen(f"c{index}")]
    # The newest are remembered; the oldest generation went when the bound was passed.
    assert remembered == list(range(SEEN_GENERATION, SEEN_COMMANDS_KEPT + 1))
    assert transition(state, registration(f"c{SEEN_COMMANDS_KEPT}")).ignored == "a command seen before"
    assert transition(state, registration("c0")).ignored is None


def test_a_shutdown_decides_the_stop_plan_and_a_later_request_changes_nothing() -> None:
    step = transition(ready(), shutdown("s1", grace=3, remove_token="AHTREMOVE000000001"))
    plan = step.state.stop
    assert plan is not None
    assert (plan.reason, plan.grace_s, plan.exit_code) == ("asked by s1", 3, 0)
    assert plan.remove_token is not None
    assert StopRunner(3) in step.effects
    later = transition(step.state, StopRequested(reason="internal_error", exit_code=1))
    assert later.ignored == "already stopping"
    assert later.state.stop == plan


def test_an_unusable_remove_token_is_refused_but_the_stop_goes_on() -> None:
    step = transition(ready(), shutdown("s1", remove_token="short"))
    assert step.state.phase is Phase.STOPPING
    assert step.state.stop is not None
    assert step.state.stop.remove_token is None
    [failed, stopping] = step.events
    assert isinstance(failed, protocol.CommandFailed)
    assert (failed.command_id, failed.command_type) == ("s1", "shutdown")
    assert "short" not in failed.error
    assert isinstance(stopping, protocol.VmStopping)


def test_signals_stop_then_cut_the_grace_then_cut_everything_short() -> None:
    first = transition(ready(), SignalReceived("SIGTERM"))
    assert first.state.stop is not None
    assert first.state.stop.reason == "signal"
    second = transition(first.state, SignalReceived("SIGTERM"))
    assert CutShort() in second.effects
    assert second.state.stop is not None
    assert second.state.stop.cut_short
    # Stopping for another reason, a first signal only cuts the runner's grace.
    shut = transition(ready(), shutdown("s1")).state
    cut = transition(shut, SignalReceived("SIGINT"))
    assert CutGrace() in cut.effects
    assert cut.state.stop is not None
    assert (cut.state.stop.grace_cut, cut.state.stop.cut_short) == (True, False)


def test_a_deadline_applies_only_while_its_phase_lasts() -> None:
    state = ready()
    passed = transition(state, DeadlinePassed(Phase.READY, 60))
    assert passed.state.stop is not None
    assert (passed.state.stop.reason, passed.state.stop.exit_code) == ("registration_timeout", 1)
    registering = transition(state, registration("c1")).state
    assert not transition(registering, DeadlinePassed(Phase.READY, 60)).accepted


def test_a_runner_that_did_not_listen_in_time_is_stopped_and_what_it_says_after_does_not_count() -> None:
    registering = transition(ready(), registration("c1")).state
    timed_out = transition(registering, ListenTimedOut("c1", 30))
    assert timed_out.state.run_abandoned is not None
    assert not transition(timed_out.state, RunnerListening()).accepted
    gone = transition(timed_out.state, RunnerGone(0))
    assert gone.state.phase is Phase.READY
    assert gone.events == (
        protocol.RegistrationFailed(
            command_id="c1", reason="runner_start_failed", error="runner did not listen for jobs within 30 s"
        ),
    )


def test_an_undelivered_stop_exits_3_unless_it_already_failed() -> None:
    stopped = run([START, Acknowledged(), StopRequested(reason="x"), Finished(), Undelivered()])[0]
    assert stopped.exit_code == 3
    failed = run([START, StopRequested(reason="x", exit_code=1), Finished(), Undelivered()])[0]
    assert failed.exit_code == 1


registration_ids = st.sampled_from(["r1", "r2", "r3", "r4"])
any_inputs = st.one_of(
    inputs,
    st.builds(registration, registration_ids),
    st.builds(shutdown, st.sampled_from(["s1", "s2"]), grace=st.sampled_from([None, 0.0, 5.0])),
    st.builds(
        lambda cid, kind: CommandRejected(protocol.RejectedCommand(cid, kind, "bad")),
        st.sampled_from([None, "x1", "x2"]),
        st.sampled_from(["register_runner", "shutdown", "reimage", None]),
    ),
    st.just(TakeNext()),
    st.builds(ListenTimedOut, registration_ids, st.just(30.0)),
    st.builds(RegistrationAborted, registration_ids, st.just("configure_failed"), st.just("e")),
    st.builds(SignalReceived, st.sampled_from(["SIGTERM", "SIGINT"])),
    st.builds(DeadlinePassed, st.sampled_from(list(Phase)), st.just(60.0)),
    st.builds(RunnerProcess, st.one_of(st.none(), st.integers(1, 100))),
    st.just(Undelivered()),
    st.builds(
        lambda action, left: notice(action, left),
        st.sampled_from(["terminate", "stop"]),
        st.sampled_from([None, 0.0, 10.0, 120.0]),
    ),
    st.just(PreemptionDue()),
)


def drive(sequence: list[Input]) -> tuple[AgentState, list[Step]]:
    """Apply `sequence` as the driver does, follow-up inputs included."""
    return drive_from(AgentState(), sequence)


def drive_from(state: AgentState, sequence: list[Input]) -> tuple[AgentState, list[Step]]:
    steps: list[Step] = []
    queue = list(sequence)
    while queue:
        step = transition(state, queue.pop(0))
        steps.append(step)
        state = step.state
        queue[:0] = [effect.input for effect in step.effects if isinstance(effect, Then)]
    return state, steps


@settings(max_examples=500, deadline=None)
@given(st.lists(any_inputs, max_size=50))
def test_every_registration_is_carried_out_or_refused_once_and_one_at_a_time(sequence: list[Input]) -> None:
    state, steps = drive(sequence)
    carried_out: list[str] = []
    refused: list[str] = []
    in_progress: str | None = None
    for step in steps:
        for effect in step.effects:
            if isinstance(effect, Register):
                # One at a time: the registration before has had its outcome.
                assert in_progress is None
                in_progress = effect.command.id
                carried_out.append(in_progress)
        for event in step.events:
            match event:
                case protocol.CommandFailed(command_id=cid, command_type="register_runner"):
                    refused.append(cid)
                case protocol.RegistrationFailed(command_id=cid) if cid == in_progress:
                    in_progress = None
                case protocol.RunnerRegistered() | protocol.VmStopping():
                    in_progress = None
    arrived = {
        item.command.id
        for item in sequence
        if isinstance(item, CommandArrived) and isinstance(item.command, protocol.RegisterRunner)
    }
    waiting = [command.id for command in state.pending]
    fates = carried_out + refused + waiting
    # A command the controller repeats is acted on once: each registration has exactly one fate.
    assert sorted(fates) == sorted(arrived)
    assert len(waiting) <= MAX_PENDING_REGISTRATIONS


@settings(max_examples=500, deadline=None)
@given(st.lists(any_inputs, max_size=50))
def test_the_first_stop_decides_and_is_announced_once(sequence: list[Input]) -> None:
    state, steps = drive(sequence)
    plans = [step.state.stop for step in steps if step.state.stop is not None]
    announced = [event for step in steps for event in step.events if isinstance(event, protocol.VmStopping)]
    assert len(announced) == (1 if plans else 0)
    for plan in plans:
        # Later requests and signals only hurry it: the reason, the grace and the removal stay the first's.
        assert (plan.reason, plan.grace_s, plan.remove_token) == (
            plans[0].reason,
            plans[0].grace_s,
            plans[0].remove_token,
        )
        assert plan.exit_code in (plans[0].exit_code, exitcodes.UNDELIVERED)
    if state.phase in (Phase.STOPPING, Phase.STOPPED):
        assert state.pending == ()
    signals = sum(isinstance(item, SignalReceived) for item in sequence)
    if state.stop is not None and signals >= 2 and state.stop.reason == "signal":
        assert state.stop.cut_short
    # Whatever happens, a step that does not apply changes nothing and owes nothing.
    for before, step in itertools.pairwise([Step(AgentState()), *steps]):
        if not step.accepted:
            assert step.state == before.state
            assert step.events == ()


def test_reports_on_an_earlier_hand_over_of_a_command_sent_again_change_nothing() -> None:
    # The controller sent the id again once it was forgotten: the copy waits, and is a registration of its own.
    state = transition(ready(), registration("A")).state
    assert state.attempt == 1
    state = msgspec.structs.replace(state, seen_commands=())
    state = transition(state, registration("A")).state
    assert [command.id for command in state.pending] == ["A"]
    _, steps = drive_from(state, [RegistrationAborted("A", "runner_start_failed", "gone", attempt=1)])
    taken = steps[-1]
    assert [effect.attempt for effect in taken.effects if isinstance(effect, Register)] == [2]
    again = taken.state
    # The first hand-over's late reports are not about the copy now in progress.
    for late in (
        RegistrationAborted("A", "runner_start_failed", "late", attempt=1),
        ListenTimedOut("A", 30, attempt=1),
    ):
        assert not transition(again, late).accepted
    assert transition(again, RegistrationAborted("A", "configure_failed", "404", attempt=2)).accepted


# --- Preemption notices ----------------------------------------------------------------------------------------


def notice(action: str = "terminate", left: float | None = 120.0) -> PreemptionNoticed:
    deadline = None if left is None else "2024-01-15T10:32:00Z"
    return PreemptionNoticed(provider="aws", action=action, deadline=deadline, seconds_left=left)


def busy() -> AgentState:
    return run([START, Acknowledged(), registration("c1"), RunnerListening(), JobRunning("b")])[0]


def test_a_notice_is_reported_first_and_once() -> None:
    step = transition(busy(), notice())
    [send] = [effect for effect in step.effects if isinstance(effect, Send)]
    assert send.first
    assert send.event == protocol.VmPreempted(
        provider="aws", action="terminate", deadline="2024-01-15T10:32:00Z", phase="Busy", job_name="b"
    )
    again = transition(step.state, notice())
    assert again.ignored == "a notice already reported"
    assert again.events == ()


def test_a_busy_runner_keeps_its_job_until_the_margin() -> None:
    step = transition(busy(), notice(left=120))
    assert step.state.phase is Phase.BUSY
    assert StopJobIn(100, 20) in step.effects
    # A notice later than the margin: the job stops at once, with what is left for its grace.
    late_notice = transition(busy(), notice(left=8))
    assert StopJobIn(0, 8) in late_notice.effects
    due = transition(step.state, PreemptionDue())
    assert due.state.stop is not None
    assert (due.state.stop.reason, due.state.stop.grace_s) == ("preempted", 20)
    # Stopped for another reason first: the deadline only shortens the runner's grace.
    stopping = transition(busy(), StopRequested(reason="scale-in", grace_s=300)).state
    late = transition(stopping, notice(left=60))
    assert ShortenGrace(40) in late.effects
    # A shutdown with a long grace after the notice: when the margin is reached, the grace is cut to it.
    noticed = transition(busy(), notice(left=120)).state
    shut = transition(noticed, StopRequested(reason="scale-in", grace_s=300)).state
    assert transition(shut, PreemptionDue()).effects == (ShortenGrace(20),)


def test_an_idle_runner_is_stopped_at_once_and_a_notice_without_a_deadline_is_a_shutdown() -> None:
    idle = run([START, Acknowledged(), registration("c1"), RunnerListening()])[0]
    stopped = transition(idle, notice()).state
    assert stopped.phase is Phase.STOPPING
    assert stopped.stop is not None
    assert stopped.stop.reason == "preempted"
    removed = transition(busy(), notice("autoscaling-terminated", left=None)).state
    assert removed.phase is Phase.STOPPING
    assert removed.stop is not None
    assert removed.stop.grace_s == 30.0  # the configured grace, as for a shutdown


def test_in_ready_later_registrations_are_refused_and_a_registration_in_progress_is_abandoned() -> None:
    preempted = transition(ready(), notice()).state
    refused = transition(preempted, registration("c9"))
    assert refused.state.phase is Phase.READY
    assert [event.error for event in refused.events if isinstance(event, protocol.CommandFailed)] == [PREEMPTED_REFUSAL]
    registering = transition(ready(), registration("c1")).state
    waiting = transition(registering, registration("c2")).state
    abandoned = transition(waiting, notice())
    assert abandoned.state.run_abandoned is not None
    assert refusals(list(abandoned.events)) == ["c2"]
    failed = transition(abandoned.state, RegistrationAborted("c1", "runner_start_failed", "cancelled"))
    assert failed.events == (protocol.RegistrationFailed(command_id="c1", reason="preempted", error=PREEMPTED_REFUSAL),)


def test_a_persistent_runner_whose_job_ends_before_the_margin_takes_no_other() -> None:
    persistent = Start(runner_name="r", ephemeral=False)
    state = run([persistent, Acknowledged(), registration("c1"), RunnerListening(), JobRunning("b")])[0]
    state, _ = drive_from(transition(state, notice()).state, [JobDone("b", "Succeeded")])
    assert state.phase is Phase.STOPPING
    assert state.stop is not None
    assert state.stop.reason == "preempted"
