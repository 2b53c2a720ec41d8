"""Wire types of the controller API (the seed's and MIGlet's extensions, docs/protocol.md), and their decoders.

Every type tolerates unknown fields, so a controller can add to its answers without breaking agents. Commands
are decoded one at a time from the raw list, so a malformed command is rejected alone and the rest are kept.
"""

from __future__ import annotations

import unicodedata
from datetime import datetime
from typing import Annotated, Final, Literal

import msgspec

from miglet import secret
from miglet.secret import Secret

AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True)]

# ---------------------------------------------------------------------------------------------------------------
# Events: POST /api/v1/vms/{vm_id}/events


class Event(msgspec.Struct, kw_only=True, omit_defaults=True, tag_field="type"):
    """Fields every event carries. The outbox fills the header; the state machine only says what happened."""

    vm_id: Annotated[str, msgspec.Meta(description="The VM's id (MIGLET_VM_ID).")] = ""
    pool_id: Annotated[str, msgspec.Meta(description="The pool's id (MIGLET_POOL_ID).")] = ""
    org_id: Annotated[str, msgspec.Meta(description="The org's id (MIGLET_ORG_ID); absent when not set.")] | None = None
    event_id: Annotated[str, msgspec.Meta(description="Unique per event, the same on every retry: dedupe on it.")] = ""
    timestamp: Annotated[str, msgspec.Meta(description="When the event happened: RFC 3339 UTC, milliseconds.")] = ""


class AgentInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What MIGlet this is."""

    version: str
    capabilities: Annotated[
        list[str],
        msgspec.Meta(
            description="Protocol features this agent supports: long_poll, jit_config, shutdown, remove_token,"
            " heartbeat, job_identity when it installs its job hooks, and preemption when it watches for notices."
        ),
    ]


class HostInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What the VM is; a fact that cannot be read is left out."""

    hostname: str | None = None
    os: Annotated[str, msgspec.Meta(description="PRETTY_NAME from /etc/os-release.")] | None = None
    kernel: str | None = None
    arch: str | None = None
    cpus: int | None = None
    memory_mb: int | None = None
    boot_time: Annotated[str, msgspec.Meta(description="RFC 3339 UTC.")] | None = None


class VmStarted(Event, tag="vm_started"):
    """Seed: the VM is up. Sent until the controller acknowledges it; the answer is an `Acknowledgment`."""

    agent: Annotated[AgentInfo, msgspec.Meta(description="Extension: the agent's version and features.")] | None = None
    host: Annotated[HostInfo, msgspec.Meta(description="Extension: what the VM is.")] | None = None


class RunnerRegistered(Event, tag="runner_registered"):
    """The runner is configured and listening for jobs (the agent is Idle)."""

    runner_name: str
    command_id: Annotated[str, msgspec.Meta(description="The register_runner command that was carried out.")]
    runner_version: (
        Annotated[str, msgspec.Meta(description="As the runner prints it (`Current runner version: '…'`).")] | None
    ) = None
    timings: (
        Annotated[
            dict[str, float],
            msgspec.Meta(
                description="Seconds from process start to each milestone; warmup_s: how long the runner's warmup"
                " ran, when it ran."
            ),
        ]
        | None
    ) = None


# Why a register_runner command was not carried out.
RegistrationFailure = Literal[
    "token_expired", "invalid_command", "configure_failed", "runner_start_failed", "internal_error", "preempted"
]
# Why the runner process ended.
RunnerExit = Literal["job_done", "stopped", "unexpected"]


class RegistrationFailed(Event, tag="registration_failed"):
    """A register_runner command could not be carried out; the agent is Ready for another."""

    command_id: str
    reason: Annotated[RegistrationFailure, msgspec.Meta(description="Why; docs/protocol.md says what each means.")]
    error: Annotated[str, msgspec.Meta(description="What went wrong, for people; secrets masked.")]


class JobStarted(Event, tag="job_started"):
    """The runner took a job (the agent is Busy)."""

    job_name: str


_Value = Annotated[str, msgspec.Meta(max_length=256)]


