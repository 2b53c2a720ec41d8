"""Notice to `vm_preempted`: how long after a cloud's notice appears the controller hears of it, per cloud.

One agent at a time runs in this process, Idle with the simulated runner, over real HTTP on loopback against
the fake controller and the cloud's fake metadata service. At a random moment the notice appears at the
metadata service; the figure is the time until the controller has received `vm_preempted`. AWS and Azure are
polled (every 2 s), GCP's values are held open with `wait_for_change`.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import trio

from benchmarks.common import agent_config, served_controller, summary_ms
from fake_controller import FakeController, Settings
from fake_controller.metadata import PROVIDERS, FakeMetadata
from fake_controller.server import serve
from fake_controller.simulated_runner import SimulatedRunner
from miglet.app import Agent
from miglet.machine import Phase


async def _trial(provider: str, index: int, workdir: Path, rng: random.Random) -> float:
    delivered = trio.Event()

    def observe(vm_id: str, what: str, detail: dict[str, Any]) -> None:
        if what == "event vm_preempted":
            delivered.set()

    controller = FakeController(Settings(), observer=observe)
    vm_id = f"{provider}-{index}"
    metadata = FakeMetadata(provider, vm_name=vm_id)
    async with served_controller(controller) as url, trio.open_nursery() as nursery:
        metadata_url = await nursery.start(serve, metadata)
        config = agent_config(
            vm_id, url, workdir, preemption=provider, metadata_endpoint=metadata_url, heartbeat_interval=0.0
        )
        agent = Agent(config, backend=SimulatedRunner(), handle_signals=False, write_state_file=False)
        nursery.start_soon(agent.run)
        await agent.driver.wait_for(lambda state: state.phase is Phase.IDLE)
        # A random moment within one polling period, so that polling is sampled fairly.
        await trio.sleep(rng.uniform(0, 2))
        noticed = time.monotonic()
        metadata.notice(action="terminate", preempted=True, event_type="Preempt", in_s=120)
        await delivered.wait()
        took = time.monotonic() - noticed
        await agent.driver.wait_for(lambda state: state.phase is Phase.STOPPED)
        nursery.cancel_scope.cancel()
    return took


async def run(workdir: Path, trials: int = 8) -> dict[str, Any]:
    logging.getLogger("miglet").setLevel(logging.ERROR)  # each trial's notice is a warning, as it should be
    rng = random.Random(7)
    results: dict[str, Any] = {}
    for provider in PROVIDERS:
        took = [await _trial(provider, index, workdir, rng) for index in range(trials)]
        results[provider] = summary_ms(took)
    return results
