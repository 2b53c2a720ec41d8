"""Liveness: heartbeat events for the controller, and a fresh state file for the local health check.

Both run on `trio_util.periodic`, so a slow iteration delays the next one instead of piling up. Heartbeats start
once the controller has acknowledged the VM and stop when the agent begins stopping; each carries the counts of
events the outbox has had to drop so far.
"""

from __future__ import annotations

from contextlib import aclosing

import trio
from trio_util import periodic

from miglet import protocol
from miglet.driver import Driver
from miglet.machine import BEFORE_ACKNOWLEDGMENT, OVER
from miglet.outbox import Outbox


async def heartbeat_task(driver: Driver, outbox: Outbox, interval: float, started_at: float) -> None:
    """Queue a heartbeat every `interval` seconds from acknowledgment until stopping (0 disables them)."""
    if interval <= 0:
        return
    await driver.wait_for(lambda state: state.phase not in BEFORE_ACKNOWLEDGMENT)
    async with aclosing(periodic(interval)) as ticks:
        async for _, since_last in ticks:
            if since_last is None:
                continue  # the acknowledgment itself just showed the VM alive
            phase = driver.phase
            if phase in OVER:
                return
            uptime = round(trio.current_time() - started_at, 3)
            dropped = dict(outbox.overflow) or None
            outbox.put(protocol.Heartbeat(state=phase.value, uptime_s=uptime, events_dropped=dropped))


async def state_refresh_task(driver: Driver, interval: float) -> None:
    """Rewrite the state file every `interval` seconds, so a reader can tell a live agent from a dead one."""
    async with aclosing(periodic(interval)) as ticks:
        async for _ in ticks:
            driver.write_state_file()