class GithubContext(msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True):
    """Which workflow run a job belongs to, as the job's own environment told the runner's job hook: advisory, since
    a job can change its environment. Each value is the `GITHUB_*` variable's, control characters removed, secrets
    masked, at most 256 characters; one that was empty or unset is left out."""

    repository: Annotated[_Value, msgspec.Meta(description="GITHUB_REPOSITORY, e.g. octo-org/app.")] | None = None
    workflow: Annotated[_Value, msgspec.Meta(description="GITHUB_WORKFLOW: the workflow's name.")] | None = None
    job: Annotated[_Value, msgspec.Meta(description="GITHUB_JOB: the job's id in the workflow.")] | None = None
    run_id: Annotated[_Value, msgspec.Meta(description="GITHUB_RUN_ID.")] | None = None
    run_number: Annotated[_Value, msgspec.Meta(description="GITHUB_RUN_NUMBER.")] | None = None
    run_attempt: Annotated[_Value, msgspec.Meta(description="GITHUB_RUN_ATTEMPT.")] | None = None
    ref: Annotated[_Value, msgspec.Meta(description="GITHUB_REF.")] | None = None
    sha: Annotated[_Value, msgspec.Meta(description="GITHUB_SHA.")] | None = None
    actor: Annotated[_Value, msgspec.Meta(description="GITHUB_ACTOR.")] | None = None
    event_name: Annotated[_Value, msgspec.Meta(description="GITHUB_EVENT_NAME.")] | None = None
    server_url: Annotated[_Value, msgspec.Meta(description="GITHUB_SERVER_URL.")] | None = None


class JobIdentified(Event, tag="job_identified"):
    """The runner's job-started hook said which workflow run the job belongs to (after `job_started`)."""

    job_name: str
    github: GithubContext


class JobCompleted(Event, tag="job_completed"):
    """The runner finished its job."""

    job_name: str
    result: Annotated[str, msgspec.Meta(description="As the runner says it, e.g. Succeeded, Failed, Canceled.")]
    github: (
        Annotated[GithubContext, msgspec.Meta(description="The job's workflow run, when its hook told it.")] | None
    ) = None


class RunnerExited(Event, tag="runner_exited"):
    """The runner process ended."""

    exit_code: int
    reason: Annotated[
        RunnerExit,
        msgspec.Meta(
            description="job_done (ephemeral runner after its job), stopped (the agent stopped it), or unexpected"
        ),
    ]
    killed_processes: (
        Annotated[
            int,
            msgspec.Meta(
                ge=0,
                description="How many processes the runner left behind, which the agent killed once it had exited:"
                " 0 when it left none. Absent when the agent cannot tell.",
            ),
        ]
        | None
    ) = None


class CommandFailed(Event, tag="command_failed"):
    """A command was not carried out: unknown type, malformed, or not possible in the current state."""

    command_id: str
    command_type: Annotated[str, msgspec.Meta(description="The command's `type` as sent (may be unknown).")]
    error: str


class Heartbeat(Event, tag="heartbeat"):
    """The agent is alive: every MIGLET_HEARTBEAT_INTERVAL seconds from acknowledgment until stopping."""

    state: Annotated[str, msgspec.Meta(description="The agent's phase: Ready | RegisteringRunner | Idle | Busy.")]
    uptime_s: Annotated[float, msgspec.Meta(description="Seconds since the agent started.")]
    events_dropped: (
        Annotated[
            dict[str, int],
            msgspec.Meta(
                description="Events dropped so far because the outbox was full, by type (absent when none was)."
            ),
        ]
        | None
    ) = None


class InternalError(Event, tag="internal_error"):
    """A task of the agent failed with a bug; it is restarted, and a job in progress is left alone."""

    task: Annotated[str, msgspec.Meta(description="Which task failed, e.g. poller, outbox, runner_output.")]
    error_class: Annotated[str, msgspec.Meta(description="The exception's class, e.g. KeyError.")]
    error: Annotated[str, msgspec.Meta(description="The exception's message; secrets masked.")]


# The clouds whose notices MIGlet watches (MIGLET_PREEMPTION).
Provider = Literal["aws", "gcp", "azure"]


class VmPreempted(Event, tag="vm_preempted"):
    """The cloud gave notice that it will take the VM back (or stop it for maintenance); once per notice, ahead of
    every other event owed."""

    provider: Annotated[Provider, msgspec.Meta(description="MIGLET_PREEMPTION.")]
    action: Annotated[
        str,
        msgspec.Meta(
            description="The cloud's word for it: terminate, stop, hibernate or autoscaling-terminated (aws);"
            " preempted or TERMINATE_ON_HOST_MAINTENANCE (gcp); Preempt, Terminate, Reboot or Redeploy (azure)."
        ),
    ]
    deadline: Annotated[
        str | None, msgspec.Meta(description="When the VM goes: RFC 3339 UTC; null when the cloud gives no time.")
    ]
    phase: Annotated[str, msgspec.Meta(description="The agent's phase when the notice came.")]
    job_name: Annotated[str, msgspec.Meta(description="The job running when the notice came (Busy).")] | None = None


class VmStopping(Event, tag="vm_stopping"):
    """The agent is stopping: the VM can be recycled once the runner has exited."""

    reason: Annotated[
        str,
        msgspec.Meta(
            description="Why: a shutdown command's reason, signal, ack_timeout, registration_timeout, idle_timeout,"
            " 'ephemeral runner finished its job', preempted, or internal_error."
        ),
    ]
    runner_name: str


