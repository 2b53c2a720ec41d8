"""A whole agent in the test's trio run, against the in-process fake controller and the simulated runner."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio

from fake_controller import FakeController
from fake_controller.simulated_runner import SimulatedRunner
from miglet import protocol
from miglet.app import Agent
from miglet.config import Config
from miglet.machine import AgentState, Phase
from miglet.secret import Secret

# Builds a test's configuration from overrides of a base one (the `make_config` fixture).
ConfigFactory = Callable[..., Config]


class Running:
    def __init__(self, agent: Agent, controller: FakeController, runner: SimulatedRunner) -> None:
        self.agent = agent
        self.controller = controller
        self.runner = runner
        self.exit_code: int | None = None

    async def reach(self, phase: Phase) -> AgentState:
        return await self.agent.driver.wait_for(lambda state: state.phase is phase)

    def events(self, event_type: str | None = None) -> list[dict[str, Any]]:
        return self.controller.events_of(self.agent.config.vm_id, event_type)

    def event_types(self) -> list[str]:
        """The events the controller received, heartbeats aside."""
        return [event["type"] for event in self.events() if event["type"] != "heartbeat"]


class BuggyTransport(httpx.AsyncBaseTransport):
    """The controller in-process, except that requests `fails(request)` picks raise a plain exception: what a
    bug inside the HTTP stack (not a network failure) looks like to the task that made the request."""

    def __init__(self, controller: FakeController, fails: Callable[[httpx.Request], bool]) -> None:
        self._inner = httpx.ASGITransport(app=controller)
        self._fails = fails
        self.raised = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._fails(request):
            self.raised += 1
            raise RuntimeError(f"a bug met while sending {request.method} {request.url.path}")
        return await self._inner.handle_async_request(request)


@asynccontextmanager
async def running_agent(
    config: Config,
    controller: FakeController,
    runner: SimulatedRunner,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    metadata_transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[Running]:
    """Run an agent in the background; leaving the block waits for it to end by itself."""
    agent = Agent(
        config,
        transport=transport or httpx.ASGITransport(app=controller),
        metadata_transport=metadata_transport,
        backend=runner,
        handle_signals=False,
        rng=random.Random(1),
    )
    running = Running(agent, controller, runner)

    async def run() -> None:
        running.exit_code = await agent.run()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        yield running


def register_runner(command_id: str) -> protocol.RegisterRunner:
    """A valid `register_runner` command, as the machine receives it."""
    parameters = protocol.RegisterRunnerParameters(
        runner_url="https://github.com/o/r", registration_token=Secret("AHT0123456789"), labels=["x"]
    )
    return protocol.RegisterRunner(id=command_id, parameters=parameters)
