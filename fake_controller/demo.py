"""`python -m fake_controller.demo`: the whole flow on one machine, for a person to watch.

It serves the fake controller, installs the fake runner in a temporary directory, starts `python -m miglet`
against them, gives the runner one job as soon as it is registered, and lets MIGlet finish: an ephemeral runner
leaves after its job and MIGlet stops by itself. The controller's view of the VM is printed as it happens.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio

from fake_controller.controller import FakeController, Settings
from fake_controller.fake_runner import enqueue_job, install
from fake_controller.server import serve

DEMO_TIMEOUT = 60.0


async def _demo(workdir: Path) -> int:
    runner_dir = install(workdir / "actions-runner")
    registered = trio.Event()

    def observe(vm_id: str, what: str, detail: dict[str, Any]) -> None:
        fields = " ".join(f"{key}={value}" for key, value in detail.items() if value not in (None, ""))
        print(f"  controller | {vm_id} {what} {fields}".rstrip(), flush=True)
        if what == "event runner_registered":
            registered.set()

    controller = FakeController(Settings(), observer=observe)
    with trio.fail_after(DEMO_TIMEOUT):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(serve, controller)
            print(f"demo: fake controller on {url}; fake runner in {runner_dir}", flush=True)
            env = {
                **os.environ,
                "MIGLET_VM_ID": "demo-vm-001",
                "MIGLET_POOL_ID": "demo-pool",
                "MIGLET_CONTROLLER_ENDPOINT": url,
                "MIGLET_RUNNER_DIR": str(runner_dir),
                "MIGLET_STATE_FILE": str(workdir / "state.json"),
                "MIGLET_LOG_FORMAT": os.environ.get("MIGLET_LOG_FORMAT", "text"),
            }
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "miglet"], env=env, stdin=subprocess.DEVNULL
            )
            await registered.wait()
            print("demo: runner registered; GitHub hands it a job", flush=True)
            enqueue_job(runner_dir, "build-and-test", "Succeeded", duration_s=1.0)
            code = await process.wait()
            nursery.cancel_scope.cancel()
    events = [event["type"] for event in controller.events_of("demo-vm-001")]
    print(f"demo: MIGlet exited with code {code}; the controller received: {', '.join(events)}", flush=True)
    return code


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="miglet-demo-") as workdir:
        return trio.run(_demo, Path(workdir))


if __name__ == "__main__":
    sys.exit(main())