AnyEvent = (
    VmStarted
    | RunnerRegistered
    | RegistrationFailed
    | JobStarted
    | JobIdentified
    | JobCompleted
    | RunnerExited
    | CommandFailed
    | Heartbeat
    | InternalError
    | VmPreempted
    | VmStopping
)

# What the controller must hear however long it takes: retried until delivered, dropped only when the controller
# says the event itself is wrong, and the last to go when the outbox is full.
LIFECYCLE_EVENTS: Final = (
    RegistrationFailed,
    RunnerRegistered,
    JobStarted,
    JobIdentified,
    JobCompleted,
    RunnerExited,
    VmPreempted,
    VmStopping,
    CommandFailed,
)


class Acknowledgment(msgspec.Struct):
    """The controller's answer to `vm_started` (seed: no registration token any more)."""

    status: str | None = None
    acknowledged: bool | None = None
    vm_id: str | None = None
    pool_id: str | None = None
    org_id: str | None = None
    message: str | None = None

    @property
    def is_acknowledged(self) -> bool:
        # The seed sends both fields; an explicit `acknowledged` wins, `status` alone also counts.
        if self.acknowledged is not None:
            return self.acknowledged
        return self.status == "acknowledged"


# ---------------------------------------------------------------------------------------------------------------
# Commands: GET /api/v1/vms/{vm_id}/commands


class RegisterRunnerParameters(msgspec.Struct, kw_only=True):
    """Seed. `registration_token` (configure, then run) or `jit_config` (run directly) must be given."""

    runner_url: str
    registration_token: Secret | None = None
    jit_config: Secret | None = None
    runner_group: str = "default"
    labels: list[str] = []
    expires_at: AwareDatetime | None = None


class RegisterRunner(msgspec.Struct, kw_only=True, tag="register_runner", tag_field="type"):
    """Seed: configure and start the runner. Accepted in Ready; otherwise reported as `command_failed`."""

    id: str
    parameters: RegisterRunnerParameters
    created_at: AwareDatetime | None = None


class ShutdownParameters(msgspec.Struct, kw_only=True):
    reason: str = "shutdown command"
    grace_period_s: (
        Annotated[float, msgspec.Meta(ge=0, le=86400, description="Overrides MIGLET_SHUTDOWN_GRACE.")] | None
    ) = None
    remove_token: Secret | None = None


class Shutdown(msgspec.Struct, kw_only=True, tag="shutdown", tag_field="type"):
    """Stop the runner (gracefully), deregister it when `remove_token` is given, and end the agent."""

    id: str
    parameters: ShutdownParameters = msgspec.field(default_factory=ShutdownParameters)
    created_at: AwareDatetime | None = None


MIN_TOKEN_LENGTH: Final = 8
# Control characters (Cc), invisible format characters such as bidirectional overrides (Cf), line and paragraph
# separators (Zl, Zp) and lone surrogates (Cs): in a token they would let a line break hide it from masking, and
# in a label or runner group, hide or forge text wherever it is shown.
_UNPRINTABLE_CATEGORIES: Final = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def unprintable_character(text: str) -> str | None:
    """The first control, format or separator character in `text`, as U+XXXX; None when there is none."""
    if text.isprintable():  # the usual case, checked at C speed
        return None
    for character in text:
        if unicodedata.category(character) in _UNPRINTABLE_CATEGORIES:
            return f"U+{ord(character):04X}"
    return None


def printable(text: str) -> str:
    """`text` without the characters `str.isprintable` refuses: controls, format and separator characters but the
    space, unassigned ones."""
    if text.isprintable():  # the usual case, checked at C speed
        return text
    return "".join(character for character in text if character.isprintable())


def token_problem(token: Secret) -> str | None:
    """Why `token` (a registration token, JIT config or remove token) cannot be used, without quoting it; None
    when it can. White space around it is allowed: it is masked both with and without."""
    value = token.reveal().strip()
    if len(value) < MIN_TOKEN_LENGTH:
        return f"must have at least {MIN_TOKEN_LENGTH} characters besides white space around it"
    if (character := unprintable_character(value)) is not None:
        return f"must not contain control or format characters ({character})"
    return None


Command = RegisterRunner | Shutdown
KNOWN_COMMAND_TYPES: Final = frozenset({"register_runner", "shutdown"})


class CommandHeader(msgspec.Struct):
    """Just enough of any command to name it in a report when the rest cannot be used.

    Kept raw, so that one unusable field (not a string, not UTF-8) does not cost the other.
    """

    id: msgspec.Raw = msgspec.Raw(b"null")
    type: msgspec.Raw = msgspec.Raw(b"null")


class RejectedCommand(msgspec.Struct, frozen=True):
    id: str | None
    type: str | None
    error: str


class CommandsEnvelope(msgspec.Struct):
    """Seed: the answer to a poll. Each command is decoded on its own; a malformed one is skipped."""

    commands: list[msgspec.Raw] | None = None
    vm_id: str | None = None


