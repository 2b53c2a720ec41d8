"""The runner-supervisor task: turns each accepted `register_runner` command into a running runner.

It receives the registrations the machine hands over (it moved to RegisteringRunner), checks them, configures
the runner, starts it, and feeds what the runner does (`Started`, each `Line`, `Exited`, read from the backend's
channel) back to the machine until the runner exits. Cancelling it stops the runner gracefully; that is how the
agent stops. A bug met while following the runner's output is reported and the line skipped, so that it never
costs the job the runner is running.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Final, NamedTuple
from urllib.parse import urlsplit

import trio

from miglet import machine
from miglet.config import Config
from miglet.driver import Driver
from miglet.machine import Phase
from miglet.protocol import RegisterRunner, RegistrationFailure, token_problem, unprintable_character
from miglet.runner import output
from miglet.runner.backend import ConfigureFailed, Exited, Line, Registration, RunEvent, RunnerBackend, Started
from miglet.runner.output import relay_line
from miglet.secret import Secret, redact
from miglet.supervision import BugReport, error_text, log_bug
from miglet.tasks.runner_extras import Identities
from miglet.timings import PhaseTimings

log = logging.getLogger(__name__)

MAX_LABELS: Final = 100
# Shorter values are not looked for in a command's other parameters (they would match ordinary words).
MIN_SECRET_IN_TEXT: Final = 6
MAX_URL: Final = 2048
# Neither may start with "-": config.sh would read a value starting with "--" as a flag of its own.
_LABEL: Final = re.compile(r"(?!-)[^\s,\x00-\x1f\x7f]{1,256}")
_GROUP: Final = re.compile(r"(?!-)[^\x00-\x1f\x7f]{1,256}")


class InvalidRegistration(Exception):
    def __init__(self, reason: RegistrationFailure, error: str) -> None:
        super().__init__(error)
        self.reason = reason


def registration_from_command(
    command: RegisterRunner, config: Config, now: datetime, clock_skew: timedelta = timedelta(seconds=30)
) -> Registration:
    """Check a `register_runner` command and combine it with the config; raises InvalidRegistration."""
    params = command.parameters
    if params.jit_config is not None:
        # The runner is started with it directly; a registration token given as well is not used.
        _check_token("jit_config", params.jit_config)
    elif params.registration_token is not None:
        _check_token("registration_token", params.registration_token)
    else:
        raise InvalidRegistration("invalid_command", "neither registration_token nor jit_config is given")
    if params.expires_at is not None and params.expires_at <= now - clock_skew:
        raise InvalidRegistration("token_expired", f"registration token expired at {params.expires_at.isoformat()}")
    _check_runner_url(params.runner_url, config.allow_http_runner_url)
    if not params.labels and params.jit_config is None:
        raise InvalidRegistration("invalid_command", "labels must not be empty")
    if len(params.labels) > MAX_LABELS:
        raise InvalidRegistration("invalid_command", f"at most {MAX_LABELS} labels are allowed")
    for label in params.labels:
        # Masked before repr(), whose escaping could hide a secret from the mask.
        if (character := unprintable_character(label)) is not None:
            raise InvalidRegistration(
                "invalid_command", f"label {redact(label)!r} contains a control or format character ({character})"
            )
        if not _LABEL.fullmatch(label):
            raise InvalidRegistration(
                "invalid_command", f"label {redact(label)!r} is empty, has commas or white space, or starts with '-'"
            )
    if (character := unprintable_character(params.runner_group)) is not None:
        raise InvalidRegistration(
            "invalid_command", f"runner_group must not contain control or format characters ({character})"
        )
    if not _GROUP.fullmatch(params.runner_group):
        raise InvalidRegistration(
            "invalid_command", "runner_group must be 1-256 printable characters, not starting with '-'"
        )
    # These go into config.sh's argument list, which every process on the VM can read (and the labels and the
    # group to GitHub, which shows them): none may carry a secret of this command's or the controller token.
    secrets = _secret_forms(params.registration_token, params.jit_config, config.controller_token)
    for name, value in (("runner_url", params.runner_url), ("runner_group", params.runner_group)):
        if _holds_any(value, secrets):
            raise InvalidRegistration("invalid_command", f"{name} must not contain a secret")
    if any(_holds_any(label, secrets) for label in params.labels):
        raise InvalidRegistration("invalid_command", "labels must not contain a secret")
    return Registration(
        command_id=command.id,
        url=params.runner_url,
        name=config.effective_runner_name,
        labels=tuple(params.labels),
        group=params.runner_group,
        ephemeral=config.ephemeral,
        token=params.registration_token,
        jit_config=params.jit_config,
        disable_update=config.runner_disable_update,
    )


def _secret_forms(*secrets: Secret | None) -> tuple[str, ...]:
    """The values to look for: each secret as given and trimmed (only those long enough to be told apart)."""
    forms: list[str] = []
    for secret in secrets:
        if secret is not None:
            value = secret.reveal()
            forms += [form for form in {value, value.strip()} if len(form) >= MIN_SECRET_IN_TEXT]
    return tuple(forms)


def _holds_any(text: str, secrets: tuple[str, ...]) -> bool:
    return any(secret in text for secret in secrets)


def _check_token(name: str, token: Secret) -> None:
    if (problem := token_problem(token)) is not None:
        raise InvalidRegistration("invalid_command", f"{name} {problem}")


def _check_runner_url(url: str, allow_http: bool) -> None:
    schemes = ("https", "http") if allow_http else ("https",)
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in schemes or not parts.hostname or len(url) > MAX_URL:
        wanted = "an http(s)" if allow_http else "an https"
        raise InvalidRegistration("invalid_command", f"runner_url must be {wanted} URL with a host")
    if parts.username or parts.password or any(ch.isspace() or not ch.isprintable() for ch in url):
        raise InvalidRegistration(
            "invalid_command", "runner_url must not carry credentials, spaces or control characters"
        )
    if parts.query or parts.fragment:
        # A repository, organisation or enterprise URL has neither; a query is where a token would hide.
        raise InvalidRegistration("invalid_command", "runner_url must not carry a query or a fragment")


async def supervisor_task(
    config: Config,
    driver: Driver,
    backend: RunnerBackend,
    registrations: trio.MemoryReceiveChannel[machine.Register],
    timings: PhaseTimings,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    *,
    on_bug: BugReport = log_bug,
    identities: Identities | None = None,
) -> None:
    """Carry out each registration the machine hands over (`machine.Register`), in turn; the channel belongs to
    the caller, so that a restart can go on reading. `identities` hands the machine what the job hooks told,
    around a job's start and before its end: its hooks ran before the runner said the job was over."""
    async for handed_over in registrations:
        command, attempt = handed_over.command, handed_over.attempt
        state = driver.state
        if state.phase is not Phase.REGISTERING_RUNNER or state.attempt != attempt:
            # The agent moved on (it is stopping, say) before this one was taken up.
            log.info("Skipping a registration no longer in progress", extra={"command_id": command.id})
            continue
        try:
            await _serve_registration(config, driver, backend, handed_over, timings, now(), on_bug, identities)
        except Exception as exc:
            # A bug: the agent must not stay in RegisteringRunner for a registration nobody carries out.
            on_bug("runner_supervisor", exc)
            error = f"internal error: {type(exc).__name__}: {error_text(exc)}"
            driver.apply(machine.RegistrationAborted(command.id, "internal_error", error, attempt))


