"""Wire types of the controller API (seed plus SPEC section 3), and their decoders.

Every type tolerates unknown fields, so a controller can add to its answers without breaking agents. Commands
are decoded one at a time from the raw list, so a malformed command is rejected alone and the rest are kept.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final

import msgspec

from miglet import secret
from miglet.secret import Secret

AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True)]

# ---------------------------------------------------------------------------------------------------------------
# Events: POST /api/v1/vms/{vm_id}/events


class Event(msgspec.Struct, kw_only=True, omit_defaults=True, tag_field="type"):
    """Fields every event carries. The outbox fills the header; the state machine only says what happened."""

    vm_id: str = ""
    pool_id: str = ""
    org_id: str | None = None
    event_id: str = ""
    timestamp: str = ""


class VmStarted(Event, tag="vm_started"):
    pass


class RunnerRegistered(Event, tag="runner_registered"):
    runner_name: str
    command_id: str
    timings: dict[str, float] | None = None


class RegistrationFailed(Event, tag="registration_failed"):
    command_id: str
    reason: str
    error: str


class JobStarted(Event, tag="job_started"):
    job_name: str


class JobCompleted(Event, tag="job_completed"):
    job_name: str
    result: str


class RunnerExited(Event, tag="runner_exited"):
    exit_code: int
    reason: str


class CommandFailed(Event, tag="command_failed"):
    command_id: str
    command_type: str
    error: str


class Heartbeat(Event, tag="heartbeat"):
    state: str
    uptime_s: float


class VmStopping(Event, tag="vm_stopping"):
    reason: str
    runner_name: str


AnyEvent = (
    VmStarted
    | RunnerRegistered
    | RegistrationFailed
    | JobStarted
    | JobCompleted
    | RunnerExited
    | CommandFailed
    | Heartbeat
    | VmStopping
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
    runner_url: str
    registration_token: Secret | None = None
    jit_config: Secret | None = None
    runner_group: str = "default"
    labels: list[str] = []
    expires_at: AwareDatetime | None = None


class RegisterRunner(msgspec.Struct, kw_only=True, tag="register_runner", tag_field="type"):
    id: str
    parameters: RegisterRunnerParameters
    created_at: AwareDatetime | None = None


class ShutdownParameters(msgspec.Struct, kw_only=True):
    reason: str = "shutdown command"
    grace_period_s: Annotated[float, msgspec.Meta(ge=0, le=86400)] | None = None
    remove_token: Secret | None = None


class Shutdown(msgspec.Struct, kw_only=True, tag="shutdown", tag_field="type"):
    id: str
    parameters: ShutdownParameters = msgspec.field(default_factory=ShutdownParameters)
    created_at: AwareDatetime | None = None


Command = RegisterRunner | Shutdown
KNOWN_COMMAND_TYPES: Final = frozenset({"register_runner", "shutdown"})


class CommandHeader(msgspec.Struct):
    """Just enough of any command to name it in a report when the rest cannot be used."""

    id: Any = None
    type: Any = None


class RejectedCommand(msgspec.Struct, frozen=True):
    id: str | None
    type: str | None
    error: str


class CommandsEnvelope(msgspec.Struct):
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
    return _encoder.encode(event)


def decode_acknowledgment(body: bytes) -> Acknowledgment:
    try:
        return _ack_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"unusable acknowledgment: {exc}") from None


def decode_commands(body: bytes) -> CommandBatch:
    """Decode a commands response, keeping every well-formed command and a reason for each rejected one."""
    try:
        envelope = _envelope_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"unusable commands response: {exc}") from None
    commands: list[Command] = []
    rejected: list[RejectedCommand] = []
    for raw in envelope.commands or ():
        try:
            commands.append(_command_decoder.decode(raw))
        except msgspec.DecodeError as exc:
            rejected.append(_rejection(raw, exc))
    return CommandBatch(commands, rejected)


def _rejection(raw: msgspec.Raw, exc: msgspec.DecodeError) -> RejectedCommand:
    try:
        header = _header_decoder.decode(raw)
    except msgspec.DecodeError:
        header = CommandHeader()
    command_id = header.id if isinstance(header.id, str) else None
    command_type = header.type if isinstance(header.type, str) else None
    if command_type is not None and command_type not in KNOWN_COMMAND_TYPES:
        return RejectedCommand(command_id, command_type, f"unknown command type {command_type!r}")
    # msgspec's message names the path of the bad field, never its value.
    return RejectedCommand(command_id, command_type, f"malformed command: {secret.redact(str(exc))}")
