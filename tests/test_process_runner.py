"""The real-runner driver against the fake actions/runner, as real subprocesses.

Rules: real clock, every test under a hard `trio.fail_after`; waits are on the runner's own output lines
(through the line sink), never sleeps. The fake runner is installed in a temporary directory per test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from fake_controller.fake_runner import Behaviour, enqueue_job, install, read_calls
from miglet.runner import process
from miglet.runner.backend import ConfigureFailed, Exited, Grace, Line, Registration, RunEvent, Started
from miglet.runner.process import (
    RUNNER_CONFIG_FILES,
    ProcessRunner,
    _session_members,
    config_arguments,
    kill_session_and_wait,
)
from miglet.secret import Secret

TIMEOUT = 20
TOKEN = "AHTREGISTRATIONTOKEN0000001"


def registration(**overrides: Any) -> Registration:
    values: dict[str, Any] = {
        "command_id": "register-vm-123-1",
        "url": "https://github.com/org/repo",
        "name": "vm-123",
        "labels": ("self-hosted", "linux", "x64"),
        "group": "default",
        "ephemeral": True,
        "token": Secret(TOKEN),
    }
    values.update(overrides)
    return Registration(**values)


class Lines:
    """A line sink and a reader of a run's events that remembers everything and lets a test wait for a line."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []
        self.pids: list[int | None] = []
        self.exit_codes: list[int] = []
        self.killed: list[int | None] = []
        self._changed = trio.Event()

    def __call__(self, stream: str, line: str) -> None:
        self.lines.append((stream, line))
        self._changed.set()
        self._changed = trio.Event()

    async def run(self, runner: ProcessRunner, registration: Registration) -> None:
        """Run `runner`, reading its events as the runner supervisor does: to the end, even when cancelled."""
        send, receive = trio.open_memory_channel[RunEvent](0)

        async def run_backend() -> None:
            async with send:
                await runner.run(registration, send)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_backend)
            with trio.CancelScope(shield=True):
                async with receive:
                    async for event in receive:
                        match event:
                            case Started(pid=pid):
                                self.pids.append(pid)
                            case Line(stream=stream, text=text):
                                self(stream, text)
                            case Exited(exit_code=code, killed_processes=killed):
                                self.exit_codes.append(code)
                                self.killed.append(killed)

    def text(self) -> list[str]:
        return [line for _, line in self.lines]

    async def wait_for(self, predicate: Callable[[str], bool]) -> str:
        while True:
            for _, line in self.lines:
                if predicate(line):
                    return line
            await self._changed.wait()


@pytest.fixture
def runner_dir(tmp_path: Path) -> Path:
    return install(tmp_path / "runner")


def make_runner(
    runner_dir: Path,
    grace: float = 5.0,
    user: str | None = None,
    on_pid: Callable[[int | None], object] = lambda pid: None,
) -> ProcessRunner:
    environ = {
        **os.environ,
        "MIGLET_CONTROLLER_TOKEN": "controller-token-secret",
        "ACTIONS_RUNNER_INPUT_X": "1",
        "NOTIFY_SOCKET": "/run/systemd/notify",
    }
    stop_grace = Grace(grace)
    return ProcessRunner(runner_dir, grace=lambda: stop_grace, user=user, environ=environ, on_pid=on_pid)


