"""Agent overhead from process start to a listening runner, with an instant controller and runner.

`python -m miglet` runs as a real process, on an interpreter that sees only MIGlet's runtime dependencies
(`runtime_python`), against the fake controller (in this process, over loopback) and the fake runner. MIGlet
reports its phase timings from process start in `runner_registered`; the fake runner's own time (its
`config.sh`, and `run.sh` until `Listening for Jobs`, measured alone the same way) is subtracted, leaving what
MIGlet itself costs: interpreter start, imports, handshake, poll and spawning. The time a bare interpreter
takes to import trio, httpx (with httpcore), msgspec and trio-util is measured alongside, as the floor under
that cost.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import trio

from benchmarks.common import ROOT, registered_miglet, runtime_python, served_controller
from fake_controller import FakeController
from fake_controller.fake_runner import install
from miglet.runner.backend import Registration
from miglet.runner.process import RUNNER_CONFIG_FILES, config_arguments, kill_session, runner_environment

REGISTRATION = Registration(
    command_id="bench",
    url="https://github.com/bench/bench",
    name="bench",
    labels=("self-hosted",),
    group="default",
    ephemeral=True,
)


def _env() -> dict[str, str]:
    env = runner_environment(os.environ)
    if os.geteuid() == 0:
        env["RUNNER_ALLOW_RUNASROOT"] = "1"
    return env


async def runner_alone(runner_dir: Path) -> float:
    """Seconds the fake runner takes by itself: config.sh, then run.sh until it listens."""
    for name in RUNNER_CONFIG_FILES:
        (runner_dir / name).unlink(missing_ok=True)
    env = {**_env(), "ACTIONS_RUNNER_INPUT_TOKEN": "AHTBENCHMARKTOKEN00000000001"}
    start = time.monotonic()
    await trio.run_process(config_arguments(REGISTRATION), cwd=runner_dir, env=env, capture_stdout=True)
    process = await trio.lowlevel.open_process(
        ["./run.sh"],
        cwd=runner_dir,
        env={**_env(), "RUNNER_MANUALLY_TRAP_SIG": "1"},
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert process.stdout is not None
    seen = b""
    async for chunk in process.stdout:
        seen += chunk
        if b"Listening for Jobs" in seen:
            break
    elapsed = time.monotonic() - start
    os.killpg(process.pid, signal.SIGINT)
    with trio.move_on_after(10):
        await process.wait()
    kill_session(process.pid)
    return elapsed


async def libraries_alone(python: Path) -> float:
    """Seconds a bare interpreter takes to import the libraries MIGlet is built on: the floor under its start-up.

    The collector is off during the imports, as `miglet run` has it.
    """
    start = time.monotonic()
    code = "import gc; gc.disable(); import trio, httpx, httpcore, msgspec, trio_util; gc.freeze(); gc.enable()"
    await trio.run_process([python, "-c", code])
    return time.monotonic() - start


def standalone_build(workdir: Path) -> Path | None:
    """The standalone build's executable, built once (None where PyInstaller is not installed)."""
    if importlib.util.find_spec("PyInstaller") is None:
        return None
    dist = workdir / "bundle-dist"
    executable = dist / "miglet" / "miglet"
    if not executable.exists():
        build = ROOT / "packaging" / "bundle" / "build.py"
        subprocess.run([sys.executable, str(build), "bundle", str(dist)], check=True, capture_output=True)
        [archive] = dist.glob("miglet-*.tar.gz")
        with tarfile.open(archive) as tar:
            tar.extractall(dist, filter="tar")
    return executable


async def miglet_once(
    url: str,
    runner_dir: Path,
    workdir: Path,
    vm_id: str,
    controller: FakeController,
    command: list[str] | None = None,
) -> dict[str, float]:
    """MIGlet's phase timings, from its start to its runner listening."""
    async with registered_miglet(controller, url, runner_dir, workdir, vm_id, command):
        pass
    timings: dict[str, float] = controller.events_of(vm_id, "runner_registered")[0]["timings"]
    return timings


async def run(workdir: Path, trials: int = 15) -> dict[str, Any]:
    runner_dir = install(workdir / "startup-runner")
    python = runtime_python(workdir)
    controller = FakeController()
    bundle = standalone_build(workdir)
    alone: list[float] = []
    floor: list[float] = []
    phases: list[dict[str, float]] = []
    bundled: list[float] = []
    async with served_controller(controller) as url:
        for index in range(trials):
            # Paired: the runner alone, then MIGlet with it, so that drift in the machine's speed cancels out.
            alone.append(await runner_alone(runner_dir))
            floor.append(await libraries_alone(python))
            phases.append(await miglet_once(url, runner_dir, workdir, f"start-{index}", controller))
            if bundle is not None:
                command = [str(bundle), "run"]
                timings = await miglet_once(url, runner_dir, workdir, f"bundle-{index}", controller, command)
                bundled.append(timings["listening_s"] - alone[-1])
    listening = [phase["listening_s"] for phase in phases]
    overhead = [total - runner for total, runner in zip(listening, alone, strict=True)]
    standalone = {"bundle_overhead_p50_ms": round(statistics.median(bundled) * 1000, 1)} if bundled else {}
    return standalone | {
        "trials": trials,
        "fake_runner_alone_ms": round(statistics.median(alone) * 1000, 1),
        "to_listening_p50_ms": round(statistics.median(listening) * 1000, 1),
        "overhead_p50_ms": round(statistics.median(overhead) * 1000, 1),
        "overhead_max_ms": round(max(overhead) * 1000, 1),
        "python_and_library_imports_p50_ms": round(statistics.median(floor) * 1000, 1),
        "overhead_beyond_imports_p50_ms": round(
            statistics.median(total - libraries for total, libraries in zip(overhead, floor, strict=True)) * 1000, 1
        ),
        "phases_p50_ms": {
            name: round(statistics.median(phase[name] for phase in phases) * 1000, 1) for name in phases[0]
        },
    }
