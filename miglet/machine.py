"""The agent's state machine as one pure function: everything the agent knows, and every decision it makes.

`transition(state, input)` returns the next state and the effects the change calls for: events owed to the
controller, a registration to carry out, log lines, a runner to hurry. It knows nothing of trio, HTTP or clocks:
the tasks do the I/O and feed it inputs (the controller's commands, the runner's output, signals, timers), the
driver (`miglet.driver`) carries out the effects, and property tests drive it directly. An input that does not
apply in the current state changes nothing and says why (`Step.ignored`). docs/design.md shows where it sits.
"""

from __future__ import annotations

import enum
import logging
from typing import Any, Final, Literal

import msgspec

from miglet import exitcodes, protocol
from miglet.secret import Secret


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
# Every phase change the machine may make; `transition` refuses to make any other (a bug, raised as such).
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
OVER: Final = frozenset({_P.STOPPING, _P.STOPPED})

# How many command ids are remembered, so that a command the controller repeats is acted on once: the latest
# SEEN_COMMANDS_KEPT at most, in generations of SEEN_GENERATION (adding one copies only the newest generation).
SEEN_COMMANDS_KEPT: Final = 4096
SEEN_GENERATION: Final = 512
# Registrations that arrive while one is being carried out wait for its outcome, up to this many.
MAX_PENDING_REGISTRATIONS: Final = 16

# The limits on how long the agent may stay in a phase at a stretch: the stop reason, and the exit code.
DEADLINES: Final = {
    _P.WAITING_FOR_CONTROLLER: ("ack_timeout", exitcodes.FAILURE),
    _P.READY: ("registration_timeout", exitcodes.FAILURE),
    _P.IDLE: ("idle_timeout", exitcodes.OK),
}

STOPPING_REFUSAL: Final = "the agent is stopping"


class StopPlan(msgspec.Struct, frozen=True, kw_only=True):
    """How the agent stops, as decided by whoever asked first."""

    reason: str
    grace_s: float
    remove_token: Secret | None = None
    exit_code: int = exitcodes.OK
    # A signal came while stopping: the runner is killed without waiting out its grace.
    grace_cut: bool = False
    # A second signal: the runner is killed now, its removal skipped, and the last delivery kept brief.
    cut_short: bool = False


class Abandoned(msgspec.Struct, frozen=True):
    """Why the registration in progress is given up while its runner is still starting."""

    reason: protocol.RegistrationFailure
    error: str


class Preemption(msgspec.Struct, frozen=True):
    """A cloud's notice that it takes the VM back."""

    provider: str
    action: str
    deadline: str | None  # RFC 3339 UTC; None: the cloud gives no time


PREEMPTED_REFUSAL: Final = "preempted: the cloud is taking the VM back"
# Notices already reported, so that each is reported once (a cloud repeats its notice on every poll): one per
# kind of notice, and there are a handful of kinds.
NOTICES_KEPT: Final = 16


class AgentState(msgspec.Struct, frozen=True, kw_only=True):
    phase: Phase = Phase.INITIALIZING
    runner_name: str = ""
    ephemeral: bool = True
    grace_s: float = 30.0  # a stop's grace period unless the stop asks for another
    command_id: str | None = None  # the register_runner command being or last acted on
    # How many registrations were handed over: the one in progress is this one. A controller may send an id
    # again once it is forgotten; the count tells the copies apart.
    attempt: int = 0
    # Registrations that came while one was being carried out, in order; each waits for its outcome.
    pending: tuple[protocol.RegisterRunner, ...] = ()
    seen_commands: tuple[frozenset[str], ...] = ()  # the ids of the commands acted on, by generation, newest last
    listening: bool = False  # a runner printed "Listening for Jobs" and has not exited since
    # Why the registration in progress is being given up (its runner did not listen in time, the VM is being
    # preempted): the supervisor stops it, and what the runner prints no longer counts.
    run_abandoned: Abandoned | None = None
    job: str | None = None
    # Which workflow run the job belongs to, once its hook said so (`job_identified` is sent once per job).
    github: protocol.GithubContext | None = None
    jobs_completed: int = 0
    runner_pid: int | None = None  # the runner process running now (config.sh or run.sh), for the state file
    runner_version: str | None = None  # as the runner last said it
    signals: int = 0  # stop signals received
    stop: StopPlan | None = None
    margin_s: float = 20.0  # how long before a preemption's deadline a running job is stopped
    preempted: Preemption | None = None  # the notice acted on: no runner is started any more
    notices: tuple[str, ...] = ()

    def has_seen(self, command_id: str) -> bool:
        return any(command_id in generation for generation in self.seen_commands)

    @property
    def stop_reason(self) -> str | None:
        return None if self.stop is None else self.stop.reason

    @property
    def exit_code(self) -> int:
        return exitcodes.OK if self.stop is None else self.stop.exit_code


