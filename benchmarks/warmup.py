"""The warmup against a registration: stop it when the registration comes, or let it finish beside it?

The fake runner's `warmup` keeps one core busy for WARMUP_CPU_S, as the real one does while it compiles every
method it ships. Each trial starts the warmup as MIGlet does (`ProcessRunner.warmup`: `nice -n 19`, the runner's
directory), lets it run for a moment, then carries out a registration: `config.sh`, then `run.sh` until
`Listening for Jobs`. The figure is the time from the registration to listening, in three cases:

- `none`: no warmup at all (the yardstick);
- `stopped`: the warmup is stopped the moment the registration comes (what MIGlet does);
- `finishing`: the warmup goes on beside the registration, not waited for.

With the fake runner nothing gets faster for having been warmed up (its code is Python, already cached): what
this measures is what a warmup costs the registration it does not delay, which is the question that decides
between stopping it and letting it finish.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Final

import trio

from benchmarks.common import summary_ms
from fake_controller.fake_runner import Behaviour, install
from miglet.runner.backend import Grace, Line, Registration, RunEvent
from miglet.runner.process import ProcessRunner
from miglet.secret import Secret

WARMUP_CPU_S: Final = 30.0
# How long the warmup runs before the registration comes.
HEAD_START_S: Final = 0.5
CASES: Final = ("none", "stopped", "finishing")


async def _trial(runner_dir: Path, case: str, index: int) -> float:
    backend = ProcessRunner(runner_dir, grace=lambda: Grace(2))
    registration = Registration(
        command_id=f"bench-{case}-{index}",
        url="https://github.com/bench/repo",
        name=f"bench-{case}-{index}",
        labels=("self-hosted",),
        group="Default",
        ephemeral=True,
        token=Secret("AHTBENCHMARK0123456789"),
    )
    async with trio.open_nursery() as nursery:
        warming = trio.CancelScope()
        if case != "none":

            async def warm() -> None:
                with warming:
                    await backend.warmup()

            nursery.start_soon(warm)
            await trio.sleep(HEAD_START_S)
        began = time.monotonic()
        if case == "stopped":
            warming.cancel()
        await backend.clean()
        await backend.configure(registration, lambda stream, line: None)
        send, receive = trio.open_memory_channel[RunEvent](0)
        async with trio.open_nursery() as running:
            running.start_soon(backend.run, registration, send)
            async for event in receive:
                if isinstance(event, Line) and event.text.endswith("Listening for Jobs"):
                    break
            took = time.monotonic() - began
            running.cancel_scope.cancel()
        warming.cancel()
    return took


async def run(workdir: Path, trials: int = 8) -> dict[str, Any]:
    logging.getLogger("miglet").setLevel(logging.ERROR)
    runner_dir = install(workdir / "warmup-runner", Behaviour(warmup_s=WARMUP_CPU_S))
    took: dict[str, list[float]] = {case: [] for case in CASES}
    # Interleaved, so that the machine's drift falls on every case alike.
    for index in range(trials):
        for case in CASES:
            took[case].append(await _trial(runner_dir, case, index))
    return {case: summary_ms(values) for case, values in took.items()}