async def _serve_registration(
    config: Config,
    driver: Driver,
    backend: RunnerBackend,
    handed_over: machine.Register,
    timings: PhaseTimings,
    now: datetime,
    on_bug: BugReport,
    identities: Identities | None,
) -> None:
    command, attempt = handed_over.command, handed_over.attempt

    def fail(reason: RegistrationFailure, error: str) -> None:
        driver.apply(machine.RegistrationAborted(command.id, reason, redact(error), attempt))

    try:
        registration = registration_from_command(command, config, now, timedelta(seconds=config.clock_skew))
    except InvalidRegistration as exc:
        fail(exc.reason, str(exc))
        return
    with trio.CancelScope() as registering:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_when_abandoned, driver, attempt, registering)
            run = _Run(driver, backend, registration, attempt, timings, fail, on_bug, identities)
            await _configure_and_run(config, run)
            nursery.cancel_scope.cancel()
    if registering.cancelled_caught:
        # Given up on (the runner did not listen in time, the VM is being preempted): nothing of it is kept.
        with trio.CancelScope(shield=True):
            await backend.clean()
    # Whatever the runner did, it is gone: a backend that did not say so must not hold the agent in
    # RegisteringRunner (the machine ignores this unless this registration is still being carried out).
    fail("runner_start_failed", "runner exited before listening for jobs")


class _Run(NamedTuple):
    """One registration being carried out, and what carrying it out reports to."""

    driver: Driver
    backend: RunnerBackend
    registration: Registration
    attempt: int
    timings: PhaseTimings
    fail: Callable[[RegistrationFailure, str], None]
    on_bug: BugReport
    identities: Identities | None