# --- Inputs ----------------------------------------------------------------------------------------------------


class Start(msgspec.Struct, frozen=True, kw_only=True):
    runner_name: str
    ephemeral: bool
    grace_s: float = 30.0
    margin_s: float = 20.0


class Acknowledged(msgspec.Struct, frozen=True):
    pass


class CommandArrived(msgspec.Struct, frozen=True):
    command: protocol.Command


class CommandRejected(msgspec.Struct, frozen=True):
    """A command the controller sent that could not be decoded."""

    rejected: protocol.RejectedCommand


class TakeNext(msgspec.Struct, frozen=True):
    """Ready again: carry out the registration that waited longest, if one did."""


class RegistrationAborted(msgspec.Struct, frozen=True):
    command_id: str
    reason: protocol.RegistrationFailure
    error: str
    attempt: int | None = None  # which hand-over of the command (`Register.attempt`); None: the current one


class ListenTimedOut(msgspec.Struct, frozen=True):
    command_id: str
    limit_s: float
    attempt: int | None = None


class RunnerListening(msgspec.Struct, frozen=True):
    timings: dict[str, float] | None = None


class JobRunning(msgspec.Struct, frozen=True):
    name: str


class JobDone(msgspec.Struct, frozen=True):
    name: str
    result: str


class JobIdentified(msgspec.Struct, frozen=True):
    """A job hook of the runner's said which workflow run its job belongs to (`stage`: which hook)."""

    stage: Literal["started", "completed"]
    github: protocol.GithubContext


class RunnerGone(msgspec.Struct, frozen=True):
    exit_code: int
    killed_processes: int | None = None  # what the runner left behind, killed once it had exited


class RunnerVersion(msgspec.Struct, frozen=True):
    """The runner said which version it is (`Current runner version: '…'`)."""

    version: str


class RunnerProcess(msgspec.Struct, frozen=True):
    """A runner process started (its pid) or ended (None)."""

    pid: int | None


class StopRequested(msgspec.Struct, frozen=True, kw_only=True):
    reason: str
    grace_s: float | None = None  # None: the configured grace
    remove_token: Secret | None = None
    exit_code: int = exitcodes.OK


class SignalReceived(msgspec.Struct, frozen=True):
    name: str


class DeadlinePassed(msgspec.Struct, frozen=True):
    """The agent stayed in `phase` as long as it may."""

    phase: Phase
    limit_s: float


class PreemptionNoticed(msgspec.Struct, frozen=True, kw_only=True):
    """The cloud says it takes the VM back: `seconds_left` until `deadline` (both None when it gives no time)."""

    provider: protocol.Provider
    action: str
    deadline: str | None
    seconds_left: float | None


class PreemptionDue(msgspec.Struct, frozen=True):
    """A preemption's deadline is MIGLET_PREEMPTION_MARGIN away: the job running must stop now, within `grace_s`
    (None: the margin)."""

    grace_s: float | None = None


class Finished(msgspec.Struct, frozen=True):
    """The stop is done: the runner is gone and the events owed had their chance to be delivered."""


class Undelivered(msgspec.Struct, frozen=True):
    """Stopped, some lifecycle events owed to the controller could not be delivered."""


Input = (
    Start
    | Acknowledged
    | CommandArrived
    | CommandRejected
    | TakeNext
    | RegistrationAborted
    | ListenTimedOut
    | RunnerListening
    | JobRunning
    | JobDone
    | JobIdentified
    | RunnerGone
    | RunnerProcess
    | RunnerVersion
    | StopRequested
    | SignalReceived
    | DeadlinePassed
    | PreemptionNoticed
    | PreemptionDue
    | Finished
    | Undelivered
)


# --- Effects ---------------------------------------------------------------------------------------------------