class CommandBatch(msgspec.Struct, frozen=True):
    commands: list[Command]
    rejected: list[RejectedCommand]


class ProtocolError(Exception):
    """A controller answer that cannot be used at all."""


_ack_decoder: Final = msgspec.json.Decoder(Acknowledgment)
_envelope_decoder: Final = msgspec.json.Decoder(CommandsEnvelope)
_command_decoder: Final = msgspec.json.Decoder(Command, dec_hook=secret.dec_hook)
_header_decoder: Final = msgspec.json.Decoder(CommandHeader)
_encoder: Final = msgspec.json.Encoder()


def encode_event(event: AnyEvent) -> bytes:
    """The event as the controller receives it, every known secret masked in every string it carries but the
    header's.

    The one door to the wire: whoever made the event, and whatever its strings came from (a job's name is
    chosen by a workflow's author, an error may quote the runner), nothing passes unmasked.
    """
    return _encoder.encode(_masked_event(event))


# The header's fields come from the configuration (checked identifiers) and from MIGlet itself: nothing to mask.
_HEADER_FIELDS: Final = frozenset({"vm_id", "pool_id", "org_id", "event_id", "timestamp"})


def _masked_event(event: AnyEvent) -> AnyEvent:
    changes: dict[str, object] = {}
    for name in event.__struct_fields__:
        if name in _HEADER_FIELDS:
            continue
        value = getattr(event, name)
        masked = _masked(value)
        if masked is not value:
            changes[name] = masked
    # Most events carry no secret: they are encoded as they are, without a copy.
    return msgspec.structs.replace(event, **changes) if changes else event


def _masked(value: object) -> object:
    """`value` itself when it holds no secret, else a masked copy."""
    if isinstance(value, str):
        masked = secret.redact(value)
        return value if masked == value else masked
    if isinstance(value, dict):
        items = {_masked(key): _masked(item) for key, item in value.items()}
        return value if items == value else items
    if isinstance(value, list | tuple):
        elements = [_masked(item) for item in value]
        return value if elements == list(value) else elements
    if isinstance(value, msgspec.Struct):
        replaced: dict[str, object] = {}
        for name in value.__struct_fields__:
            member = getattr(value, name)
            if (masked_member := _masked(member)) is not member:
                replaced[name] = masked_member
        return msgspec.structs.replace(value, **replaced) if replaced else value
    return value


# Everything msgspec raises for bad input: strings are checked for UTF-8 only when decoded (UnicodeDecodeError),
# and every level of nesting goes through the interpreter's recursion guard (RecursionError), which stops a
# deeply nested answer long before the stack is at risk. Catching these is what makes the decoders total.
_text_decoder: Final = msgspec.json.Decoder(str)
_DECODE_ERRORS: Final = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


def decode_acknowledgment(body: bytes) -> Acknowledgment:
    try:
        return _ack_decoder.decode(body)
    except _DECODE_ERRORS as exc:
        raise ProtocolError(f"unusable acknowledgment: {_reason(exc)}") from None


def decode_commands(body: bytes) -> CommandBatch:
    """Decode a commands response, keeping every well-formed command and a reason for each rejected one."""
    try:
        envelope = _envelope_decoder.decode(body)
    except _DECODE_ERRORS as exc:
        raise ProtocolError(f"unusable commands response: {_reason(exc)}") from None
    commands: list[Command] = []
    rejected: list[RejectedCommand] = []
    for raw in envelope.commands or ():
        try:
            commands.append(_command_decoder.decode(raw))
        except _DECODE_ERRORS as exc:
            rejected.append(_rejection(raw, exc))
    return CommandBatch(commands, rejected)


def _reason(exc: Exception) -> str:
    """Why a body could not be decoded, without quoting it."""
    if isinstance(exc, UnicodeDecodeError):
        return "a string is not valid UTF-8"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    # msgspec's message names the path of the bad field, never its value.
    return secret.redact(str(exc))


def _rejection(raw: msgspec.Raw, exc: Exception) -> RejectedCommand:
    try:
        header = _header_decoder.decode(raw)
    except _DECODE_ERRORS:
        header = CommandHeader()
    command_id, command_type = _text(header.id), _text(header.type)
    if command_type is not None and command_type not in KNOWN_COMMAND_TYPES:
        # Masked before repr(), whose escaping could hide a secret from the mask.
        return RejectedCommand(command_id, command_type, f"unknown command type {secret.redact(command_type)!r}")
    return RejectedCommand(command_id, command_type, f"malformed command: {_reason(exc)}")


def _text(raw: msgspec.Raw) -> str | None:
    """A raw JSON value as a string, or None when it is anything else."""
    try:
        return _text_decoder.decode(raw)
    except _DECODE_ERRORS:
        return None
