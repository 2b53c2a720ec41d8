"""Secrets never leave: a whole run, with every secret in play, and every byte MIGlet wrote searched for them.

Rules: the agent runs in-process against the fake controller with a simulated runner that echoes what it was
given (as a misbehaving runner might); logs are captured at debug level in both formats.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import httpx
import msgspec
import pytest
import trio

from fake_controller import FakeController, Settings
from fake_controller.simulated_runner import Job, SimulatedRunner
from miglet.app import Agent
from miglet.logs import configure_logging
from miglet.machine import Phase
from miglet.runner.backend import LineSink, Registration, RunObserver
from miglet.secret import Secret
from tests.conftest import ConfigFactory

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

    async def run(self, registration: Registration, observer: RunObserver) -> int:
        if registration.jit_config is not None:
            observer.line("stderr", f"jit: {registration.jit_config.reveal()}")
        return await super().run(registration, observer)

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
            await agent.holder.value.wait_value(lambda state: state.phase is Phase.READY)
            controller.enqueue("vm-123", rejected)
            controller.enqueue("vm-123", good)
            await agent.holder.value.wait_value(lambda state: state.phase is Phase.IDLE)
            states.append(config.state_file.read_text())
            runner.crash()
            await agent.holder.value.wait_value(lambda state: state.phase is Phase.READY)
            controller.enqueue("vm-123", jit)
            await agent.holder.value.wait_value(lambda state: state.phase is Phase.IDLE)
            runner.submit_job(Job("build", duration_s=60))
            await agent.holder.value.wait_value(lambda state: state.phase is Phase.BUSY)
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
