"""systemd readiness: a NOTIFY_SOCKET listener hears READY=1 when the runner listens, and STOPPING=1 on stop.

Rules: a real datagram socket in a temporary directory; the whole agent in-process on the autojump clock.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from fake_controller import FakeController
from fake_controller.simulated_runner import SimulatedRunner
from miglet.app import Agent
from miglet.machine import Phase
from miglet.sdnotify import Notifier
from tests.agents import ConfigFactory


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.setblocking(False)
    yield sock
    sock.close()


def received(sock: socket.socket) -> list[str]:
    messages: list[str] = []
    while True:
        try:
            messages += sock.recv(4096).decode().split("\n")
        except BlockingIOError:
            return messages


async def test_ready_when_listening_status_on_every_phase_and_stopping_on_stop(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
    listener: socket.socket,
) -> None:
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": listener.getsockname()})
    assert notifier is not None
    agent = Agent(
        make_config(),
        transport=httpx.ASGITransport(app=controller),
        backend=runner,
        handle_signals=False,
        notifier=notifier,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.run)
        await agent.driver.wait_for(lambda state: state.phase is Phase.REGISTERING_RUNNER)
        assert "READY=1" not in received(listener)
        await agent.driver.wait_for(lambda state: state.phase is Phase.IDLE)
        assert received(listener) == ["STATUS=Idle", "READY=1"]
        agent.request_stop("test over")
    assert received(listener)[:2] == ["STATUS=Stopping", "STOPPING=1"]


async def test_the_watchdog_is_pinged_at_half_its_interval(
    autojump_clock: trio.testing.MockClock, listener: socket.socket
) -> None:
    env = {"NOTIFY_SOCKET": listener.getsockname(), "WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}
    notifier = Notifier.from_environment(env)
    assert notifier is not None
    with trio.move_on_after(21):
        await notifier.watchdog()
    assert received(listener) == ["WATCHDOG=1"] * 5  # at 0, 5, 10, 15 and 20 s


def test_no_socket_no_notifier_and_a_watchdog_for_another_process_is_not_ours() -> None:
    assert Notifier.from_environment({}) is None
    assert Notifier.from_environment({"NOTIFY_SOCKET": "relative/path"}) is None
    other = Notifier.from_environment({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"})
    assert other is not None
    assert other.watchdog_s is None


def test_a_socket_that_is_not_there_or_an_absurd_watchdog_changes_nothing(tmp_path: Path) -> None:
    gone = Notifier.from_environment({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert gone is not None
    for _ in range(3):
        gone.send("READY=1")  # logged once, never raised
    for usec in ("soon", "-5", "0", "9" * 40):
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": usec})
        assert notifier is not None
        assert notifier.watchdog_s is None or notifier.watchdog_s > 0
