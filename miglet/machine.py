"""The agent's state machine as one pure function (docs/design.md shows where it sits).

`transition(state, input)` returns the next state and the controller events that the change owes. It knows
nothing of trio, HTTP or clocks: the tasks do the I/O and feed it inputs, and property tests drive it directly.
An input that does not apply in the current state is ignored (`Step.accepted` is false) and changes nothing.
"""

from __future__ import annotations

import enum
from typing import Final

import msgspec

from miglet import protocol


class Phase(enum.StrEnum):
    INITIALIZING = "Initializing"
    WAITING_FOR_CONTROLLER = "WaitingForController"
    READY = "Ready"
    REGISTERING_RUNNER = "RegisteringRunner"
    IDLE = "Idle"
    BUSY = "Busy"
    STOPPING = "Stopping"
    STOPPED = "Stopped"


_P = Phase
# Every phase change the machine may make; anything else is a bug.
LEGAL_TRANSITIONS: Final = frozenset(
    {
        (_P.INITIALIZING, _P.WAITING_FOR_CONTROLLER),
        (_P.WAITING_FOR_CONTROLLER, _P.READY),
        (_P.READY, _P.REGISTERING_RUNNER),
        (_P.REGISTERING_RUNNER, _P.READY),
        (_P.REGISTERING_RUNNER, _P.IDLE),
        (_P.IDLE, _P.BUSY),
        (_P.BUSY, _P.IDLE),
        (_P.IDLE, _P.READY),
        (_P.BUSY, _P.READY),
        (_P.STOPPING, _P.STOPPED),
    }
    | {(phase, _P.STOPPING) for phase in Phase if phase not in (_P.STOPPING, _P.STOPPED)}
)


# Before the controller has acknowledged `vm_started`: nothing but the handshake talks to it yet.
BEFORE_ACKNOWLEDGMENT: Final = frozenset({_P.INITIALIZING, _P.WAITING_FOR_CONTROLLER})


class AgentState(msgspec.Struct, frozen=True, kw_only=True):
    phase: Phase = Phase.INITIALIZING
    runner_name: str = ""
    ephemeral: bool = True
    command_id: str | None = None  # the register_runner command being or last acted on
    handled_commands: frozenset[str] = frozenset()
    listening: bool = False  # a runner printed "Listening for Jobs" and has not exited since
    job: str | None = None
    jobs_completed: int = 0
    stop_reason: str | None = None
    runner_pid: int | None = None  # the runner process running now (config.sh or run.sh), for the state file


# --- Inputs ----------------------------------------------------------------------------------------------------


class Start(msgspec.Struct, frozen=True, kw_only=True):
    runner_name: str
    ephemeral: bool


class Acknowledged(msgspec.Struct, frozen=True):
    pass


class RegistrationReceived(msgspec.Struct, frozen=True):
    command_id: str


class RegistrationAborted(msgspec.Struct, frozen=True):
    command_id: str
    reason: protocol.RegistrationFailure
    error: str


class RunnerListening(msgspec.Struct, frozen=True):
    timings: dict[str, float] | None = None


class JobRunning(msgspec.Struct, frozen=True):
    name: str


class JobDone(msgspec.Struct, frozen=True):
    name: str
    result: str


class RunnerGone(msgspec.Struct, frozen=True):
    exit_code: int
    killed_processes: int | None = None  # what the runner left behind, killed once it had exited


class RunnerProcess(msgspec.Struct, frozen=True):
    """A runner process started (its pid) or ended (None)."""

    pid: int | None


class StopRequested(msgspec.Struct, frozen=True):
    reason: str


class Finished(msgspec.Struct, frozen=True):
    pass


Input = (
    Start
    | Acknowledged
    | RegistrationReceived
    | RegistrationAborted
    | RunnerListening
    | JobRunning
    | JobDone
    | RunnerGone
    | RunnerProcess
    | StopRequested
    | Finished
)


class Step(msgspec.Struct, frozen=True):
    state: AgentState
    events: tuple[protocol.AnyEvent, ...] = ()
    accepted: bool = True


