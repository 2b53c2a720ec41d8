"""Log formats: JSON lines with the agent's context and the record's fields, readable text, secrets masked, and
no record that a value could split or forge.

Rules: records go through the real handler set up by `configure_logging` into a StringIO; a line is what
`str.splitlines` says it is (it splits on every Unicode line boundary, as some log readers do).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import msgspec
import pytest

from miglet.logs import TRACEBACK_INDENT, AgentContext, agent_context, configure_logging, escape
from miglet.secret import Secret

log = logging.getLogger("miglet.test")


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    buffer = io.StringIO()
    token = agent_context.set(AgentContext("vm-123", "pool-001", lambda: "Ready"))
    yield buffer
    agent_context.reset(token)
    logging.getLogger("miglet").handlers.clear()


def test_json_lines_carry_context_and_fields(stream: io.StringIO) -> None:
    configure_logging("json", "info", stream)
    log.info("State changed", extra={"from": "WaitingForController", "to": "Ready"})
    log.debug("not shown at info")
    [line] = stream.getvalue().splitlines()
    record = msgspec.json.decode(line)
    assert record["msg"] == "State changed"
    assert record["level"] == "info"
    assert (record["vm_id"], record["pool_id"], record["state"]) == ("vm-123", "pool-001", "Ready")
    assert (record["from"], record["to"]) == ("WaitingForController", "Ready")
    assert record["ts"].endswith("Z")


def test_text_format(stream: io.StringIO) -> None:
    configure_logging("text", "debug", stream)
    log.warning("Command poll failed; will retry", extra={"attempt": 2})
    line = stream.getvalue().strip()
    assert line.endswith("WARNING [Ready] Command poll failed; will retry attempt=2")


def test_auto_picks_json_when_not_a_terminal(stream: io.StringIO) -> None:
    configure_logging("auto", "info", stream)
    log.info("hello")
    assert msgspec.json.decode(stream.getvalue())["msg"] == "hello"


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_secrets_are_masked_in_messages_fields_and_tracebacks(stream: io.StringIO, fmt: str) -> None:
    secret = Secret("AHTSECRETTOKEN000000000001")
    configure_logging(fmt, "info", stream)
    log.info("runner said: token is %s", secret.reveal(), extra={"echo": secret.reveal(), "obj": secret})
    try:
        raise ValueError(f"bad token {secret.reveal()}")
    except ValueError:
        log.exception("failed")
    output = stream.getvalue()
    assert "AHTSECRETTOKEN000000000001" not in output
    assert output.count("***") >= 4


# Each could end a line, start a new one, or drive a terminal, if written as it is.
FORGING = ["\n", "\r", "\r\n", "\x1b[2K\r", "\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x9b2K", "\x7f"]
FORGED = "2024-01-15T10:30:00.000Z CRITICAL [Ready] forged"


@pytest.mark.parametrize("breaker", FORGING)
def test_text_values_and_messages_cannot_forge_a_line(stream: io.StringIO, breaker: str) -> None:
    configure_logging("text", "info", stream)
    command_id = f"cmd-1{breaker}{FORGED}"
    log.info("Received %s", command_id, extra={"command_id": command_id})
    output = stream.getvalue()
    [line] = output.splitlines()
    assert output == line + "\n"
    assert line.isprintable()
    assert line.endswith(f'[Ready] Received cmd-1{escape(breaker)}{FORGED} command_id="cmd-1{escape(breaker)}{FORGED}"')


def test_text_tracebacks_keep_their_lines_but_cannot_forge_one(stream: io.StringIO) -> None:
    configure_logging("text", "info", stream)
    try:
        raise ValueError(f"bad command\n{FORGED}\u2028{FORGED}")
    except ValueError:
        log.exception("Command failed")
    first, *traceback = stream.getvalue().splitlines()
    assert first.endswith("ERROR   [Ready] Command failed")
    assert traceback[0] == TRACEBACK_INDENT + "Traceback (most recent call last):"
    assert traceback[-2:] == [
        TRACEBACK_INDENT + "ValueError: bad command",
        TRACEBACK_INDENT + FORGED + "\\u2028" + FORGED,
    ]
    assert all(line.startswith(TRACEBACK_INDENT) for line in traceback)


@pytest.mark.parametrize("breaker", FORGING)
def test_json_records_stay_one_line_whatever_their_values_hold(stream: io.StringIO, breaker: str) -> None:
    configure_logging("json", "info", stream)
    command_id = f"cmd-1{breaker}{FORGED}"
    log.info("Received %s", command_id, extra={"command_id": command_id})
    [line] = stream.getvalue().splitlines()
    assert line.isprintable()
    record = msgspec.json.decode(line)
    assert (record["msg"], record["command_id"]) == (f"Received {command_id}", command_id)


def test_json_keeps_a_record_whose_text_is_not_valid_unicode(stream: io.StringIO) -> None:
    configure_logging("json", "info", stream)
    log.info("Cannot read the runner directory", extra={"path": "/opt/runner-\udcff"})
    [line] = stream.getvalue().splitlines()
    assert msgspec.json.decode(line)["path"] == "/opt/runner-\\udcff"


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_secrets_are_masked_before_they_are_escaped(stream: io.StringIO, fmt: str) -> None:
    secret = Secret("tab\tseparated-secret-0001")
    configure_logging(fmt, "info", stream)
    log.info("echo %s", secret.reveal(), extra={"echo": secret.reveal()})
    output = stream.getvalue()
    assert "separated-secret-0001" not in output
    assert output.count("***") == 2


def test_a_text_value_cannot_pass_for_a_field_of_its_own(stream: io.StringIO) -> None:
    configure_logging("text", "info", stream)
    log.warning("Rejected", extra={"command_id": "c1 error=none", "n": 3})
    line = stream.getvalue().strip()
    assert line.endswith('Rejected command_id="c1 error=none" n=3')
