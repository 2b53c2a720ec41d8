"""Fleet: N agents in one process against one fake controller in another, until every runner is listening.

The agents run the whole flow (vm_started, long-poll, register_runner, a simulated runner) over real HTTP on
loopback. The controller runs as `python -m fake_controller` so that the two sides do not share a core's
event loop. Reported: seconds until all are Idle, and the requests per second the controller served.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from benchmarks.common import agent_config, raise_file_limit
from fake_controller.simulated_runner import SimulatedRunner
from miglet.app import Agent
from miglet.machine import Phase


async def _start_controller(nursery: trio.Nursery) -> tuple[trio.Process, str]:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "fake_controller", "--port", "0", "--quiet"],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    seen = b""
    async for chunk in process.stdout:
        seen += chunk
        if b"\n" in seen and b"listening on " in seen:
            break
    url = seen.split(b"listening on ", 1)[1].split()[0].decode()
    nursery.start_soon(_drain, process.stdout)
    return process, url


async def _drain(stream: trio.abc.ReceiveStream) -> None:
    async for _ in stream:
        pass


async def fleet(workdir: Path, agents_count: int) -> dict[str, Any]:
    raise_file_limit()
    async with trio.open_nursery() as nursery:
        controller, url = await _start_controller(nursery)
        try:
            agents = [
                Agent(
                    agent_config(f"fleet-{index:05d}", url, workdir, heartbeat_interval=30.0),
                    backend=SimulatedRunner(),
                    handle_signals=False,
                    write_state_file=False,
                )
                for index in range(agents_count)
            ]
            start = time.monotonic()
            async with trio.open_nursery() as fleet_nursery:
                for agent in agents:
                    fleet_nursery.start_soon(agent.run)
                for agent in agents:
                    await agent.driver.wait_for(lambda state: state.phase is Phase.IDLE)
                all_idle = time.monotonic() - start
                async with httpx.AsyncClient(base_url=url) as admin:
                    served = len((await admin.get("/_admin/requests")).json())
                for agent in agents:
                    agent.request_stop("benchmark over")
        finally:
            controller.terminate()
            await controller.wait()
        nursery.cancel_scope.cancel()
    return {
        "agents": agents_count,
        "all_idle_s": round(all_idle, 2),
        "controller_requests": served,
        "requests_per_s": round(served / all_idle, 1),
    }


async def run(workdir: Path, sizes: tuple[int, ...] = (100, 1000)) -> dict[str, Any]:
    return {str(size): await fleet(workdir, size) for size in sizes}
