"""Logging: JSON lines for log shippers, readable text for a terminal, secrets masked in both.

Records carry their structured fields as `extra=`; the agent's identity and current state come from a context
variable set once per agent, so that many agents in one process (tests, benchmarks) each log as themselves.
Every part of a line (message, fields, traceback) passes through `secret.redact` before it is encoded: the one
place where log masking happens, early enough that no escaping can hide a secret from it. After masking, both
formats escape what could break a line (or drive a terminal), so that no value can forge a record: one record
is one line, plus, in text, a traceback whose every line is indented.
"""

from __future__ import annotations

import contextvars
import logging
import re
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


# What JSON leaves unescaped but readers may take for a line break (U+0085, U+2028, U+2029) or a terminal may
# obey (DEL and the C1 controls, such as U+009B, an escape sequence's start): as UTF-8 bytes, which only ever
# occur inside a JSON string.
_JSON_UNSAFE: Final = re.compile(rb"\x7f|\xc2[\x80-\x9f]|\xe2\x80[\xa8\xa9]")


def _json_escape(match: re.Match[bytes]) -> bytes:
    return b"\\u%04x" % ord(match[0].decode())


def _without_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode()
    if isinstance(value, dict):
        return {key: _without_surrogates(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_surrogates(item) for item in value]
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, vm_id, pool_id, state, then the record's fields."""

    _encoder = msgspec.json.Encoder()

    def _encode(self, line: dict[str, Any]) -> str:
        try:
            encoded = self._encoder.encode(line)
        except UnicodeEncodeError:
            # A lone surrogate (a file name or setting that was not UTF-8) cannot be encoded: keep the record.
            encoded = self._encoder.encode(_without_surrogates(line))
        return _JSON_UNSAFE.sub(_json_escape, encoded).decode()

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
        return self._encode(line)


_ESCAPES: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Starts every line of a traceback in text: no record line starts so, so none can be forged inside one.
TRACEBACK_INDENT: Final = "  | "


def _escaped(character: str) -> str:
    if character.isprintable():
        return character
    if character in _ESCAPES:
        return _ESCAPES[character]
    code = ord(character)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escape(text: str) -> str:
    """`text` with every character that is not printable (line breaks, control, format and separator characters)
    written as a Python escape, so that it stays on one line and cannot drive a terminal."""
    if text.isprintable():  # the usual case, checked at C speed
        return text
    return "".join(map(_escaped, text))


def _quoted(text: str) -> str:
    """A field's value as `key=value` shows it: quoted when it holds a space, `=` or `"`, so that no value can
    pass for a field of its own (`command_id=c1 error=none`)."""
    if text and not any(character in text for character in ' ="'):
        return text
    return '"' + text.replace('"', '\\"') + '"'


class TextFormatter(logging.Formatter):
    """`ts LEVEL [State] message key=value ...` for people reading a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        context = agent_context.get()
        state = f" [{escape(context.state())}]" if context is not None else ""
        fields = "".join(f" {escape(key)}={_quoted(escape(str(value)))}" for key, value in _fields(record).items())
        text = f"{_timestamp(record)} {record.levelname:<7}{state} {escape(redact(record.getMessage()))}{fields}"
        if record.exc_info:
            # Only the traceback's own line breaks (its structure) are kept; any other is escaped.
            for line in redact(self.formatException(record.exc_info)).split("\n"):
                text += "\n" + TRACEBACK_INDENT + escape(line)
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
