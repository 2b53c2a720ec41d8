"""Heartbeats and state-file refreshes, on the autojump clock.

Rules: the machine is fed directly; the outbox is inspected, not delivered.
"""

from __future__ import annotations

from pathlib import Path

import trio

from miglet import protocol
from miglet.driver import Driver
from miglet.machine import Acknowledged, Start, StopRequested
from miglet.outbox import Outbox
from miglet.stamp import Stamper
from miglet.statefile import StateFileWriter, StateRecord, read_state_file
from miglet.tasks.heartbeat import heartbeat_task, state_refresh_task


def make() -> tuple[Driver, Outbox]:
    outbox = Outbox(Stamper("vm-123", "pool-001", None))
    driver = Driver(vm_id="vm-123", pool_id="pool-001", send=outbox.put)
    driver.apply(Start(runner_name="vm-123", ephemeral=True))
    return driver, outbox


def heartbeats(outbox: Outbox) -> list[protocol.Heartbeat]:
    return [event for event in outbox.queued() if isinstance(event, protocol.Heartbeat)]


async def test_heartbeats_every_interval_from_acknowledgment_until_stopping(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver, outbox = make()
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(heartbeat_task, driver, outbox, 0.5, start)
        await trio.sleep(10)
        assert heartbeats(outbox) == []  # not acknowledged yet
        driver.apply(Acknowledged())
        await trio.sleep(1.6)
        driver.apply(StopRequested(reason="signal"))
    beats = heartbeats(outbox)
    assert [beat.uptime_s for beat in beats] == [10.5, 11.0, 11.5]
    assert {beat.state for beat in beats} == {"Ready"}
    assert len({beat.event_id for beat in beats}) == 3


async def test_zero_interval_disables_heartbeats(autojump_clock: trio.testing.MockClock) -> None:
    driver, outbox = make()
    driver.apply(Acknowledged())
    with trio.move_on_after(100):
        await heartbeat_task(driver, outbox, 0, 0)
    assert heartbeats(outbox) == []


async def test_state_file_is_rewritten_periodically(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    class CountingWriter(StateFileWriter):
        def __init__(self, path: Path) -> None:
            super().__init__(path)
            self.times: list[float] = []

        def write(self, record: StateRecord) -> None:
            self.times.append(trio.current_time())
            super().write(record)

    writer = CountingWriter(tmp_path / "s.json")
    outbox = Outbox(Stamper("vm-123", "pool-001", None))
    driver = Driver(vm_id="vm-123", pool_id="pool-001", send=outbox.put, state_file=writer)
    start = trio.current_time()
    with trio.move_on_after(25):
        await state_refresh_task(driver, 10)
    assert [at - start for at in writer.times] == [0, 10, 20]
    assert read_state_file(tmp_path / "s.json").state == "Initializing"
