"""`python -m fake_controller.demo`: the whole flow on one machine, for a person to watch.

It serves the fake controller, installs the fake runner in a temporary directory, starts `python -m miglet`
against them, gives the runner one job as soon as it is registered, and lets MIGlet finish: an ephemeral runner
leaves after its job and MIGlet stops by itself. The controller's view of the VM is printed as it happens.

With `--preempt aws` (or gcp, azure) it also serves that cloud's fake metadata service on loopback, the job is a
long one, and once it runs the cloud gives notice that it takes the VM back: MIGlet tells the controller at once
(`vm_preempted`), lets the job run until the deadline less MIGLET_PREEMPTION_MARGIN, then stops it, so that it
ends `Canceled` and is reported.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio

from fake_controller.controller import FakeController, Settings
from fake_controller.fake_runner import enqueue_job, install
from fake_controller.metadata import PROVIDERS, FakeMetadata
from fake_controller.server import serve

DEMO_TIMEOUT = 60.0


# With --preempt: the notice's deadline, and the margin before it by which the job is stopped.
NOTICE_IN_S = 30.0
MARGIN_S = 25.0


async def _demo(workdir: Path, preempt: str | None) -> int:
    runner_dir = install(workdir / "actions-runner")
    registered = trio.Event()
    job_started = trio.Event()

    def observe(vm_id: str, what: str, detail: dict[str, Any]) -> None:
        fields = " ".join(f"{key}={value}" for key, value in detail.items() if value not in (None, ""))
        print(f"  controller | {vm_id} {what} {fields}".rstrip(), flush=True)
        if what == "event runner_registered":
            registered.set()
        if what == "event job_started":
            job_started.set()

    controller = FakeController(Settings(), observer=observe)
    with trio.fail_after(DEMO_TIMEOUT):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(serve, controller)
            print(f"demo: fake controller on {url}; fake runner in {runner_dir}", flush=True)
            # Not the caller's own MIGLET_ settings: the demo talks to its fakes on loopback and nothing else.
            inherited = {key: value for key, value in os.environ.items() if not key.startswith("MIGLET_")}
            env = {
                **inherited,
                "MIGLET_VM_ID": "demo-vm-001",
                "MIGLET_POOL_ID": "demo-pool",
                "MIGLET_CONTROLLER_ENDPOINT": url,
                "MIGLET_RUNNER_DIR": str(runner_dir),
                "MIGLET_STATE_FILE": str(workdir / "state.json"),
                "MIGLET_LOG_FORMAT": os.environ.get("MIGLET_LOG_FORMAT", "text"),
            }
            metadata = None
            if preempt is not None:
                metadata = FakeMetadata(preempt, vm_name="demo-vm-001")
                metadata_url = await nursery.start(serve, metadata)
                print(f"demo: fake {preempt} metadata service on {metadata_url}", flush=True)
                env |= {
                    "MIGLET_PREEMPTION": preempt,
                    "MIGLET_METADATA_ENDPOINT": metadata_url,
                    "MIGLET_PREEMPTION_MARGIN": str(MARGIN_S),
                }
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "miglet"], env=env, stdin=subprocess.DEVNULL
            )
            await registered.wait()
            print("demo: runner registered; GitHub hands it a job", flush=True)
            if metadata is None:
                enqueue_job(runner_dir, "build-and-test", "Succeeded", duration_s=1.0)
            else:
                enqueue_job(runner_dir, "long-build", "Succeeded", duration_s=600.0)
                await job_started.wait()
                print(f"demo: the cloud gives notice: the VM goes in {NOTICE_IN_S:g} s", flush=True)
                metadata.notice(
                    action="terminate",
                    preempted=True,
                    event_type="Preempt",
                    in_s=NOTICE_IN_S,
                    resources=["demo-vm-001"],
                )
            code = await process.wait()
            nursery.cancel_scope.cancel()
    events = [event["type"] for event in controller.events_of("demo-vm-001")]
    print(f"demo: MIGlet exited with code {code}; the controller received: {', '.join(events)}", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fake_controller.demo", description=__doc__)
    parser.add_argument("--preempt", choices=PROVIDERS, help="the cloud takes the VM back while the job runs")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="miglet-demo-") as workdir:
        return trio.run(_demo, Path(workdir), args.preempt)


if __name__ == "__main__":
    sys.exit(main())
