"""MIGlet as a real process keeps its runner in hand: nothing the runner starts outlives it, a restarted MIGlet
stops a `config.sh` its predecessor left, stop signals never change the exit code, and a job running as MIGlet's
own user cannot read MIGlet's environment.

Rules: as in test_end_to_end (whose helpers these are): real clock, 127.0.0.1 with port 0, a hard
`trio.fail_after` on every test, waits on MIGlet's JSON log lines and the controller's record, never on sleeps.
Every process the fake runner leaves behind on purpose is killed when the test ends, whatever happened.
"""

from __future__ import annotations

import importlib.metadata
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from packaging.requirements import Requirement

from fake_controller import FakeController, Settings
from fake_controller.fake_runner import (
    Behaviour,
    enqueue_job,
    hopping,
    install,
    read_calls,
    read_left_behind,
    stop_hopping,
)
from miglet.procfs import read_stat
from miglet.runner.process import _session_members
from tests.test_end_to_end import TIMEOUT, Miglet, miglet_against

STORM = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP) * 10
SYSTEM_PYTHON = "/usr/bin/python3"


def still_running(record: dict[str, Any]) -> bool:
    """Whether a process the fake runner left behind (as recorded) still runs."""
    try:
        stat = read_stat(record["pid"])
    except (OSError, ValueError):
        return False
    return stat.alive and stat.start_ticks == record["start_ticks"]


@pytest.fixture
def left_behind_killed() -> Iterator[list[Path]]:
    """Runner directories whose left-behind processes are killed at the end, if anything left them alive."""
    runner_dirs: list[Path] = []
    yield runner_dirs
    for runner_dir in runner_dirs:
        for record in read_left_behind(runner_dir):
            if still_running(record):
                os.kill(record["pid"], signal.SIGKILL)


def storm(miglet: Miglet) -> None:
    for signum in STORM:
        if miglet.process.returncode is None:
            miglet.process.send_signal(signum)


async def test_what_the_runner_leaves_behind_is_killed_and_counted(
    tmp_path: Path, left_behind_killed: list[Path]
) -> None:
    controller = FakeController()
    # A sloppy config.sh leaves a daemon; a hostile job leaves one of each kind, one still holding the runner's
    # output open.
    behaviour = Behaviour(configure_leaves_behind=("double-fork",))
    with trio.fail_after(TIMEOUT):
        async with miglet_against(tmp_path, controller, behaviour=behaviour) as (miglet, runner_dir):
            left_behind_killed.append(runner_dir)
            await miglet.wait_state("Idle")
            enqueue_job(runner_dir, "hostile", duration_s=600, leave_behind=("setsid", "double-fork"))
            await miglet.wait_state("Busy")
            miglet.process.send_signal(signal.SIGTERM)
        assert miglet.process.returncode == 0
    by_configure, *by_job = read_left_behind(runner_dir)
    assert (by_configure["by"], [record["by"] for record in by_job]) == ("configure", ["job hostile"] * 2)
    assert not any(still_running(record) for record in [by_configure, *by_job])
    killed = {record["pid"]: record["command"] for record in miglet.records if record["msg"] == KILLED}
    assert killed == {record["pid"]: "sleep" for record in [by_configure, *by_job]}
    # config.sh's leftover went when config.sh ended; the job's, when run.sh did.
    [exited] = controller.events_of("vm-123", "runner_exited")
    assert (exited["reason"], exited["killed_processes"]) == ("stopped", 2)


KILLED = "Killed a process the runner left behind"


async def test_a_leftover_that_keeps_starting_copies_of_itself_is_stopped_and_killed(tmp_path: Path) -> None:
    controller = FakeController()
    runner_dir = install(tmp_path / "runner")
    try:
        with trio.fail_after(TIMEOUT):
            async with miglet_against(tmp_path, controller, runner_dir=runner_dir) as (miglet, _):
                await miglet.wait_state("Idle")
                enqueue_job(runner_dir, "hostile", duration_s=0.5, leave_behind=("hop",))
        assert miglet.process.returncode == 0
        # Each copy lives for a moment only, and the next is already running: look again and again.
        assert not any(hopping(runner_dir) for _ in range(50))
        [exited] = controller.events_of("vm-123", "runner_exited")
        assert exited["killed_processes"] >= 1
    finally:
        stop_hopping(runner_dir)


