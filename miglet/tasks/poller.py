"""The command-poller task: fetch the controller's commands from Ready on, and hand each one to the machine.

Polling starts the moment the agent is Ready and then repeats at most every `poll_interval`; with long-poll
(`command_wait` > 0) each request asks the controller to hold it until a command exists, and the next starts
when the previous ends or the interval has passed, whichever is later. A plain controller thus sees the seed's
cadence, and a long-poll controller's command arrives the moment it exists.

The task keeps nothing of its own: which commands were seen, which registrations wait, and what each command
leads to are the machine's to decide (`machine.CommandArrived`), so a restart of this task loses nothing.
"""

from __future__ import annotations

import logging
import random
from typing import Final

import trio

from miglet import machine, protocol
from miglet.config import Config
from miglet.controller import ControllerClient, ControllerError, retry_after_of
from miglet.driver import Driver
from miglet.machine import Phase
from miglet.retry import Backoff, RetryPolicy

log = logging.getLogger(__name__)

ROUTE_SLICE: Final = 256


async def poller_task(
    config: Config,
    client: ControllerClient,
    driver: Driver,
    policy: RetryPolicy,
    rng: random.Random | None = None,
) -> None:
    """Poll until the agent stops, handing each answer to the machine."""
    await driver.wait_for(lambda state: state.phase not in machine.BEFORE_ACKNOWLEDGMENT)
    announced = False
    backoff = Backoff(policy, rng)
    while driver.phase not in machine.OVER:
        if driver.phase is Phase.READY:
            if not announced:
                log.info("MIGlet is ready - polling controller for registration config")
                announced = True
        else:
            announced = False
        started = trio.current_time()
        try:
            batch = await client.get_commands(config.command_wait)
        except (ControllerError, protocol.ProtocolError) as exc:
            delay = max(config.poll_interval, backoff.next_delay(retry_after_of(exc)))
            log.warning(
                "Command poll failed; will retry",
                extra={"error": str(exc), "attempt": backoff.attempts, "retry_in_s": round(delay, 3)},
            )
            await trio.sleep(delay)
            continue
        backoff.reset()
        with trio.CancelScope(shield=True):  # a stop beginning meanwhile: the whole batch is still answered
            await route(driver, batch)
        await trio.sleep_until(started + config.poll_interval)


async def route(driver: Driver, batch: protocol.CommandBatch) -> None:
    """Hand a batch to the machine: the commands that could not be decoded first, then the others in order.

    A huge batch lets the other tasks (signals, the runner's output) in every ROUTE_SLICE commands.
    """
    inputs: list[machine.Input] = [machine.CommandRejected(rejected) for rejected in batch.rejected]
    inputs += [machine.CommandArrived(command) for command in batch.commands]
    for index, item in enumerate(inputs, 1):
        driver.apply(item)
        if index % ROUTE_SLICE == 0:
            await trio.lowlevel.checkpoint()