class Send(msgspec.Struct, frozen=True):
    """Queue `event` for the controller (with `first`, ahead of the events already queued)."""

    event: protocol.AnyEvent
    first: bool = False


class Register(msgspec.Struct, frozen=True):
    """Check this registration, configure the runner and start it (`AgentState.attempt` is `attempt` while it
    is the current one)."""

    command: protocol.RegisterRunner
    attempt: int


class StopRunner(msgspec.Struct, frozen=True):
    """The agent is stopping: stop the runner, gracefully within `grace_s`."""

    grace_s: float


class CutGrace(msgspec.Struct, frozen=True):
    """Kill the stopping runner without waiting out its grace."""


class ShortenGrace(msgspec.Struct, frozen=True):
    """The stopping runner is killed within `seconds` at the latest (a preemption's deadline is near)."""

    seconds: float


class StopJobIn(msgspec.Struct, frozen=True):
    """Apply `PreemptionDue(grace_s)` in `seconds`: the running job may go on until then."""

    seconds: float
    grace_s: float


class CutShort(msgspec.Struct, frozen=True):
    """Stop now: kill the runner, skip its removal, and keep the last delivery of events brief."""


class Log(msgspec.Struct, frozen=True):
    message: str
    level: int = logging.INFO
    fields: dict[str, Any] = {}


class Then(msgspec.Struct, frozen=True):
    """Apply `input` next, once this step's effects are carried out."""

    input: Input


Effect = Send | Register | StopRunner | ShortenGrace | StopJobIn | CutGrace | CutShort | Log | Then


class Step(msgspec.Struct, frozen=True):
    state: AgentState
    effects: tuple[Effect, ...] = ()
    # Why the input did not apply (nothing changed), or None when it did.
    ignored: str | None = None

    @property
    def accepted(self) -> bool:
        return self.ignored is None

    @property
    def events(self) -> tuple[protocol.AnyEvent, ...]:
        """The events this step owes the controller, in order."""
        return tuple(effect.event for effect in self.effects if isinstance(effect, Send))


class IllegalTransition(Exception):
    """The machine tried a phase change outside LEGAL_TRANSITIONS: a bug in `transition`."""


def transition(state: AgentState, event: Input) -> Step:
    """The next state after `event`, with the effects the change calls for."""
    step = _transition(state, event)
    before, after = state.phase, step.state.phase
    if after is not before and (before, after) not in LEGAL_TRANSITIONS:
        raise IllegalTransition(f"{before.value} -> {after.value} on {type(event).__name__}")
    return step


def _ignore(state: AgentState, why: str) -> Step:
    return Step(state, ignored=why)