async def test_sighup_stops_miglet_gracefully(tmp_path: Path) -> None:
    controller = FakeController()
    with trio.fail_after(TIMEOUT):
        async with miglet_against(tmp_path, controller) as (miglet, _):
            await miglet.wait_state("Idle")
            miglet.process.send_signal(signal.SIGHUP)
        assert miglet.process.returncode == 0
    assert [event["type"] for event in controller.events_of("vm-123")][-2:] == ["vm_stopping", "runner_exited"]
    [stopping] = controller.events_of("vm-123", "vm_stopping")
    assert stopping["reason"] == "signal"
    [exited] = controller.events_of("vm-123", "runner_exited")
    assert (exited["reason"], exited["killed_processes"]) == ("stopped", 0)
    assert "Exiting..." in [record["msg"] for record in miglet.records if record.get("source") == "runner"]


async def test_a_restarted_miglet_stops_the_config_sh_its_predecessor_left(tmp_path: Path) -> None:
    behaviour = Behaviour(configure_delay_s=600)
    with trio.fail_after(TIMEOUT):
        async with miglet_against(tmp_path, FakeController(), behaviour=behaviour) as (first, runner_dir):
            await first.wait_for(lambda record: record["msg"].startswith("# Authentication"))
            first.process.kill()  # the OOM killer, say: config.sh goes on, in its own session
            await first.process.wait()
            [configure] = read_calls(runner_dir)
            config_sh = configure["sid"]  # the session config.sh leads
            assert _session_members(config_sh)
            idle = FakeController(Settings(send_registration=False))
            async with miglet_against(tmp_path, idle, runner_dir=runner_dir) as (second, _):
                await second.wait_state("Ready")
                second.process.send_signal(signal.SIGTERM)
            assert second.process.returncode == 0
    [killed] = [
        record for record in second.records if record["msg"] == "Killed a runner left running by an earlier MIGlet"
    ]
    assert killed["pid"] == config_sh
    assert _session_members(config_sh) == []


async def test_a_signal_storm_at_start_up_still_ends_in_an_orderly_stop(tmp_path: Path) -> None:
    controller = FakeController()
    with trio.fail_after(TIMEOUT):
        async with miglet_against(tmp_path, controller) as (miglet, _):
            # Logged before the agent starts listening for signals.
            await miglet.wait_for(lambda record: record["msg"] == "MIGlet starting")
            storm(miglet)
            await miglet.wait_for(lambda record: record["msg"] == "MIGlet stopped")
            storm(miglet)
        assert miglet.process.returncode == 0
    assert "Traceback" not in miglet.raw.decode()
    assert miglet.records[-1]["msg"] == "MIGlet stopped"
    assert controller.events_of("vm-123", "vm_stopping")[0]["reason"] == "signal"


async def test_a_signal_storm_while_stopping_still_ends_in_an_orderly_stop(tmp_path: Path) -> None:
    controller = FakeController()
    env = {"MIGLET_SHUTDOWN_GRACE": "600"}
    with trio.fail_after(TIMEOUT):
        async with miglet_against(tmp_path, controller, env=env) as (miglet, _):
            await miglet.wait_state("Idle")
            storm(miglet)
            await miglet.wait_for(lambda record: record["msg"] == "Stopping the runner")
            storm(miglet)
            await miglet.wait_for(lambda record: record["msg"] == "Runner exited")
            storm(miglet)
            await miglet.wait_for(lambda record: record["msg"] == "MIGlet stopped")
            storm(miglet)  # the agent has stopped; the process has yet to exit
        assert miglet.process.returncode == 0
    assert "Traceback" not in miglet.raw.decode()
    assert "Second signal: killing the runner now" in miglet.messages()
    assert [event["type"] for event in controller.events_of("vm-123")][-2:] == ["vm_stopping", "runner_exited"]


