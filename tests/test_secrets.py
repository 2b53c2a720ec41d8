"""Secrets never leave: a whole run, with every secret in play, and every byte MIGlet wrote searched for them.

Rules: the agent runs in-process against the fake controller with a simulated runner that echoes what it was
given (as a misbehaving runner might); logs are captured at debug level in both formats. The masking itself is
tested on `redact` directly; the secrets registered are shared by the whole process, so each test uses its own.
"""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import msgspec
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from fake_controller import FakeController, Settings
from fake_controller.fake_runner.behaviour import Job
from fake_controller.simulated_runner import SimulatedRunner
from miglet import secret
from miglet.app import Agent
from miglet.config import Config
from miglet.logs import configure_logging
from miglet.machine import JobRunning, Phase
from miglet.runner.backend import ConfigureFailed, Line, LineSink, Registration, RunEvent
from miglet.runner.output import clean, interpret
from miglet.secret import RECENT_KEPT, Secret, redact, redact_partial
from tests.agents import ConfigFactory

CONTROLLER_TOKEN = "ctl-0123456789-controller-token"
REJECTED_TOKEN = "AHTREJECTEDTOKEN0000000001"
JIT_CONFIG = "eyJqaXQiOiAic2VjcmV0LWppdC1jb25maWcifQ=="
REMOVE_TOKEN = "AHTREMOVETOKEN00000000001"


class LeakyRunner(SimulatedRunner):
    """Prints the secrets it receives, and fails with them in its error, to prove MIGlet masks them."""

    async def configure(self, registration: Registration, on_line: LineSink) -> None:
        if registration.token is not None:
            on_line("stdout", f"configuring with token {registration.token.reveal()}")
        await super().configure(registration, on_line)

    async def run(self, registration: Registration, events: trio.MemorySendChannel[RunEvent]) -> None:
        if registration.jit_config is not None:
            await events.send(Line("stderr", f"jit: {registration.jit_config.reveal()}"))
        await super().run(registration, events)

    async def remove(self, token: Secret, on_line: LineSink) -> None:
        on_line("stdout", f"removing with {token.reveal()}")
        await super().remove(token, on_line)


@pytest.mark.parametrize("fmt", ["json", "text"])
async def test_no_secret_in_logs_state_file_or_events(
    make_config: ConfigFactory, tmp_path: Path, fmt: str, autojump_clock: trio.testing.MockClock
) -> None:
    stream = io.StringIO()
    configure_logging(fmt, "debug", stream)
    controller = FakeController(Settings(send_registration=False))
    runner = LeakyRunner(reject_tokens=frozenset({REJECTED_TOKEN}))
    config = make_config(controller_token=Secret(CONTROLLER_TOKEN), heartbeat_interval=1)
    agent = Agent(config, transport=httpx.ASGITransport(app=controller), backend=runner, handle_signals=False)
    rejected = controller.registration_command("vm-123") | {"id": "rejected"}
    rejected["parameters"] = rejected["parameters"] | {"registration_token": REJECTED_TOKEN}
    good = controller.registration_command("vm-123") | {"id": "good"}
    jit = {
        "id": "jit",
        "type": "register_runner",
        "parameters": {"jit_config": JIT_CONFIG, "runner_url": "https://github.com/o/r"},
    }
    states: list[str] = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(agent.run)
            await agent.driver.wait_for(lambda state: state.phase is Phase.READY)
            controller.enqueue("vm-123", rejected)
            controller.enqueue("vm-123", good)
            await agent.driver.wait_for(lambda state: state.phase is Phase.IDLE)
            states.append(config.state_file.read_text())
            runner.crash()
            await agent.driver.wait_for(lambda state: state.phase is Phase.READY)
            controller.enqueue("vm-123", jit)
            await agent.driver.wait_for(lambda state: state.phase is Phase.IDLE)
            runner.submit_job(Job("build", duration_s=60))
            await agent.driver.wait_for(lambda state: state.phase is Phase.BUSY)
            controller.enqueue("vm-123", {"type": "shutdown", "parameters": {"remove_token": REMOVE_TOKEN}})
    finally:
        logging.getLogger("miglet").handlers.clear()
    good_token = good["parameters"]["registration_token"]
    secrets = [CONTROLLER_TOKEN, REJECTED_TOKEN, good_token, JIT_CONFIG, REMOVE_TOKEN]
    # The secrets really were in play.
    assert [call.token for call in runner.configure_calls] == [REJECTED_TOKEN, good_token]
    assert runner.remove_calls == [REMOVE_TOKEN]
    assert all(r.headers["authorization"] == f"Bearer {CONTROLLER_TOKEN}" for r in controller.requests)
    # ...and appear nowhere MIGlet wrote.
    written = {
        "log": stream.getvalue(),
        "state file": config.state_file.read_text() + "".join(states),
        "events": msgspec.json.encode(controller.events_of("vm-123")).decode(),
    }
    for where, text in written.items():
        for value in secrets:
            assert value not in text, f"a secret reached the {where}"
    assert "***" in written["log"]
    assert len(controller.events_of("vm-123", "heartbeat")) > 0