def test_config_arguments_match_the_spec() -> None:
    assert config_arguments(registration()) == [
        "./config.sh",
        "--unattended",
        "--url",
        "https://github.com/org/repo",
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
    assert config_arguments(registration(ephemeral=False, disable_update=True))[-2:] == ["--replace", "--disableupdate"]


@pytest.mark.skipif(os.geteuid() != 0, reason="the runner-as-root path needs root")
async def test_configure_passes_the_token_only_through_the_environment(runner_dir: Path) -> None:
    lines = Lines()
    with trio.fail_after(TIMEOUT):
        await make_runner(runner_dir).configure(registration(), lines)
    [call] = read_calls(runner_dir)
    assert call["cmd"] == "configure"
    assert call["token"] == TOKEN
    assert call["token_source"] == "env"
    assert all(TOKEN not in arg for arg in call["argv"])
    assert call["argv"][:5] == ["configure", "--unattended", "--url", "https://github.com/org/repo", "--name"]
    assert call["env_runasroot"] == "1"  # these tests run as root
    assert "√ Settings Saved." in [line.strip() for line in lines.text()]
    assert (runner_dir / ".runner").exists()


async def test_runner_environment_drops_miglet_settings(runner_dir: Path, tmp_path: Path) -> None:
    dump = tmp_path / "env.txt"
    (runner_dir / "config.sh").write_text(f"#!/bin/bash\nenv > {dump}\n")
    with trio.fail_after(TIMEOUT):
        await make_runner(runner_dir).configure(registration(), Lines())
    env = dict(line.split("=", 1) for line in dump.read_text().splitlines() if "=" in line)
    assert env["ACTIONS_RUNNER_INPUT_TOKEN"] == TOKEN
    assert "MIGLET_CONTROLLER_TOKEN" not in env
    assert "ACTIONS_RUNNER_INPUT_X" not in env
    assert "NOTIFY_SOCKET" not in env


async def test_rejected_token_fails_with_the_runners_error(tmp_path: Path) -> None:
    runner_dir = install(tmp_path / "runner", Behaviour(reject_tokens=(TOKEN,)))
    with trio.fail_after(TIMEOUT), pytest.raises(ConfigureFailed) as caught:
        await make_runner(runner_dir).configure(registration(), Lines())
    assert "Http response code: NotFound" in str(caught.value)
    assert TOKEN not in str(caught.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="the runner-as-root path needs root")
async def test_root_refusal_without_allow_runasroot(runner_dir: Path) -> None:
    runner = make_runner(runner_dir)
    runner._env.pop("RUNNER_ALLOW_RUNASROOT")
    lines = Lines()
    # config.sh says why on stdout only; that is what the failure reports.
    with trio.fail_after(TIMEOUT), pytest.raises(ConfigureFailed, match="Must not run with sudo"):
        await runner.configure(registration(), lines)
    assert "Must not run with sudo" in lines.text()


async def test_clean_removes_every_configuration_file(runner_dir: Path) -> None:
    for name in RUNNER_CONFIG_FILES:
        (runner_dir / name).write_text("{}")
    await make_runner(runner_dir).clean()
    assert [name for name in RUNNER_CONFIG_FILES if (runner_dir / name).exists()] == []
    assert (runner_dir / "config.sh").exists()


async def test_missing_runner_directory_is_a_clear_failure(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT), pytest.raises(ConfigureFailed, match=r"cannot start \./config\.sh"):
        await make_runner(tmp_path / "absent").configure(registration(), Lines())


async def test_run_listens_runs_a_job_and_exits_when_ephemeral(runner_dir: Path) -> None:
    runner = make_runner(runner_dir)
    lines = Lines()
    with trio.fail_after(TIMEOUT):
        await runner.configure(registration(), Lines())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lines.run, runner, registration())
            await lines.wait_for(lambda line: line.endswith("Listening for Jobs"))
            enqueue_job(runner_dir, "build", "Succeeded")
    text = lines.text()
    assert any(line.endswith("Running job: build") for line in text)
    assert any(line.endswith("Job build completed with result: Succeeded") for line in text)
    [pid] = lines.pids
    assert pid is not None
    assert lines.exit_codes == [0]
    assert lines.killed == [0]  # it left nothing behind
    [run_call] = [call for call in read_calls(runner_dir) if call["cmd"] == "run"]
    assert run_call["env_manually_trap_sig"] == "1"
    assert _session_members(pid) == []


async def _cancel_during_job(runner_dir: Path, grace: float) -> tuple[Lines, int, float]:
    """Stop the runner mid-job; returns its lines, its session and how long the stop took."""
    runner = make_runner(runner_dir, grace=grace)
    lines = Lines()
    await runner.configure(registration(), Lines())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lines.run, runner, registration())
        await lines.wait_for(lambda line: line.endswith("Listening for Jobs"))
        enqueue_job(runner_dir, "long", duration_s=600)
        await lines.wait_for(lambda line: line.endswith("Running job: long"))
        cancelled_at = trio.current_time()
        nursery.cancel_scope.cancel()
    stop_took = trio.current_time() - cancelled_at
    [pid] = lines.pids
    assert pid is not None
    # Told of the exit even though the run was cancelled.
    assert len(lines.exit_codes) == 1
    return lines, pid, stop_took


