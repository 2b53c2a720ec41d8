"""MIGlet as a real process: `python -m miglet` against the fake controller over HTTP, with the fake runner.

Rules: real clock, 127.0.0.1 with port 0, a hard `trio.fail_after` on every test; waits are on MIGlet's own
JSON log lines and the controller's record, never sleeps. Each test checks that no runner process is left.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from fake_controller import FakeController, Settings
from fake_controller.fake_runner import Behaviour, encode_jitconfig, enqueue_job, install, read_calls
from fake_controller.faults import Fault
from fake_controller.server import serve
from miglet.runner.process import _session_members, kill_session
from miglet.statefile import read_state_file

TIMEOUT = 30
SEED_LINES = [
    "Controller acknowledgment received, transitioning to ready state",
    "MIGlet is ready - polling controller for registration config",
    "Received register_runner command from controller",
    "Registration config received, transitioning to registering runner",
]


class Miglet:
    """A running `python -m miglet` whose JSON log lines can be awaited."""

    def __init__(self, process: trio.Process, state_file: Path) -> None:
        self.process = process
        self.state_file = state_file
        self.records: list[dict[str, Any]] = []
        self.raw = bytearray()
        self.log_ended = False
        self._changed = trio.Event()

    async def read_logs(self) -> None:
        assert self.process.stderr is not None
        buffer = b""
        async for chunk in self.process.stderr:
            self.raw += chunk
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                try:
                    self.records.append(msgspec.json.decode(line))
                except msgspec.DecodeError:
                    # Not MIGlet's JSON (a stray warning, say): kept for the assertions that search the text.
                    self.records.append({"msg": line.decode(errors="replace"), "raw": True})
            self._changed.set()
            self._changed = trio.Event()
        self.log_ended = True
        self._changed.set()

    def messages(self) -> list[str]:
        return [record["msg"] for record in self.records]

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        while True:
            for record in self.records:
                if predicate(record):
                    return record
            if self.log_ended:  # it exited (or died): no point waiting out the test's deadline
                raise AssertionError(f"MIGlet's log ended without the line awaited: {self.messages()[-5:]}")
            await self._changed.wait()

    async def wait_state(self, state: str) -> None:
        await self.wait_for(lambda record: record.get("to") == state)


@asynccontextmanager
async def miglet_against(
    tmp_path: Path,
    controller: FakeController,
    *,
    behaviour: Behaviour | None = None,
    runner_dir: Path | None = None,
    env: dict[str, str] | None = None,
    python: str = sys.executable,
    user: str | None = None,
    command: list[str] | None = None,
) -> AsyncIterator[tuple[Miglet, Path]]:
    runner_dir = runner_dir or install(tmp_path / "runner", behaviour)
    state_file = tmp_path / "state" / "state.json"
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve, controller)
        environment = {
            "PATH": os.environ["PATH"] if command is None else "/usr/bin:/bin",
            "MIGLET_VM_ID": "vm-123",
            "MIGLET_POOL_ID": "pool-001",
            "MIGLET_CONTROLLER_ENDPOINT": url,
            "MIGLET_RUNNER_DIR": str(runner_dir),
            "MIGLET_STATE_FILE": str(state_file),
            "MIGLET_LOG_FORMAT": "json",
            **(env or {}),
        }
        as_user: dict[str, Any] = {} if user is None else {"user": user, "group": user_group(user), "extra_groups": []}
        process = await trio.lowlevel.open_process(
            command or [python, "-m", "miglet"],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            **as_user,
        )
        miglet = Miglet(process, state_file)
        nursery.start_soon(miglet.read_logs)
        try:
            yield miglet, runner_dir
            await process.wait()
            no_runner_left(runner_dir)
        finally:
            if process.returncode is None:
                # Shielded: this also runs when the test's deadline has cancelled everything.
                with trio.CancelScope(shield=True):
                    process.kill()
                    await process.wait()
            # A MIGlet killed (here, or by a signal it should have handled) cannot stop its runner: do it here, so
            # no failed test leaves one behind. After a passing test there is nothing left to kill.
            for call in read_calls(runner_dir):
                kill_session(call["sid"])
        nursery.cancel_scope.cancel()


def user_group(user: str) -> int:
    return pwd.getpwnam(user).pw_gid


def no_runner_left(runner_dir: Path) -> None:
    sessions = {call["sid"] for call in read_calls(runner_dir)}
    for sid in sessions:
        assert _session_members(sid) == [], f"runner processes left in session {sid}"


async def test_seed_controller_registration_idle_and_sigterm(tmp_path: Path) -> None:
    # A controller that does only what the seed says: no long-poll.
    controller = FakeController(Settings(long_poll=False))
    controller.faults.script("events", [Fault(status=503)])
    with trio.fail_after(TIMEOUT):
        async with miglet_against(tmp_path, controller, env={"MIGLET_POLL_INTERVAL": "0.2"}) as (miglet, runner_dir):
            await miglet.wait_state("Idle")
            assert read_state_file(miglet.state_file).state == "Idle"
            miglet.process.send_signal(signal.SIGTERM)
        assert miglet.process.returncode == 0
    assert [message for message in miglet.messages() if message in SEED_LINES] == SEED_LINES
    requests = controller.requests
    assert requests[0].path == "/api/v1/vms/vm-123/events"
    assert msgspec.json.decode(requests[0].body)["type"] == "vm_started"
    # The first vm_started was refused (503): no poll until the retry was acknowledged.
    first_poll = next(i for i, request in enumerate(requests) if request.path.endswith("/commands"))
    assert [request.path.rsplit("/", 1)[1] for request in requests[: first_poll + 1]] == [
        "events",
        "events",
        "commands",
    ]
    configure_calls = [call for call in read_calls(runner_dir) if call["cmd"] == "configure"]
    [configure] = configure_calls
    assert configure["argv"] == [
        "configure",
        "--unattended",
        "--url",
        controller.settings.runner_url,
        "--name",
        "vm-123",
        "--labels",
        "self-hosted,linux,x64",
        "--runnergroup",
        "default",
        "--work",
        "_work",
        "--replace",
        "--ephemeral",
    ]
    assert configure["token_source"] == "env"
    assert [call["cmd"] for call in read_calls(runner_dir)].count("run") == 1
    assert read_state_file(miglet.state_file).state == "Stopped"
    assert "Traceback" not in miglet.raw.decode()
    no_runner_left(runner_dir)
    # Nothing MIGlet wrote holds the registration token.
    token = controller.vm("vm-123").registration_token
    assert token is not None
    assert token.encode() not in miglet.raw
    assert token not in miglet.state_file.read_text()


async def test_ephemeral_job_then_miglet_exits_by_itself(tmp_path: Path) -> None:
    controller = FakeController()
    with trio.fail_after(TIMEOUT):
        async with miglet_against(tmp_path, controller) as (miglet, runner_dir):
            await miglet.wait_state("Idle")
            enqueue_job(runner_dir, "build", "Succeeded")
        assert miglet.process.returncode == 0
    assert [event["type"] for event in controller.events_of("vm-123")] == [
        "vm_started",
        "runner_registered",
        "job_started",
        "job_identified",
        "job_completed",
        "runner_exited",
        "vm_stopping",
    ]
    runner_lines = [record["msg"] for record in miglet.records if record.get("source") == "runner"]
    assert any(line.endswith("Listening for Jobs") for line in runner_lines)
    # Phase timings, from the start of the process, in the order the phases happen.
    timings = controller.events_of("vm-123", "runner_registered")[0]["timings"]
    names = ["acknowledged_s", "command_received_s", "configured_s", "listening_s"]
    assert list(timings) == names  # no warmup: the registration came as soon as the VM was Ready
    assert 0 < timings["acknowledged_s"] <= timings["command_received_s"] <= timings["configured_s"]
    assert timings["configured_s"] <= timings["listening_s"] < TIMEOUT
    no_runner_left(runner_dir)


async def test_sigterm_during_a_job_cancels_it_within_the_grace(tmp_path: Path) -> None:
    controller = FakeController()
    with trio.fail_after(TIMEOUT):
        async with miglet_against(tmp_path, controller, env={"MIGLET_SHUTDOWN_GRACE": "10"}) as (miglet, runner_dir):
            await miglet.wait_state("Idle")
            enqueue_job(runner_dir, "long", duration_s=600)
            await miglet.wait_state("Busy")
            stop_sent = trio.current_time()
            miglet.process.send_signal(signal.SIGTERM)
        assert miglet.process.returncode == 0
        assert trio.current_time() - stop_sent < 10
    runner_lines = [record["msg"] for record in miglet.records if record.get("source") == "runner"]
    assert any(line.endswith("Job long completed with result: Canceled") for line in runner_lines)
    [stopping] = controller.events_of("vm-123", "vm_stopping")
    assert stopping["reason"] == "signal"
    [completed] = controller.events_of("vm-123", "job_completed")
    assert (completed["job_name"], completed["result"]) == ("long", "Canceled")
    no_runner_left(runner_dir)


async def wait_for_events(controller: FakeController, event_type: str, count: int = 1) -> list[dict[str, Any]]:
    while len(events := controller.events_of("vm-123", event_type)) < count:
        await controller.request_arrived.wait()
    return events


async def test_heartbeats_and_status_while_idle(tmp_path: Path) -> None:
    controller = FakeController()
    with trio.fail_after(TIMEOUT):
        async with miglet_against(tmp_path, controller, env={"MIGLET_HEARTBEAT_INTERVAL": "0.5"}) as (miglet, _):
            await miglet.wait_state("Idle")
            beats = await wait_for_events(controller, "heartbeat", 2)
            status = await trio.run_process(
                [sys.executable, "-m", "miglet", "status"],
                env={"PATH": os.environ["PATH"], "MIGLET_STATE_FILE": str(miglet.state_file)},
                capture_stdout=True,
                check=False,
            )
            miglet.process.send_signal(signal.SIGTERM)
    assert status.returncode == 0
    assert status.stdout.decode().startswith("Idle since ")
    assert {beat["state"] for beat in beats} <= {"Ready", "RegisteringRunner", "Idle"}
    assert all(beat["uptime_s"] > 0 for beat in beats)


async def test_shutdown_command_while_idle(tmp_path: Path) -> None:
    controller = FakeController()
    with trio.fail_after(TIMEOUT):
        async with miglet_against(tmp_path, controller, env={"MIGLET_POLL_INTERVAL": "0.2"}) as (miglet, runner_dir):
            await miglet.wait_state("Idle")
            controller.enqueue("vm-123", {"type": "shutdown", "parameters": {"reason": "scale-in"}})
        assert miglet.process.returncode == 0
    [stopping] = controller.events_of("vm-123", "vm_stopping")
    assert (stopping["reason"], stopping["runner_name"]) == ("scale-in", "vm-123")
    runner_lines = [record["msg"] for record in miglet.records if record.get("source") == "runner"]
    assert "Exiting..." in runner_lines  # the runner's own answer to SIGINT
    no_runner_left(runner_dir)


async def test_sigterm_during_config_sh(tmp_path: Path) -> None:
    controller = FakeController()
    runner_behaviour = Behaviour(configure_delay_s=60)
    with trio.fail_after(TIMEOUT):
        async with miglet_against(tmp_path, controller, behaviour=runner_behaviour) as (miglet, runner_dir):
            await miglet.wait_for(lambda record: record["msg"] == "Configuring the runner")
            await miglet.wait_for(lambda record: record["msg"].startswith("# Authentication"))
            miglet.process.send_signal(signal.SIGTERM)
        assert miglet.process.returncode == 0
    assert read_state_file(miglet.state_file).state == "Stopped"
    no_runner_left(runner_dir)


async def test_jit_config_runs_without_config_sh(tmp_path: Path) -> None:
    controller = FakeController(Settings(send_registration=False))
    with trio.fail_after(TIMEOUT):
        async with miglet_against(tmp_path, controller) as (miglet, runner_dir):
            await miglet.wait_state("Ready")
            jit = encode_jitconfig(name="vm-123", url=controller.settings.runner_url)
            controller.enqueue(
                "vm-123",
                {
                    "type": "register_runner",
                    "parameters": {"jit_config": jit, "runner_url": controller.settings.runner_url},
                },
            )
            await miglet.wait_state("Idle")
            enqueue_job(runner_dir, "build")
        assert miglet.process.returncode == 0
    calls = read_calls(runner_dir)
    assert [call["cmd"] for call in calls if call["cmd"] != "warmup"] == ["run"]
    assert calls[0]["jitconfig_source"] == "env"
    assert all(jit not in arg for arg in calls[0]["argv"])
    assert jit.encode() not in miglet.raw


async def test_faulty_controller_and_bad_commands(tmp_path: Path) -> None:
    controller = FakeController(Settings(send_registration=False))
    controller.faults.script("events", [Fault(status=503), Fault(status=503, retry_after="1"), Fault(status=500)])
    controller.faults.script("commands", [Fault(status=500), Fault(kind="malformed"), Fault(kind="wrong_shape")])
    rejected_token = "AHTREJECTEDBYGITHUB000000001"
    expired = controller.registration_command("vm-123") | {"id": "expired"}
    expired["parameters"] = expired["parameters"] | {"expires_at": "2024-01-15T11:30:00Z"}
    rejected = controller.registration_command("vm-123") | {"id": "rejected"}
    rejected["parameters"] = rejected["parameters"] | {"registration_token": rejected_token}
    good = controller.registration_command("vm-123") | {"id": "good"}
    malformed = {"id": "malformed", "type": "register_runner", "parameters": {"labels": "x64"}}
    for command in (malformed, expired, rejected, good, good):
        controller.enqueue("vm-123", command)
    behaviour = Behaviour(reject_tokens=(rejected_token,))
    env = {"MIGLET_POLL_INTERVAL": "0.2", "MIGLET_RETRY_BASE": "0.05"}
    with trio.fail_after(TIMEOUT):
        async with miglet_against(tmp_path, controller, behaviour=behaviour, env=env) as (miglet, runner_dir):
            await miglet.wait_state("Idle")
            miglet.process.send_signal(signal.SIGTERM)
        assert miglet.process.returncode == 0
    started = [msgspec.json.decode(r.body) for r in controller.requests_to("/events")][:4]
    assert [event["type"] for event in started] == ["vm_started"] * 4
    assert len({event["event_id"] for event in started}) == 1
    configured = [call["token"] for call in read_calls(runner_dir) if call["cmd"] == "configure"]
    assert configured == [rejected_token, good["parameters"]["registration_token"]]
    failures = [(e["command_id"], e["reason"]) for e in controller.events_of("vm-123", "registration_failed")]
    assert failures == [
        ("malformed", "invalid_command"),
        ("expired", "token_expired"),
        ("rejected", "configure_failed"),
    ]
    assert len(controller.events_of("vm-123", "runner_registered")) == 1
    log_text = miglet.raw.decode()
    assert "Traceback" not in log_text
    assert '"level":"error"' in log_text  # the failures were logged as such
    no_runner_left(runner_dir)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
async def test_unprivileged_runner_and_no_secret_anywhere(tmp_path: Path) -> None:
    # pytest's tmp_path is private to root; the runner user needs a directory it can reach.
    base = Path(tempfile.mkdtemp(prefix="miglet-e2e-"))
    base.chmod(0o755)
    controller_token = "ctl-secret-token-0123456789"
    try:
        runner_dir = install(base / "runner", python="/usr/bin/python3", owner="nobody")
        controller = FakeController()
        env = {"MIGLET_RUNNER_USER": "nobody", "MIGLET_CONTROLLER_TOKEN": controller_token}
        with trio.fail_after(TIMEOUT):
            async with miglet_against(tmp_path, controller, runner_dir=runner_dir, env=env) as (miglet, _):
                await miglet.wait_state("Idle")
                enqueue_job(runner_dir, "build")
            assert miglet.process.returncode == 0
        calls = read_calls(runner_dir)
    finally:
        shutil.rmtree(base)
    # The warmup, if it got as far as starting before the registration stopped it, ran as the runner's user too.
    assert [call["cmd"] for call in calls if call["cmd"] != "warmup"] == ["configure", "run"]
    assert all(call["uid"] != 0 for call in calls)
    assert all(call["env_runasroot"] is None for call in calls)
    assert all(r.headers["authorization"] == f"Bearer {controller_token}" for r in controller.requests)
    registration_token = controller.vm("vm-123").registration_token
    assert registration_token is not None
    written = bytes(miglet.raw) + miglet.state_file.read_bytes()
    for secret in (controller_token, registration_token):
        assert secret.encode() not in written


async def test_an_ephemeral_runner_that_loses_its_job_still_ends_the_vm(tmp_path: Path) -> None:
    # The real runner can print "Running job" and never a result (GitHub took the job back before the runner
    # renewed it), then leave as after any job: the controller hears the job end, and the VM is done.
    controller = FakeController()
    with trio.fail_after(TIMEOUT):
        async with miglet_against(tmp_path, controller) as (miglet, runner_dir):
            await miglet.wait_state("Idle")
            enqueue_job(runner_dir, "build", lost=True)
        assert miglet.process.returncode == 0
    assert [event["type"] for event in controller.events_of("vm-123")] == [
        "vm_started",
        "runner_registered",
        "job_started",
        "job_identified",
        "job_completed",
        "runner_exited",
        "vm_stopping",
    ]
    [completed] = controller.events_of("vm-123", "job_completed")
    assert (completed["job_name"], completed["result"]) == ("build", "Abandoned")
    [exited] = controller.events_of("vm-123", "runner_exited")
    assert (exited["exit_code"], exited["reason"]) == (0, "job_done")


async def test_a_second_sigterm_cuts_the_grace_short(tmp_path: Path) -> None:
    controller = FakeController()
    behaviour = Behaviour(ignore_sigint=True)
    env = {"MIGLET_SHUTDOWN_GRACE": "600"}
    with trio.fail_after(TIMEOUT):
        async with miglet_against(tmp_path, controller, behaviour=behaviour, env=env) as (miglet, runner_dir):
            await miglet.wait_state("Idle")
            miglet.process.send_signal(signal.SIGTERM)
            await miglet.wait_for(lambda record: record["msg"] == "Stopping the runner")
            miglet.process.send_signal(signal.SIGTERM)
        assert miglet.process.returncode == 0
    messages = miglet.messages()
    assert "Second signal: killing the runner now" in messages
    assert "The runner did not stop within its grace period; killing it" in messages
    no_runner_left(runner_dir)


async def test_a_signal_during_a_commanded_stop_cuts_the_grace_but_still_finishes(tmp_path: Path) -> None:
    controller = FakeController()
    shutdown = {"type": "shutdown", "parameters": {"grace_period_s": 600, "remove_token": "AHTREMOVETOKEN000001"}}
    with trio.fail_after(TIMEOUT):
        behaviour = Behaviour(ignore_sigint=True)
        async with miglet_against(tmp_path, controller, behaviour=behaviour) as (miglet, runner_dir):
            await miglet.wait_state("Idle")
            controller.enqueue("vm-123", shutdown)
            await miglet.wait_for(lambda record: record["msg"] == "Stopping the runner")
            miglet.process.send_signal(signal.SIGTERM)
        assert miglet.process.returncode == 0
    messages = miglet.messages()
    assert "Signal while stopping: killing the runner now" in messages
    assert "The runner did not stop within its grace period; killing it" in messages
    # The rest of the stop is not cut: the runner is removed and every event delivered.
    assert "Runner removed" in messages
    assert [call["cmd"] for call in read_calls(runner_dir)][-1] == "remove"
    assert [event["type"] for event in controller.events_of("vm-123")][-2:] == ["vm_stopping", "runner_exited"]
    assert "Stopping with undelivered events" not in messages


async def test_a_runner_left_by_an_earlier_miglet_is_stopped(tmp_path: Path) -> None:
    runner_dir = install(tmp_path / "runner")
    leftover = await trio.lowlevel.open_process(["sleep", "600"], cwd=runner_dir, start_new_session=True)
    bystander = await trio.lowlevel.open_process(["sleep", "600"], cwd=tmp_path, start_new_session=True)
    state_file = tmp_path / "state" / "state.json"
    stale = {
        "state": "Idle",
        "since": "",
        "updated_at": "",
        "vm_id": "vm-123",
        "pool_id": "p",
        "runner_name": "r",
        "job": None,
        "pid": os.getpid(),  # a pid, but not the new MIGlet's
        "version": "0",
        "runner_pid": leftover.pid,
    }
    state_file.parent.mkdir()
    state_file.write_bytes(msgspec.json.encode(stale))
    try:
        with trio.fail_after(TIMEOUT):
            async with miglet_against(tmp_path, FakeController(), runner_dir=runner_dir) as (miglet, _):
                await miglet.wait_state("Idle")
                with trio.fail_after(5):
                    await leftover.wait()  # killed before MIGlet started its own runner
                miglet.process.send_signal(signal.SIGTERM)
        assert "Killed a runner left running by an earlier MIGlet" in miglet.messages()
        assert bystander.poll() is None  # not working in the runner directory: left alone
    finally:
        with trio.CancelScope(shield=True):
            for process in (leftover, bystander):
                process.kill()
                await process.wait()


async def test_the_runner_of_an_agent_still_running_with_the_same_state_file_is_left_alone(tmp_path: Path) -> None:
    runner_dir = install(tmp_path / "runner")
    other_runner = await trio.lowlevel.open_process(["sleep", "600"], cwd=runner_dir, start_new_session=True)
    state_file = tmp_path / "state" / "state.json"
    live = {
        "state": "Busy",
        "since": "",
        "updated_at": datetime.now(UTC).isoformat(),
        "vm_id": "vm-123",
        "pool_id": "p",
        "runner_name": "r",
        "job": "build",
        "pid": os.getpid(),  # alive, and its file fresh: another agent at work
        "version": "0",
        "runner_pid": other_runner.pid,
    }
    state_file.parent.mkdir()
    state_file.write_bytes(msgspec.json.encode(live))
    try:
        with trio.fail_after(TIMEOUT):
            async with miglet_against(tmp_path, FakeController(), runner_dir=runner_dir) as (miglet, _):
                await miglet.wait_for(lambda record: record["msg"].startswith("Another MIGlet is running"))
                miglet.process.send_signal(signal.SIGTERM)
        assert other_runner.poll() is None
    finally:
        with trio.CancelScope(shield=True):
            other_runner.kill()
            await other_runner.wait()
