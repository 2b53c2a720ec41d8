"""Log formats: JSON lines with the agent's context and the record's fields, readable text, secrets masked.

Rules: records go through the real handler set up by `configure_logging` into a StringIO.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import msgspec
import pytest

from miglet.logs import AgentContext, agent_context, configure_logging
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