def test_a_secret_is_masked_with_and_without_the_white_space_around_it() -> None:
    Secret("AHTSENTWITHANEWLINE000001\n")
    assert redact("token AHTSENTWITHANEWLINE000001 rejected") == "token *** rejected"
    assert redact("token AHTSENTWITHANEWLINE000001\n") == "token ***"


def test_a_value_that_is_mostly_white_space_masks_nothing() -> None:
    Secret("        ")
    Secret("\n  ab  \n")
    assert redact("a        b   ab  ") == "a        b   ab  "


# Secrets that overlap, contain one another and share their starts, to put redact_partial's hold-back to work.
_OVERLAPPING = [Secret(value).reveal() for value in ("PARTIALSECRET01", "PARTIALSECRET0123456", "SECRET0123456789")]
_text_pieces = st.one_of(
    st.sampled_from(_OVERLAPPING),
    st.sampled_from(_OVERLAPPING).flatmap(lambda value: st.integers(1, len(value)).map(lambda n: value[:n])),
    st.sampled_from(_OVERLAPPING).flatmap(lambda value: st.integers(1, len(value)).map(lambda n: value[-n:])),
    st.text(alphabet="PARTIALSECRET0123456789 ", max_size=6),
)


@given(st.lists(st.lists(_text_pieces, max_size=6).map("".join), max_size=6))
def test_masking_a_text_in_parts_masks_it_as_a_whole(parts: list[str]) -> None:
    masked = ""
    rest = ""
    for part in parts:
        text = rest + part
        done, rest = redact_partial(text)
        masked += done
        assert text.endswith(rest)
    assert masked + redact(rest) == redact("".join(parts))


class RunningAgent:
    """An agent run in the background of a test, against the fake controller."""

    def __init__(self, config: Config, controller: FakeController, runner: SimulatedRunner) -> None:
        self.agent = Agent(config, transport=httpx.ASGITransport(app=controller), backend=runner, handle_signals=False)
        self.exit_code: int | None = None

    async def run(self) -> None:
        self.exit_code = await self.agent.run()

    async def reach(self, phase: Phase) -> None:
        await self.agent.driver.wait_for(lambda state: state.phase is phase)


@asynccontextmanager
async def running_agent(
    config: Config, controller: FakeController, runner: SimulatedRunner
) -> AsyncIterator[RunningAgent]:
    running = RunningAgent(config, controller, runner)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(running.run)
        yield running


class TrimmingRunner(SimulatedRunner):
    """Refuses the token, quoting it without the white space around it, as config.sh's own errors may."""

    async def configure(self, registration: Registration, on_line: LineSink) -> None:
        assert registration.token is not None
        token = registration.token.reveal().strip()
        on_line("stderr", f"Invalid registration token {token}")
        raise ConfigureFailed(f"config.sh exited with code 1: Invalid registration token {token}")


async def test_a_token_sent_with_a_trailing_newline_is_masked_in_logs_and_events(
    make_config: ConfigFactory, autojump_clock: trio.testing.MockClock
) -> None:
    token = "AHTTRAILINGNEWLINE00000001"
    stream = io.StringIO()
    configure_logging("json", "debug", stream)
    controller = FakeController(Settings(send_registration=False))
    command = controller.registration_command("vm-123")
    command["parameters"] = command["parameters"] | {"registration_token": token + "\n"}
    try:
        async with running_agent(make_config(), controller, TrimmingRunner()) as running:
            await running.reach(Phase.READY)
            controller.enqueue("vm-123", command)
            await running.agent.driver.wait_for(lambda state: state.has_seen(command["id"]))
            await running.reach(Phase.READY)
            running.agent.request_stop("test over")
    finally:
        logging.getLogger("miglet").handlers.clear()
    [failed] = controller.events_of("vm-123", "registration_failed")
    assert failed["reason"] == "configure_failed"
    assert failed["error"] == "config.sh exited with code 1: Invalid registration token ***"
    assert "Invalid registration token ***" in stream.getvalue()
    assert token not in stream.getvalue()