def _transition(state: AgentState, event: Input) -> Step:
    replace = msgspec.structs.replace
    phase = state.phase
    match event:
        case RunnerProcess(pid=pid):
            # Whatever the phase: the state file must always name a process that a restarted MIGlet should stop.
            return Step(replace(state, runner_pid=pid))
        case RunnerVersion(version=version) if state.run_abandoned is None:
            return Step(replace(state, runner_version=version))
        case Start(runner_name=name, ephemeral=ephemeral, grace_s=grace, margin_s=margin) if phase is _P.INITIALIZING:
            waiting = replace(state, phase=_P.WAITING_FOR_CONTROLLER, runner_name=name, ephemeral=ephemeral)
            return Step(replace(waiting, grace_s=grace, margin_s=margin))
        case Acknowledged() if phase is _P.WAITING_FOR_CONTROLLER:
            return Step(replace(state, phase=_P.READY))
        case CommandArrived(command=command):
            return _command(state, command)
        case CommandRejected(rejected=rejected):
            return _rejected(state, rejected)
        case TakeNext() if phase is _P.READY and state.pending:
            command, *rest = state.pending
            return _register(replace(state, pending=tuple(rest)), command)
        case RegistrationAborted(command_id=cid, reason=reason, error=error, attempt=attempt) if (
            phase is _P.REGISTERING_RUNNER and _current(state, cid, attempt)
        ):
            return _registration_failed(state, reason, error)
        case ListenTimedOut(command_id=cid, limit_s=limit, attempt=attempt) if (
            phase is _P.REGISTERING_RUNNER and _current(state, cid, attempt) and state.run_abandoned is None
        ):
            give_up = Log(
                "The runner did not start listening for jobs in time; stopping it", logging.ERROR, {"timeout_s": limit}
            )
            why = Abandoned("runner_start_failed", f"runner did not listen for jobs within {limit:g} s")
            return Step(replace(state, run_abandoned=why), (give_up,))
        case RunnerListening(timings=timings) if phase is _P.REGISTERING_RUNNER and state.run_abandoned is None:
            registered = protocol.RunnerRegistered(
                runner_name=state.runner_name,
                command_id=state.command_id or "",
                timings=timings,
                runner_version=state.runner_version,
            )
            listening = replace(state, phase=_P.IDLE, listening=True, pending=())
            refusals = _refusals(state.pending, f"cannot register a runner while {_P.IDLE.value}")
            return Step(listening, (Send(registered), *refusals))
        case JobRunning(name=name) if phase is _P.IDLE:
            return _job_started(replace(state, phase=_P.BUSY), name)
        case JobRunning(name=name) if phase is _P.BUSY:
            # The runner never said how the job before ended (it can drop one it could not renew): that one is over.
            step = _job_started(replace(state, jobs_completed=state.jobs_completed + 1), name)
            return Step(step.state, (*_abandoned(state), *step.effects))
        case JobRunning(name=name) if phase is _P.STOPPING and state.listening:
            # GitHub handed the runner a job just as the stop began: the controller still hears of it (and of the
            # end of one the runner dropped without a result, if there was one).
            step = _job_started(state, name)
            return Step(step.state, (*_abandoned(state), *step.effects))
        case JobIdentified(github=github) if state.job is not None and phase in (_P.BUSY, _P.STOPPING):
            if state.github is not None:
                return _ignore(state, "the job's workflow run is known already")
            return _identified(state, state.job, github)
        case RunnerListening() if phase is _P.STOPPING and state.run_abandoned is None:
            # A runner that came up as the stop began: what it does until it has stopped is still reported.
            return Step(replace(state, listening=True))
        case JobDone(name=name, result=result) if phase is _P.BUSY or (phase is _P.STOPPING and state.job is not None):
            # While stopping, the runner still reports the job it was running (usually as Canceled).
            completed: tuple[Effect, ...] = (
                Send(protocol.JobCompleted(job_name=name, result=result, github=state.github)),
            )
            after = _P.IDLE if phase is _P.BUSY else phase
            if after is _P.IDLE and state.preempted is not None and not state.ephemeral:
                # The job ended before the preemption's deadline; the runner must take no other.
                completed += (Then(StopRequested(reason="preempted", grace_s=min(state.grace_s, state.margin_s))),)
            done = replace(state, phase=after, job=None, github=None, jobs_completed=state.jobs_completed + 1)
            return Step(done, completed)
        case RunnerGone(exit_code=code, killed_processes=killed) if phase is _P.REGISTERING_RUNNER:
            exited = Log("Runner exited", fields={"exit_code": code, "killed_processes": killed})
            error = f"runner exited with code {code} before listening for jobs"
            step = _registration_failed(state, "runner_start_failed", error)
            return Step(step.state, (exited, *step.effects))
        case RunnerGone(exit_code=code, killed_processes=killed) if phase in (_P.IDLE, _P.BUSY, _P.STOPPING):
            return _runner_exited(state, code, killed)
        case StopRequested(reason=reason) if phase in OVER:
            return Step(state, (Log("Already stopping", fields={"reason": reason}),), ignored="already stopping")
        case StopRequested(reason=reason, grace_s=grace, remove_token=token, exit_code=code):
            plan = StopPlan(
                reason=reason, grace_s=state.grace_s if grace is None else grace, remove_token=token, exit_code=code
            )
            return _stop(state, plan)
        case SignalReceived(name=name):
            return _signal(state, name)
        case DeadlinePassed(phase=passed, limit_s=limit) if passed is phase and phase in DEADLINES:
            reason, code = DEADLINES[phase]
            passed_log = Log("Deadline passed", logging.WARNING, {"phase": phase.value, "limit_s": limit})
            step = _stop(state, StopPlan(reason=reason, grace_s=state.grace_s, exit_code=code))
            return Step(step.state, (passed_log, *step.effects))
        case PreemptionNoticed() if _notice_key(event) in state.notices:
            return _ignore(state, "a notice already reported")
        case PreemptionNoticed():
            return _preempted(state, event)
        case PreemptionDue(grace_s=grace) if phase not in OVER and state.preempted is not None:
            grace = min(state.grace_s, state.margin_s) if grace is None else grace
            plan = StopPlan(reason="preempted", grace_s=grace)
            due = Log("The preemption's deadline is near: stopping the runner", logging.WARNING)
            step = _stop(state, plan)
            return Step(step.state, (due, *step.effects))
        case PreemptionDue() if phase is _P.STOPPING and state.preempted is not None:
            # Stopping for another reason with a longer grace: the deadline wins, the margin left for the report.
            return Step(state, (ShortenGrace(state.margin_s),))
        case Finished() if phase is _P.STOPPING:
            stopped = replace(state, phase=_P.STOPPED, listening=False, job=None, github=None)
            return Step(stopped, _abandoned(state))
        case Undelivered() if phase is _P.STOPPED and state.stop is not None and state.stop.exit_code == exitcodes.OK:
            return Step(replace(state, stop=replace(state.stop, exit_code=exitcodes.UNDELIVERED)))
    return _ignore(state, f"{type(event).__name__} does not apply while {phase.value}")


