"""What the benchmarks share: percentiles, a fake controller to talk to, and reading a process's footprint."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import metadata
from pathlib import Path
from typing import Final

import trio
from packaging.requirements import Requirement

from fake_controller import FakeController
from fake_controller.server import serve
from miglet.config import Config
from miglet.procfs import clock_ticks_per_second, read_stat


def percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile (`fraction` in 0..1) of `values`."""
    ordered = sorted(values)
    rank = max(1, round(fraction * len(ordered) + 0.5))
    return ordered[min(rank, len(ordered)) - 1]


def summary_ms(values: list[float]) -> dict[str, float]:
    """p50, p99, mean and max of durations in seconds, as milliseconds."""
    return {
        "n": len(values),
        "p50_ms": round(percentile(values, 0.50) * 1000, 1),
        "p99_ms": round(percentile(values, 0.99) * 1000, 1),
        "mean_ms": round(statistics.fmean(values) * 1000, 1),
        "max_ms": round(max(values) * 1000, 1),
    }


@asynccontextmanager
async def served_controller(controller: FakeController) -> AsyncIterator[str]:
    """Serve `controller` over HTTP on loopback for the duration; yields its base URL."""
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve, controller)
        yield url
        nursery.cancel_scope.cancel()


def agent_config(vm_id: str, url: str, workdir: Path, **overrides: object) -> Config:
    values: dict[str, object] = {
        "vm_id": vm_id,
        "pool_id": "bench",
        "controller_endpoint": url,
        "runner_dir": workdir / "runner",
        "state_file": workdir / f"{vm_id}.json",
        "heartbeat_interval": 0.0,
    }
    values.update(overrides)
    return Config(**values)  # type: ignore[arg-type]


ROOT: Final = Path(__file__).resolve().parent.parent


def runtime_python(workdir: Path) -> Path:
    """An interpreter that can import MIGlet and its runtime dependencies and nothing else, as on a VM.

    The development environment holds more, and more changes what MIGlet's libraries import: hypercorn (the
    fake controller's server) brings in h2, and httpcore then imports its HTTP/2 support. This makes a venv
    without pip whose site-packages names, in a .pth file, a directory of links to the distributions MIGlet
    needs (read from its metadata) and the source tree.
    """
    venv, links = workdir / "runtime-venv", workdir / "runtime-site"
    python = venv / "bin" / "python"
    marker = venv / "complete"
    if not marker.exists():  # first use, or an earlier build was interrupted
        shutil.rmtree(venv, ignore_errors=True)
        shutil.rmtree(links, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        purelib = subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        links.mkdir()
        # Each distribution's top-level entries (a single-module one's bytecode is in the shared __pycache__).
        for dist in _runtime_distributions("miglet"):
            for top in {Path(str(file)).parts[0] for file in dist.files or ()}:
                target = Path(str(dist.locate_file(top)))
                if top != ".." and not (links / top).exists() and target.exists():
                    (links / top).symlink_to(target)
        (Path(purelib) / "miglet-runtime.pth").write_text(f"{links}\n{ROOT}\n")
        marker.touch()
    return python


def _runtime_distributions(name: str) -> list[metadata.Distribution]:
    """The distributions `name` needs to run, itself excluded, without extras."""
    found: dict[str, metadata.Distribution] = {}
    pending = [name]
    while pending:
        for line in metadata.distribution(pending.pop()).requires or ():
            requirement = Requirement(line)
            key = requirement.name.lower().replace("_", "-")
            if key in found or (requirement.marker and not requirement.marker.evaluate({"extra": ""})):
                continue
            found[key] = metadata.distribution(requirement.name)
            pending.append(requirement.name)
    return list(found.values())


@asynccontextmanager
async def registered_miglet(
    controller: FakeController,
    url: str,
    runner_dir: Path,
    workdir: Path,
    vm_id: str,
    command: list[str] | None = None,
) -> AsyncIterator[trio.Process]:
    """`python -m miglet` against `controller`, from the moment its runner is registered until the block ends;
    then it is stopped with SIGTERM (and killed if it does not stop within 30 s). It runs on `runtime_python`,
    unless `command` says otherwise (the standalone build)."""
    env = {
        **{key: value for key, value in os.environ.items() if not key.startswith("MIGLET_")},
        "MIGLET_VM_ID": vm_id,
        "MIGLET_POOL_ID": "bench",
        "MIGLET_CONTROLLER_ENDPOINT": url,
        "MIGLET_RUNNER_DIR": str(runner_dir),
        "MIGLET_STATE_FILE": str(workdir / f"{vm_id}.json"),
        "MIGLET_LOG_LEVEL": "warning",
    }
    process = await trio.lowlevel.open_process(
        command or [str(runtime_python(workdir)), "-m", "miglet"], env=env, stderr=subprocess.DEVNULL
    )
    try:
        while not controller.events_of(vm_id, "runner_registered"):
            await controller.request_arrived.wait()
        yield process
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(30):
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()


def raise_file_limit() -> None:
    """Many agents hold many sockets: lift the soft limit on open files to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise LookupError("VmRSS")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far."""
    return read_stat(pid).cpu_ticks / clock_ticks_per_second()


def machine_description() -> dict[str, str]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            model = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    kernel = subprocess.run(["uname", "-sr"], capture_output=True, text=True, check=False).stdout.strip()
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "python": sys.version.split()[0],
        "kernel": kernel,
    }