async def test_cancel_stops_the_runner_gracefully_and_leaves_nothing(runner_dir: Path) -> None:
    with trio.fail_after(TIMEOUT):
        lines, sid, stop_took = await _cancel_during_job(runner_dir, grace=15)
    assert stop_took < 15
    assert any(line.endswith("Job long completed with result: Canceled") for line in lines.text())
    assert _session_members(sid) == []


async def test_a_runner_ignoring_sigint_is_killed_after_the_grace(tmp_path: Path) -> None:
    runner_dir = install(tmp_path / "runner", Behaviour(ignore_sigint=True))
    with trio.fail_after(TIMEOUT):
        lines, sid, stop_took = await _cancel_during_job(runner_dir, grace=0.5)
    assert stop_took >= 0.5
    assert not any("completed with result" in line for line in lines.text())
    assert _session_members(sid) == []
    assert lines.killed == [0]  # killed in stopping it: not left behind


async def test_every_runner_process_reports_its_pid_as_it_starts_and_ends(runner_dir: Path) -> None:
    # The state file records it, so that a MIGlet started after this one died can stop it, config.sh included.
    pids: list[int | None] = []
    runner = make_runner(runner_dir, on_pid=pids.append)
    lines = Lines()
    with trio.fail_after(TIMEOUT):
        await runner.configure(registration(), Lines())
        [configure] = read_calls(runner_dir)
        assert pids == [configure["sid"], None]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lines.run, runner, registration())
            await lines.wait_for(lambda line: line.endswith("Listening for Jobs"))
            assert pids[-1] == lines.pids[0]
            enqueue_job(runner_dir, "build")
    assert pids == [configure["sid"], None, lines.pids[0], None]


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
async def test_runs_as_the_runner_user() -> None:
    # pytest's tmp_path sits under a root-only directory; the runner user must be able to reach this one.
    base = Path(tempfile.mkdtemp(prefix="miglet-user-test-"))
    try:
        base.chmod(0o755)
        runner_dir = install(base / "runner", python="/usr/bin/python3", owner="nobody")
        with trio.fail_after(TIMEOUT):
            await make_runner(runner_dir, user="nobody").configure(registration(), Lines())
    finally:
        calls = read_calls(base / "runner")
        shutil.rmtree(base)
    [call] = calls
    assert call["uid"] != 0
    assert call["env_runasroot"] is None


def test_session_members_lists_only_that_session() -> None:
    assert os.getpid() in _session_members(os.getsid(0))
    assert _session_members(2**22 + 12345) == []


async def test_killing_a_session_waits_until_every_member_is_gone() -> None:
    # A leader and a member in a process group of its own, as the real run.sh and its listener.
    script = "set -m; sleep 600 & echo started; wait"
    with trio.fail_after(TIMEOUT):
        leader = await trio.lowlevel.open_process(
            ["bash", "-c", script], start_new_session=True, stdout=subprocess.PIPE
        )
        assert leader.stdout is not None
        assert await leader.stdout.receive_some() == b"started\n"
        assert len(_session_members(leader.pid)) == 2
        await kill_session_and_wait(leader.pid)
        assert _session_members(leader.pid) == []
        await leader.wait()


async def test_config_sh_gets_a_short_grace_of_its_own(runner_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (runner_dir / "config.sh").write_text("#!/bin/bash\ntrap '' INT\necho configuring\nsleep 600\n")
    monkeypatch.setattr(process, "CONFIG_SH_GRACE_S", 0.3)
    runner = make_runner(runner_dir, grace=600)  # the runner's own grace does not apply to config.sh
    lines = Lines()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner.remove, Secret("AHTREMOVETOKEN000001"), lines)
            await lines.wait_for(lambda line: line == "configuring")
            cancelled_at = trio.current_time()
            nursery.cancel_scope.cancel()
    assert 0.3 <= trio.current_time() - cancelled_at < 5


async def test_the_warmup_runs_once_at_the_lowest_priority_and_reports_whether_it_could(tmp_path: Path) -> None:
    runner_dir = install(tmp_path / "runner")
    backend = ProcessRunner(runner_dir, grace=lambda: Grace(1))
    with trio.fail_after(TIMEOUT):
        assert await backend.warmup()
    [call] = read_calls(runner_dir)
    assert (call["cmd"], call["argv"], call["nice"]) == ("warmup", ["warmup"], 19)
    (runner_dir / "bin" / "Runner.Listener").unlink()
    assert not await backend.warmup()  # nothing to warm up: not an error