def transition(state: AgentState, event: Input) -> Step:
    """The next state after `event`, with the controller events owed for it."""
    replace = msgspec.structs.replace
    phase = state.phase
    match event:
        case RunnerProcess(pid=pid):
            # Whatever the phase: the state file must always name a process that a restarted MIGlet should stop.
            return Step(replace(state, runner_pid=pid))
        case Start(runner_name=name, ephemeral=ephemeral) if phase is _P.INITIALIZING:
            return Step(replace(state, phase=_P.WAITING_FOR_CONTROLLER, runner_name=name, ephemeral=ephemeral))
        case Acknowledged() if phase is _P.WAITING_FOR_CONTROLLER:
            return Step(replace(state, phase=_P.READY))
        case RegistrationReceived(command_id=cid) if phase is _P.READY and cid not in state.handled_commands:
            return Step(
                replace(
                    state,
                    phase=_P.REGISTERING_RUNNER,
                    command_id=cid,
                    handled_commands=state.handled_commands | {cid},
                )
            )
        case RegistrationAborted(command_id=cid, reason=reason, error=error) if (
            phase is _P.REGISTERING_RUNNER and cid == state.command_id
        ):
            failed = protocol.RegistrationFailed(command_id=cid, reason=reason, error=error)
            return Step(replace(state, phase=_P.READY), (failed,))
        case RunnerListening(timings=timings) if phase is _P.REGISTERING_RUNNER:
            registered = protocol.RunnerRegistered(
                runner_name=state.runner_name, command_id=state.command_id or "", timings=timings
            )
            return Step(replace(state, phase=_P.IDLE, listening=True), (registered,))
        case JobRunning(name=name) if phase is _P.IDLE:
            return Step(replace(state, phase=_P.BUSY, job=name), (protocol.JobStarted(job_name=name),))
        case JobRunning(name=name) if phase is _P.BUSY:
            # The runner never said how the job before ended (it can drop one it could not renew): that one is over.
            started = protocol.JobStarted(job_name=name)
            return Step(
                replace(state, job=name, jobs_completed=state.jobs_completed + 1), (*_abandoned(state), started)
            )
        case JobRunning(name=name) if phase is _P.STOPPING and state.listening:
            # GitHub handed the runner a job just as the stop began: the controller still hears of it (and of the
            # end of one the runner dropped without a result, if there was one).
            started = protocol.JobStarted(job_name=name)
            return Step(replace(state, job=name), (*_abandoned(state), started))
        case RunnerListening() if phase is _P.STOPPING:
            # A runner that came up as the stop began: what it does until it has stopped is still reported.
            return Step(replace(state, listening=True))
        case JobDone(name=name, result=result) if phase is _P.BUSY or (phase is _P.STOPPING and state.job is not None):
            # While stopping, the runner still reports the job it was running (usually as Canceled).
            completed = protocol.JobCompleted(job_name=name, result=result)
            after = _P.IDLE if phase is _P.BUSY else phase
            return Step(replace(state, phase=after, job=None, jobs_completed=state.jobs_completed + 1), (completed,))
        case RunnerGone(exit_code=code, killed_processes=killed) if phase in (_P.IDLE, _P.BUSY, _P.STOPPING):
            return _runner_exited(state, code, killed)
        case StopRequested(reason=reason) if phase not in (_P.STOPPING, _P.STOPPED):
            stopping = protocol.VmStopping(reason=reason, runner_name=state.runner_name)
            return Step(replace(state, phase=_P.STOPPING, stop_reason=reason), (stopping,))
        case Finished() if phase is _P.STOPPING:
            return Step(replace(state, phase=_P.STOPPED, listening=False, job=None), _abandoned(state))
    return Step(state, accepted=False)


def _runner_exited(state: AgentState, code: int, killed: int | None) -> Step:
    replace = msgspec.structs.replace
    state = replace(state, listening=False)
    abandoned = _abandoned(state)
    if state.phase is _P.STOPPING:
        exited = protocol.RunnerExited(exit_code=code, reason="stopped", killed_processes=killed)
        return Step(replace(state, job=None), (*abandoned, exited))
    took_a_job = state.jobs_completed > 0 or state.job is not None
    if state.ephemeral and took_a_job:
        # An ephemeral runner leaves after its one job, whether or not it said how the job ended: the VM's work
        # is done, and a VM that ran a job is not given another.
        reason = "ephemeral runner finished its job"
        exited = protocol.RunnerExited(exit_code=code, reason="job_done", killed_processes=killed)
        stopping = protocol.VmStopping(reason=reason, runner_name=state.runner_name)
        after = replace(state, phase=_P.STOPPING, stop_reason=reason, job=None)
        return Step(after, (*abandoned, exited, stopping))
    exited = protocol.RunnerExited(exit_code=code, reason="unexpected", killed_processes=killed)
    return Step(replace(state, phase=_P.READY, job=None), (*abandoned, exited))


def _abandoned(state: AgentState) -> tuple[protocol.AnyEvent, ...]:
    """A job the runner never reported finished (it crashed, or was killed at the end of its grace) is over."""
    if state.job is None:
        return ()
    return (protocol.JobCompleted(job_name=state.job, result="Abandoned"),)