def _command(state: AgentState, command: protocol.Command) -> Step:
    if state.has_seen(command.id):
        seen = Log("Ignoring a command seen before", fields={"command_id": command.id})
        return Step(state, (seen,), ignored="a command seen before")
    state = _seen(state, command.id)
    received = Log(f"Received {command_type(command)} command from controller", fields={"command_id": command.id})
    match command:
        case protocol.RegisterRunner():
            step = _registration(state, command)
        case protocol.Shutdown():
            step = _shutdown(state, command)
    return Step(step.state, (received, *step.effects))


def command_type(command: protocol.Command) -> Literal["register_runner", "shutdown"]:
    return "register_runner" if isinstance(command, protocol.RegisterRunner) else "shutdown"


def _registration(state: AgentState, command: protocol.RegisterRunner) -> Step:
    phase = state.phase
    if state.preempted is not None and phase not in OVER:
        return Step(state, _refusals((command,), PREEMPTED_REFUSAL))
    if phase is _P.READY:
        return _register(state, command)
    if phase is _P.REGISTERING_RUNNER:
        if len(state.pending) >= MAX_PENDING_REGISTRATIONS:
            return Step(state, _refusals((command,), "too many registrations pending"))
        # It waits for the outcome of the one in progress: a failed one leaves the agent Ready for it.
        return Step(msgspec.structs.replace(state, pending=(*state.pending, command)))
    why = STOPPING_REFUSAL if phase in OVER else f"cannot register a runner while {phase.value}"
    return Step(state, _refusals((command,), why))


def _register(state: AgentState, command: protocol.RegisterRunner) -> Step:
    attempt = state.attempt + 1
    registering = msgspec.structs.replace(state, phase=_P.REGISTERING_RUNNER, command_id=command.id, attempt=attempt)
    return Step(registering, (Register(command, attempt),))


def _registration_failed(state: AgentState, reason: protocol.RegistrationFailure, error: str) -> Step:
    if state.run_abandoned is not None:
        # Given up on before it could end by itself: that is the outcome, whatever the runner did after.
        reason, error = state.run_abandoned.reason, state.run_abandoned.error
    failed = protocol.RegistrationFailed(command_id=state.command_id or "", reason=reason, error=error)
    logged = Log(
        "Runner registration failed",
        logging.ERROR,
        {"command_id": state.command_id, "reason": reason, "error": error},
    )
    ready = msgspec.structs.replace(state, phase=_P.READY, run_abandoned=None, listening=False)
    effects: tuple[Effect, ...] = (logged, Send(failed))
    if ready.pending:
        effects += (Then(TakeNext()),)
    return Step(ready, effects)