def _runtime_copy(base: Path) -> Path:
    """MIGlet and the libraries it runs with, copied below `base` for a user who may not enter this checkout or
    its venv (a clone in a private directory, say); returns the directory to put on PYTHONPATH."""
    target = base / "python"
    shutil.copytree(ROOT / "miglet", target / "miglet", ignore=shutil.ignore_patterns("__pycache__"))
    seen: set[str] = set()
    wanted = list(_needed(importlib.metadata.requires("miglet")))
    while wanted:
        name = wanted.pop()
        if name in seen:
            continue
        seen.add(name)
        distribution = importlib.metadata.distribution(name)
        wanted += _needed(distribution.requires)
        for file in distribution.files or ():
            source = Path(str(distribution.locate_file(file)))
            if not file.parts[0].startswith("..") and source.is_file():
                (target / file).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target / file)
    return target


def _needed(requirements: list[str] | None) -> list[str]:
    """The distributions these requirements ask for on this Python, no extras."""
    needed = []
    for text in requirements or ():
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            needed.append(requirement.name.lower())
    return needed


def _system_python_runs_miglet(pythonpath: Path) -> bool:
    """Whether the system Python, as `nobody`, can import MIGlet and its dependencies from `pythonpath`."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return False
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import msgspec, trio, httpx, trio_util, miglet.cli"],
        env={"PYTHONPATH": str(pythonpath)},
        user="nobody",
        capture_output=True,
        check=False,
        timeout=30,
    )
    return probe.returncode == 0


ROOT = Path(__file__).resolve().parent.parent
READ_ENVIRON = """
import sys
try:
    with open(f"/proc/{sys.argv[1]}/environ", "rb") as handle:
        sys.stdout.buffer.write(handle.read())
except PermissionError:
    print("PermissionError")
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="running MIGlet and its reader as another user needs root")
async def test_a_job_of_miglets_own_user_cannot_read_its_environment(tmp_path: Path) -> None:
    # MIGlet and the runner share the user `nobody`, as in a container without a runner user of its own. The
    # interpreter is the system one (the venv's lives under /root); the code and libraries are copied where
    # nobody can read them.
    base = Path(tempfile.mkdtemp(prefix="miglet-dumpable-"))
    base.chmod(0o755)
    token = "ctl-secret-token-for-nobody-0123456789"
    try:
        pythonpath = _runtime_copy(base)
        if not _system_python_runs_miglet(pythonpath):
            pytest.skip(f"{SYSTEM_PYTHON} cannot import MIGlet and its libraries as nobody")
        runner_dir = install(base / "runner", python=SYSTEM_PYTHON, owner="nobody")
        (base / "state").mkdir()
        shutil.chown(base / "state", "nobody")
        env = {
            "PYTHONPATH": str(pythonpath),
            "PYTHONDONTWRITEBYTECODE": "1",
            "MIGLET_CONTROLLER_TOKEN": token,
            "MIGLET_STATE_FILE": str(base / "state" / "state.json"),
        }
        controller = FakeController()
        with trio.fail_after(TIMEOUT):
            async with miglet_against(
                tmp_path, controller, runner_dir=runner_dir, env=env, python=SYSTEM_PYTHON, user="nobody"
            ) as (miglet, _):
                await miglet.wait_state("Idle")
                reader = await trio.run_process(
                    [SYSTEM_PYTHON, "-c", READ_ENVIRON, str(miglet.process.pid)],
                    user="nobody",
                    group="nogroup",
                    extra_groups=[],
                    capture_stdout=True,
                )
                miglet.process.send_signal(signal.SIGTERM)
            assert miglet.process.returncode == 0
    finally:
        shutil.rmtree(base)
    assert reader.stdout.strip() == b"PermissionError"
    assert token.encode() not in reader.stdout
    # It also says that the runner shares its user.
    [warning] = [
        record for record in miglet.records if record["msg"].startswith("The runner runs as MIGlet's own user")
    ]
    assert warning["uid"] == pwd.getpwnam("nobody").pw_uid
