"""The runner-supervisor task: turns each accepted `register_runner` command into a running runner.

It receives commands the poller has already accepted (the machine moved to RegisteringRunner), checks them,
configures the runner, starts it, and feeds what the runner prints back to the machine until the runner exits.
Cancelling it stops the runner gracefully; that is how the agent stops. A bug met while following the runner's
output is reported and the line skipped, so that it never costs the job the runner is running.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Final
from urllib.parse import urlsplit

import trio

from miglet import machine
from miglet.config import Config
from miglet.machine import Phase
from miglet.protocol import RegisterRunner, RegistrationFailure, token_problem, unprintable_character
from miglet.runner import output
from miglet.runner.backend import ConfigureFailed, Registration, RunnerBackend
from miglet.runner.output import relay_line
from miglet.secret import Secret, redact
from miglet.state import StateHolder
from miglet.supervision import BugReport, error_text, log_bug
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
    holder: StateHolder,
    backend: RunnerBackend,
    commands: trio.MemoryReceiveChannel[RegisterRunner],
    timings: PhaseTimings,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    *,
    on_bug: BugReport = log_bug,
) -> None:
    """Serve each registration in turn; the channel belongs to the caller, so that a restart can go on reading."""
    async for command in commands:
        try:
            await _serve_registration(config, holder, backend, command, timings, now(), on_bug)
        except Exception as exc:
            # A bug: the agent must not stay in RegisteringRunner for a registration nobody carries out.
            on_bug("runner_supervisor", exc)
            error = f"internal error: {type(exc).__name__}: {error_text(exc)}"
            holder.apply(machine.RegistrationAborted(command.id, "internal_error", error))


async def _serve_registration(
    config: Config,
    holder: StateHolder,
    backend: RunnerBackend,
    command: RegisterRunner,
    timings: PhaseTimings,
    now: datetime,
    on_bug: BugReport,
) -> None:
    def fail(reason: RegistrationFailure, error: str) -> None:
        log.error("Runner registration failed", extra={"command_id": command.id, "reason": reason, "error": error})
        holder.apply(machine.RegistrationAborted(command.id, reason, redact(error)))

    try:
        registration = registration_from_command(command, config, now, timedelta(seconds=config.clock_skew))
    except InvalidRegistration as exc:
        fail(exc.reason, str(exc))
        return
    # config.sh refuses to run over an existing configuration (a runner that exited, a failed attempt).
    await backend.clean()
    if registration.jit_config is None:
        log.info("Configuring the runner", extra={"command_id": command.id, "runner_name": registration.name})
        try:
            await backend.configure(registration, relay_line)
        except ConfigureFailed as exc:
            fail("configure_failed", str(exc))
            await backend.clean()
            return
        timings.mark("configured_s")
    log.info("Starting the runner", extra={"command_id": command.id})
    watch = _RunWatch(holder, timings, fail, on_bug)
    with trio.CancelScope() as run_scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_listen_deadline, holder, config.listen_timeout, run_scope, watch)
            try:
                await backend.run(registration, watch)
            except ConfigureFailed as exc:
                fail("runner_start_failed", str(exc))
                return
            nursery.cancel_scope.cancel()
    if run_scope.cancelled_caught:
        fail("runner_start_failed", f"runner did not listen for jobs within {config.listen_timeout:g} s")


class _RunWatch:
    """Feeds what one run of the runner does to the machine.

    Its methods are called from the runner's own process handling: a bug in one is reported and goes no further,
    so that it cannot stop a runner in the middle of a job.
    """

    def __init__(
        self,
        holder: StateHolder,
        timings: PhaseTimings,
        fail: Callable[[RegistrationFailure, str], None],
        on_bug: BugReport,
    ) -> None:
        self._holder = holder
        self._timings = timings
        self._fail = fail
        self._on_bug = on_bug
        # Set when the listen deadline gave up on this run: whatever it prints from then on changes nothing.
        self.muted = False

    def line(self, stream: str, text: str) -> None:
        try:
            self._line(stream, text)
        except Exception as exc:
            self._on_bug("runner_output", exc)

    def _line(self, stream: str, text: str) -> None:
        signal = output.interpret(relay_line(stream, text))
        if signal is None or self.muted:
            return
        if isinstance(signal, machine.RunnerListening) and self._holder.phase is Phase.REGISTERING_RUNNER:
            self._timings.mark("listening_s")
            log.info("Runner is listening for jobs", extra={"timings": self._timings.snapshot()})
            signal = machine.RunnerListening(timings=self._timings.snapshot())
        self._holder.apply(signal)

    def started(self, pid: int | None) -> None:
        """The runner process's pid reaches the state file through the backend's own report (`on_pid`)."""

    def exited(self, exit_code: int, killed_processes: int | None = None) -> None:
        """Called when the runner is gone, also while the agent stops (the supervisor is being cancelled)."""
        try:
            self._exited(exit_code, killed_processes)
        except Exception as exc:
            self._on_bug("runner_output", exc)

    def _exited(self, exit_code: int, killed_processes: int | None) -> None:
        log.info("Runner exited", extra={"exit_code": exit_code, "killed_processes": killed_processes})
        if self.muted:
            return
        if self._holder.phase is Phase.REGISTERING_RUNNER:
            self._fail("runner_start_failed", f"runner exited with code {exit_code} before listening for jobs")
        else:
            self._holder.apply(machine.RunnerGone(exit_code, killed_processes))


async def _listen_deadline(holder: StateHolder, limit_s: float, run_scope: trio.CancelScope, watch: _RunWatch) -> None:
    """Stop a runner that has not said `Listening for Jobs` within `limit_s` seconds."""
    with trio.move_on_after(limit_s) as scope:
        await holder.value.wait_value(lambda state: state.phase is not Phase.REGISTERING_RUNNER)
    if not scope.cancelled_caught:
        return
    log.error("The runner did not start listening for jobs in time; stopping it", extra={"timeout_s": limit_s})
    watch.muted = True
    run_scope.cancel()