def _shutdown(state: AgentState, command: protocol.Shutdown) -> Step:
    params = command.parameters
    effects: tuple[Effect, ...] = ()
    remove_token = params.remove_token
    if remove_token is not None and (problem := protocol.token_problem(remove_token)) is not None:
        # Whoever asks for a stop expects the VM to stop: only the removal is given up, and the controller
        # hears why.
        error = f"remove_token {problem}; the runner is not removed"
        effects = (
            Log("Unusable shutdown command parameter", logging.ERROR, {"command_id": command.id, "error": error}),
            Send(protocol.CommandFailed(command_id=command.id, command_type="shutdown", error=error)),
        )
        remove_token = None
    if state.phase in OVER:
        return Step(state, (*effects, Log("Already stopping", fields={"reason": params.reason})))

    grace = state.grace_s if params.grace_period_s is None else params.grace_period_s
    step = _stop(state, StopPlan(reason=params.reason, grace_s=grace, remove_token=remove_token))
    return Step(step.state, (*effects, *step.effects))


def _rejected(state: AgentState, rejected: protocol.RejectedCommand) -> Step:
    logged = Log(
        "Rejected a command from the controller",
        logging.WARNING,
        {"command_id": rejected.id, "command_type": rejected.type, "error": rejected.error},
    )
    if rejected.id is None or state.has_seen(rejected.id):
        return Step(state, (logged,))
    failure: protocol.AnyEvent
    if rejected.type == "register_runner":
        failure = protocol.RegistrationFailed(command_id=rejected.id, reason="invalid_command", error=rejected.error)
    else:
        failure = protocol.CommandFailed(command_id=rejected.id, command_type=rejected.type or "", error=rejected.error)
    return Step(_seen(state, rejected.id), (logged, Send(failure)))