async def _configure_and_run(config: Config, run: _Run) -> None:
    backend, registration = run.backend, run.registration
    command_id = registration.command_id
    # config.sh refuses to run over an existing configuration (a runner that exited, a failed attempt).
    await backend.clean()
    if registration.jit_config is None:
        log.info("Configuring the runner", extra={"command_id": command_id, "runner_name": registration.name})
        try:
            await backend.configure(registration, relay_line)
        except ConfigureFailed as exc:
            run.fail("configure_failed", str(exc))
            await backend.clean()
            return
        run.timings.mark("configured_s")
    log.info("Starting the runner", extra={"command_id": command_id})
    await _run(run, config.listen_timeout)


async def _stop_when_abandoned(driver: Driver, attempt: int, registering: trio.CancelScope) -> None:
    """Stop the registration (`config.sh`, or the runner starting) once the machine gives up on it."""
    state = await driver.wait_for(
        lambda state: state.attempt != attempt or state.run_abandoned is not None or state.phase in machine.OVER
    )
    if state.attempt == attempt and state.run_abandoned is not None:
        registering.cancel()


async def _run(run: _Run, listen_timeout: float) -> None:
    """Run the runner and follow what it does until it is gone.

    Cancelling this stops the runner gracefully, and its last lines and its exit are still followed: reading goes
    on, shielded, until the backend is done with the channel.
    """
    send, receive = trio.open_memory_channel[RunEvent](0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_run_backend, run.backend, run.registration, send, run.fail)
        command_id = run.registration.command_id
        nursery.start_soon(_listen_deadline, run.driver, command_id, run.attempt, listen_timeout)
        with trio.CancelScope(shield=True):
            async with receive:
                async for event in receive:
                    _follow(run, event)
        nursery.cancel_scope.cancel()


async def _run_backend(
    backend: RunnerBackend,
    registration: Registration,
    events: trio.MemorySendChannel[RunEvent],
    fail: Callable[[RegistrationFailure, str], None],
) -> None:
    async with events:  # closed however the run ends, which ends the reading
        try:
            await backend.run(registration, events)
        except ConfigureFailed as exc:
            fail("runner_start_failed", str(exc))


def _follow(run: _Run, event: RunEvent) -> None:
    """Feed one thing the runner did to the machine. A bug here is reported and goes no further, so that it
    cannot stop a runner in the middle of a job."""
    driver, timings = run.driver, run.timings
    try:
        match event:
            case Line(stream=stream, text=text):
                signal = output.interpret(relay_line(stream, text))
                if signal is None:
                    return
                state = driver.state
                registering = state.phase is Phase.REGISTERING_RUNNER and state.run_abandoned is None
                if isinstance(signal, machine.RunnerListening) and registering:
                    timings.mark("listening_s")
                    log.info("Runner is listening for jobs", extra={"timings": timings.snapshot()})
                    signal = machine.RunnerListening(timings=timings.snapshot())
                if isinstance(signal, machine.JobRunning):
                    _identify(run, Identities.job_starting)
                if isinstance(signal, machine.JobDone):
                    _identify(run, Identities.collect)  # what the job's hooks told goes before its end
                driver.apply(signal)
                if isinstance(signal, machine.JobRunning):
                    _identify(run, Identities.job_started)
            case Exited(exit_code=code, killed_processes=killed):
                _identify(run, Identities.collect)
                driver.apply(machine.RunnerGone(code, killed))
            case Started():
                pass  # its pid reaches the state file through the backend's own report
    except Exception as exc:
        run.on_bug("runner_output", exc)


def _identify(run: _Run, step: Callable[[Identities], None]) -> None:
    """Whatever goes wrong with the hooks' hand-overs must not cost the event that follows."""
    if run.identities is None:
        return
    try:
        step(run.identities)
    except Exception as exc:
        run.on_bug("job_identity", exc)


async def _listen_deadline(driver: Driver, command_id: str, attempt: int, limit_s: float) -> None:
    """Tell the machine when the runner has not said `Listening for Jobs` within `limit_s` seconds (it then
    gives the registration up, and `_stop_when_abandoned` stops the runner)."""
    with trio.move_on_after(limit_s) as waiting:
        await driver.wait_for(lambda state: state.phase is not Phase.REGISTERING_RUNNER)
    if not waiting.cancelled_caught:
        return
    driver.apply(machine.ListenTimedOut(command_id, limit_s, attempt))
