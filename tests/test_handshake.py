"""The controller-handshake task in isolation: `vm_started` until acknowledged, then Ready.

Rules: the controller is an `httpx.MockTransport` handler; time is trio's autojump clock, so retry delays are
asserted exactly. A fixed-seed RNG makes backoff jitter repeatable.
"""

from __future__ import annotations

import itertools
import random

import httpx
import msgspec
import trio

from miglet import protocol
from miglet.controller import open_controller_client
from miglet.driver import Driver
from miglet.machine import Phase, Start
from miglet.outbox import Outbox
from miglet.retry import RetryPolicy
from miglet.stamp import Stamper
from miglet.tasks.handshake import handshake_task
from tests.agents import ConfigFactory

ACK = {"status": "acknowledged", "acknowledged": True, "vm_id": "vm-123"}


def make_driver() -> Driver:
    stamper = Stamper("vm-123", "pool-001", None)
    driver = Driver(vm_id="vm-123", pool_id="pool-001", send=Outbox(stamper).put)
    driver.apply(Start(runner_name="vm-123", ephemeral=True))
    return driver


async def run_handshake(
    make_config: ConfigFactory, answers: list[object]
) -> tuple[list[tuple[float, dict[str, object]]], Driver]:
    """Answer successive vm_started posts with `answers` (a status and body, or an exception to raise)."""
    seen: list[tuple[float, dict[str, object]]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        assert request.method == "POST"
        assert request.url.path == "/api/v1/vms/vm-123/events"
        seen.append((trio.current_time(), msgspec.json.decode(request.content)))
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(answer, tuple)
        status, body, *headers = answer
        return httpx.Response(status, json=body, headers=headers[0] if headers else None)

    driver = make_driver()
    async with open_controller_client(make_config(), httpx.MockTransport(handler)) as client:
        vm_started = Stamper("vm-123", "pool-001", "org-001").stamp(protocol.VmStarted())
        await handshake_task(client, driver, vm_started, RetryPolicy(base=1, cap=8), random.Random(7))
    return seen, driver


async def test_acknowledgment_moves_to_ready(
    make_config: ConfigFactory, autojump_clock: trio.testing.MockClock
) -> None:
    seen, driver = await run_handshake(make_config, [(200, ACK)])
    assert driver.phase is Phase.READY
    [(_, event)] = seen
    assert event["type"] == "vm_started"
    assert event["vm_id"] == "vm-123"
    assert event["pool_id"] == "pool-001"
    assert event["org_id"] == "org-001"
    assert isinstance(event["event_id"], str)
    assert event["event_id"]
    assert isinstance(event["timestamp"], str)
    assert event["timestamp"].endswith("Z")


async def test_failures_are_retried_with_the_same_event_id(
    make_config: ConfigFactory, autojump_clock: trio.testing.MockClock
) -> None:
    answers: list[object] = [
        (503, {"error": "down"}),
        (503, {"error": "down"}, {"Retry-After": "3"}),
        httpx.ConnectError("refused"),
        (500, "boom"),
        (404, {"error": "unknown vm"}),
        (200, {"status": "acknowledged", "acknowledged": False}),
        (200, "not an acknowledgment"),
        (200, ACK),
    ]
    seen, driver = await run_handshake(make_config, answers)
    assert driver.phase is Phase.READY
    assert len(seen) == 8
    assert len({event["event_id"] for _, event in seen}) == 1
    times = [at for at, _ in seen]
    # Retry-After is honoured exactly; other waits are jittered but never above the capped exponential.
    assert times[2] - times[1] == 3
    for attempt, (earlier, later) in enumerate(itertools.pairwise(times)):
        if attempt != 1:
            assert 0 <= later - earlier <= min(8, 2**attempt)


async def test_handshake_is_cancellable_while_waiting(
    make_config: ConfigFactory, autojump_clock: trio.testing.MockClock
) -> None:
    async def never_answers(request: httpx.Request) -> httpx.Response:
        await trio.sleep_forever()
        raise AssertionError

    driver = make_driver()
    async with open_controller_client(make_config(), httpx.MockTransport(never_answers)) as client:
        with trio.move_on_after(1000) as scope:
            await handshake_task(
                client, driver, Stamper("vm-123", "pool-001", None).stamp(protocol.VmStarted()), RetryPolicy()
            )
    assert scope.cancelled_caught
    assert driver.phase is Phase.WAITING_FOR_CONTROLLER
