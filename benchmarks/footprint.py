"""Idle footprint: resident memory and CPU time of a `python -m miglet` process whose runner waits for jobs.

Defaults throughout (long-poll of 20 s, 5 s poll interval, 30 s heartbeats): what a VM pays while its runner
waits for a job. CPU is measured over a window and scaled to seconds per minute.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from benchmarks.common import cpu_seconds, registered_miglet, rss_bytes, served_controller
from fake_controller import FakeController
from fake_controller.fake_runner import install


async def run(workdir: Path, window_s: float = 60.0) -> dict[str, Any]:
    runner_dir = install(workdir / "footprint-runner")
    controller = FakeController()
    async with (
        served_controller(controller) as url,
        registered_miglet(controller, url, runner_dir, workdir, "footprint") as process,
    ):
        rss_idle_start = rss_bytes(process.pid)
        cpu_before = cpu_seconds(process.pid)
        requests_before = len(controller.requests)
        await trio.sleep(window_s)
        cpu_after = cpu_seconds(process.pid)
        rss_idle_end = rss_bytes(process.pid)
        requests = len(controller.requests) - requests_before
    return {
        "window_s": window_s,
        "rss_mb": round(max(rss_idle_start, rss_idle_end) / 2**20, 1),
        "cpu_s_per_min": round((cpu_after - cpu_before) * 60 / window_s, 3),
        "requests_per_min": round(requests * 60 / window_s, 1),
    }
