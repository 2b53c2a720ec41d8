"""Logging: JSON lines for log shippers, readable text for a terminal, secrets masked in both.

Records carry their structured fields as `extra=`; the agent's identity and current state come from a context
variable set once per agent, so that many agents in one process (tests, benchmarks) each log as themselves.
Every part of a line (message, fields, traceback) passes through `secret.redact` before it is encoded: the one
place where log masking happens, early enough that no escaping can hide a secret from it.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final, TextIO

import msgspec

from miglet.secret import redact

_STANDARD_ATTRS: Final = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class AgentContext(msgspec.Struct, frozen=True):
    vm_id: str
    pool_id: str
    state: Callable[[], str]


agent_context: contextvars.ContextVar[AgentContext | None] = contextvars.ContextVar(
    "miglet_agent_context", default=None
)


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {key: _masked(value) for key, value in record.__dict__.items() if key not in _STANDARD_ATTRS}


def _masked(value: Any) -> Any:
    """`value` with every known secret masked, before any encoding could escape a secret out of sight."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bool | int | float) or value is None:
        return value
    if isinstance(value, dict):
        return {str(key): _masked(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(item) for item in value]
    return redact(str(value))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, vm_id, pool_id, state, then the record's fields."""

    _encoder = msgspec.json.Encoder()

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        context = agent_context.get()
        if context is not None:
            line.update(vm_id=context.vm_id, pool_id=context.pool_id, state=context.state())
        for key, value in _fields(record).items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exc"] = redact(self.formatException(record.exc_info))
        return self._encoder.encode(line).decode()


class TextFormatter(logging.Formatter):
    """`ts LEVEL [State] message key=value ...` for people reading a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        context = agent_context.get()
        state = f" [{context.state()}]" if context is not None else ""
        fields = "".join(f" {key}={value}" for key, value in _fields(record).items())
        text = f"{_timestamp(record)} {record.levelname:<7}{state} {redact(record.getMessage())}{fields}"
        if record.exc_info:
            text += "\n" + redact(self.formatException(record.exc_info))
        return text


def configure_logging(fmt: str, level: str, stream: TextIO | None = None) -> None:
    """Send the `miglet` loggers to `stream` (stderr) in the chosen format."""
    stream = stream if stream is not None else sys.stderr
    if fmt == "auto":
        fmt = "text" if stream.isatty() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("miglet")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