def _seen(state: AgentState, command_id: str) -> AgentState:
    generations = state.seen_commands
    if generations and len(generations[-1]) < SEEN_GENERATION:
        generations = (*generations[:-1], generations[-1] | {command_id})
    else:
        generations = (*generations, frozenset({command_id}))[-(SEEN_COMMANDS_KEPT // SEEN_GENERATION) :]
    return msgspec.structs.replace(state, seen_commands=generations)


def _current(state: AgentState, command_id: str, attempt: int | None) -> bool:
    """Whether a report on a registration is about the one in progress."""
    return command_id == state.command_id and (attempt is None or attempt == state.attempt)


def _refusals(commands: tuple[protocol.RegisterRunner, ...], why: str) -> tuple[Effect, ...]:
    effects: list[Effect] = []
    for command in commands:
        fields = {"command_id": command.id, "error": why}
        effects.append(Log("Refusing register_runner command", logging.WARNING, fields))
        effects.append(Send(protocol.CommandFailed(command_id=command.id, command_type="register_runner", error=why)))
    return tuple(effects)


def _stop(state: AgentState, plan: StopPlan) -> Step:
    stopping = msgspec.structs.replace(state, phase=_P.STOPPING, stop=plan, pending=())
    logged = Log("Stopping", fields={"reason": plan.reason, "grace_s": plan.grace_s})
    vm_stopping = Send(protocol.VmStopping(reason=plan.reason, runner_name=state.runner_name))
    # Registrations still waiting will not be carried out: the controller hears so.
    refusals = _refusals(state.pending, STOPPING_REFUSAL)
    return Step(stopping, (logged, StopRunner(plan.grace_s), vm_stopping, *refusals))


def _signal(state: AgentState, name: str) -> Step:
    replace = msgspec.structs.replace
    state = replace(state, signals=state.signals + 1)
    plan = state.stop
    if state.signals > 1 and plan is not None:
        # Asked again: the operator is not prepared to wait any longer.
        logged = Log("Second signal: killing the runner now", logging.WARNING, {"signal": name})
        return Step(replace(state, stop=replace(plan, grace_cut=True, cut_short=True)), (logged, CutShort()))
    if plan is not None:
        # Already stopping for another reason (a shutdown command, the end of an ephemeral runner): whoever sends
        # the signal is not prepared to wait out the runner's grace period either.
        logged = Log("Signal while stopping: killing the runner now", logging.WARNING, {"signal": name})
        return Step(replace(state, stop=replace(plan, grace_cut=True)), (logged, CutGrace()))
    step = _stop(state, StopPlan(reason="signal", grace_s=state.grace_s))
    return Step(step.state, (Log("Received signal", fields={"signal": name}), *step.effects))


def _job_started(state: AgentState, name: str) -> Step:
    """The runner took job `name`: what its hooks say from now on is about it."""
    started = msgspec.structs.replace(state, job=name, github=None)
    return Step(started, (Send(protocol.JobStarted(job_name=name)),))


def _identified(state: AgentState, job: str, github: protocol.GithubContext) -> Step:
    fields = {"job_name": job, "repository": github.repository, "run_id": github.run_id}
    effects = (Log("Job identified", fields=fields), Send(protocol.JobIdentified(job_name=job, github=github)))
    return Step(msgspec.structs.replace(state, github=github), effects)


def _runner_exited(state: AgentState, code: int, killed: int | None) -> Step:
    replace = msgspec.structs.replace
    exited_log = Log("Runner exited", fields={"exit_code": code, "killed_processes": killed})
    abandoned = _abandoned(state)
    state = replace(state, listening=False, github=None)
    if state.phase is _P.STOPPING:
        exited = Send(protocol.RunnerExited(exit_code=code, reason="stopped", killed_processes=killed))
        return Step(replace(state, job=None), (exited_log, *abandoned, exited))
    took_a_job = state.jobs_completed > 0 or state.job is not None
    if state.ephemeral and took_a_job:
        # An ephemeral runner leaves after its one job, whether or not it said how the job ended: the VM's work
        # is done, and a VM that ran a job is not given another.
        exited = Send(protocol.RunnerExited(exit_code=code, reason="job_done", killed_processes=killed))
        plan = StopPlan(reason="ephemeral runner finished its job", grace_s=state.grace_s)
        stop = _stop(replace(state, job=None), plan)
        return Step(stop.state, (exited_log, *abandoned, exited, *stop.effects))
    exited = Send(protocol.RunnerExited(exit_code=code, reason="unexpected", killed_processes=killed))
    return Step(replace(state, phase=_P.READY, job=None), (exited_log, *abandoned, exited))


def _notice_key(notice: PreemptionNoticed) -> str:
    # Not the deadline: a cloud may move it from one look to the next (GCP's is counted from when it is seen).
    return f"{notice.provider} {notice.action}"


def _preempted(state: AgentState, notice: PreemptionNoticed) -> Step:
    """Tell the controller first; then no runner is started, an idle one is stopped, a job runs until the margin."""
    replace = msgspec.structs.replace
    phase = state.phase
    event = protocol.VmPreempted(
        provider=notice.provider,
        action=notice.action,
        deadline=notice.deadline,
        phase=phase.value,
        job_name=state.job if phase is _P.BUSY else None,
    )
    fields = {"provider": notice.provider, "action": notice.action, "deadline": notice.deadline}
    effects: tuple[Effect, ...] = (Log("Preemption notice", logging.WARNING, fields), Send(event, first=True))
    acted_on = Preemption(notice.provider, notice.action, notice.deadline)
    state = replace(state, notices=(*state.notices, _notice_key(notice))[-NOTICES_KEPT:], preempted=acted_on)
    left = notice.seconds_left
    if phase in OVER:
        if phase is _P.STOPPING and left is not None:
            # The earliest deadline wins: the runner is gone before this one, with the margin to report it.
            effects += (ShortenGrace(max(0.0, left - state.margin_s)),)
        return Step(state, effects)
    if left is None or phase is _P.IDLE:
        # No time given (an autoscaling group removing the VM): as a shutdown. Idle: GitHub must assign no job.
        grace = state.grace_s if left is None else min(state.grace_s, max(0.0, left))
        step = _stop(state, StopPlan(reason="preempted", grace_s=grace))
        return Step(step.state, (*effects, *step.effects))
    if phase is _P.BUSY:
        # The job goes on until the margin; then it gets the margin to wind down, or what is left when the notice
        # came later than that.
        grace = min(state.grace_s, state.margin_s, max(0.0, left))
        return Step(state, (*effects, StopJobIn(max(0.0, left - state.margin_s), grace)))
    refusals = _refusals(state.pending, PREEMPTED_REFUSAL)
    state = replace(state, pending=())
    if phase is _P.REGISTERING_RUNNER:
        state = replace(state, run_abandoned=Abandoned("preempted", PREEMPTED_REFUSAL))
    return Step(state, (*effects, *refusals))


def _abandoned(state: AgentState) -> tuple[Effect, ...]:
    """A job the runner never reported finished (it crashed, or was killed at the end of its grace) is over."""
    if state.job is None:
        return ()
    return (Send(protocol.JobCompleted(job_name=state.job, result="Abandoned", github=state.github)),)