async def test_a_job_name_holding_a_secret_is_masked_in_job_events(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_agent(make_config(), controller, runner) as running:
        await running.reach(Phase.IDLE)
        token = controller.vm("vm-123").registration_token
        assert token is not None
        runner.submit_job(Job(f"deploy with {token}"))
    [started] = controller.events_of("vm-123", "job_started")
    [completed] = controller.events_of("vm-123", "job_completed")
    assert started["job_name"] == completed["job_name"] == "deploy with ***"
    assert completed["result"] == "Succeeded"


async def test_an_unusable_remove_token_does_not_prevent_the_shutdown(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_agent(make_config(), controller, runner) as running:
        await running.reach(Phase.IDLE)
        shutdown = {"id": "stop-1", "type": "shutdown", "parameters": {"reason": "scale-in", "remove_token": " \n"}}
        controller.enqueue("vm-123", shutdown)
        await running.reach(Phase.STOPPED)
    assert running.exit_code == 0
    assert runner.remove_calls == []
    [failed] = controller.events_of("vm-123", "command_failed")
    assert (failed["command_id"], failed["command_type"]) == ("stop-1", "shutdown")
    assert failed["error"].startswith("remove_token must have at least 8 characters")
    assert failed["error"].endswith("the runner is not removed")
    assert controller.events_of("vm-123", "vm_stopping")[0]["reason"] == "scale-in"


def test_secrets_never_handed_over_are_forgotten_after_many_others_but_those_handed_over_never_are() -> None:
    used = Secret("AHT-HANDED-TO-CONFIG-SH-0001")
    used.reveal()
    # A controller floods the agent with commands, each with a token of its own, and each is masked a moment.
    for index in range(4 * RECENT_KEPT):
        value = f"AHT-FLOOD-{index:08d}"
        assert Secret(value)  # made, never handed over
        assert redact(f"echo {value}") == "echo ***"
    # What masking goes through stays bounded: those kept, and at most as many forgotten since the last rebuild.
    compiled = sum(len(generation.values) for generation in secret._registry._current())
    assert compiled <= 2 * (RECENT_KEPT + len(secret._registry._pinned))
    assert redact("AHT-HANDED-TO-CONFIG-SH-0001") == "***"


async def test_the_state_file_masks_a_job_name_and_a_stop_reason_that_carry_a_secret(
    make_config: ConfigFactory, autojump_clock: trio.testing.MockClock
) -> None:
    secret = Secret("AHT-STATE-FILE-SECRET-0001")
    controller = FakeController()
    runner = SimulatedRunner()
    config = make_config()
    agent = Agent(config, transport=httpx.ASGITransport(app=controller), backend=runner, handle_signals=False)
    written: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.run)
        await agent.driver.wait_for(lambda state: state.phase is Phase.IDLE)
        runner.submit_job(Job(f"deploy {secret.reveal()}", duration_s=600))
        await agent.driver.wait_for(lambda state: state.phase is Phase.BUSY)
        written.append(config.state_file.read_text())
        controller.enqueue("vm-123", {"type": "shutdown", "parameters": {"reason": f"rotate {secret.reveal()}"}})
        await agent.driver.wait_for(lambda state: state.phase is Phase.STOPPING)
        written.append(config.state_file.read_text())
    assert '"job":"deploy ***"' in written[0]
    assert '"stop_reason":"rotate ***"' in written[1]
    assert not any(secret.reveal() in text for text in written)


@given(split=st.integers(min_value=0, max_value=80), extra=st.text(alphabet="xyz-", max_size=20))
def test_secrets_that_share_characters_are_masked_whole_at_once_and_in_parts(split: int, extra: str) -> None:
    Secret("OVERLAP-FIRST-PART")
    Secret("FIRST-PART-AND-SECOND-HALF-XYZ")
    text = f"{extra}OVERLAP-FIRST-PART-AND-SECOND-HALF-XYZ{extra}"
    assert redact(text) == f"{extra}***{extra}"
    # Masked in two goes (a line still being read), the result is the same.
    head, tail = text[:split], text[split:]
    done, rest = redact_partial(head)
    assert done + redact(rest + tail) == redact(text)


def test_a_job_name_enters_the_machine_masked_even_with_a_colour_code_inside_its_secret() -> None:
    token = Secret("AHTCOLOURSPLITTOKEN0001")
    raw = "Running job: deploy AHTCOLOUR\x1b[0mSPLITTOKEN0001"
    assert redact(raw) == raw  # the colour code hides the secret from masking the raw line
    signal = interpret(clean(raw))
    assert signal == JobRunning(name="deploy ***")
    assert token
