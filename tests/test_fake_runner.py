"""The fake actions/runner behaves like the real one where MIGlet can see it.

Plain synchronous tests: real bash scripts and the Python listener run as subprocesses; the tests wait
by reading output lines (with hard timeouts), never by sleeping.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fake_controller.fake_runner import (
    Behaviour,
    Job,
    encode_jitconfig,
    enqueue_job,
    install,
    read_calls,
    read_left_behind,
)
from miglet.procfs import read_entry

TIMEOUT = 15.0
TS = r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}Z"
URL = "https://github.com/fake-org/repo"
CONFIG_ARGS = ["--unattended", "--url", URL, "--name", "vm-1", "--labels", "a,b", "--runnergroup", "Default"]
CONFIG_ARGS += ["--work", "_work", "--replace"]


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without runner inputs, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACTIONS_RUNNER_", "RUNNER_"))}
    env.update(extra)
    return env


class Proc:
    """A subprocess in its own session whose stdout lines can be awaited."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str], user: str | None = None) -> None:
        self.popen = subprocess.Popen(
            args,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            user=user,
        )
        self.seen: list[str] = []
        self.stderr = ""
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._readers = [
            threading.Thread(target=self._read_out, daemon=True),
            threading.Thread(target=self._read_err, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_out(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            self._lines.put(raw.decode("utf-8").rstrip("\n"))
        self._lines.put(None)

    def _read_err(self) -> None:
        assert self.popen.stderr is not None
        self.stderr = self.popen.stderr.read().decode("utf-8")

    def expect(self, pattern: str) -> str:
        """Return the next stdout line matching `pattern` (regex search)."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                raise AssertionError(f"no line matching {pattern!r}; got {self.seen}; stderr {self.stderr!r}")
            self.seen.append(line)
            if re.search(pattern, line):
                return line

    def finish(self) -> int:
        """Wait for exit and for all output; returns the exit code."""
        code = self.popen.wait(timeout=TIMEOUT)
        for reader in self._readers:
            reader.join(timeout=TIMEOUT)
        while not self._lines.empty():
            line = self._lines.get_nowait()
            if line is not None:
                self.seen.append(line)
        return code

    def kill(self) -> None:
        """Kill everything in the session (helper/listener sit in another process group)."""
        for pid in session_pids(self.popen.pid):
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            try:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                # A killed process takes a moment to die: its pidfd turns readable when it has.
                select.select([pidfd], [], [], TIMEOUT)
            finally:
                os.close(pidfd)
        self.popen.wait(timeout=TIMEOUT)


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes whose session id is `sid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[3]) == sid:
                found.append(int(entry.name))
    return found


def run_sync(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False)


@pytest.fixture
def runner(tmp_path: Path) -> Path:
    return install(tmp_path / "runner")


def configure(runner: Path, *extra: str, token: str = "reg-token-1") -> subprocess.CompletedProcess[str]:
    env = clean_env(RUNNER_ALLOW_RUNASROOT="1", ACTIONS_RUNNER_INPUT_TOKEN=token)
    return run_sync(["./config.sh", *CONFIG_ARGS, *extra], runner, env)


_started: list[Proc] = []


@pytest.fixture(autouse=True)
def _no_runner_left_behind() -> Iterator[None]:
    """Whatever a test started, passed or failed, is gone when it ends."""
    yield
    while _started:
        proc = _started.pop()
        if proc.popen.poll() is None or session_pids(proc.popen.pid):
            proc.kill()


def start_run(runner: Path, **extra: str) -> Proc:
    env = clean_env(RUNNER_ALLOW_RUNASROOT="1", RUNNER_MANUALLY_TRAP_SIG="1", **extra)
    proc = Proc(["./run.sh"], runner, env)
    _started.append(proc)
    return proc


def test_install_lays_out_executable_scripts(runner: Path) -> None:
    for name in (
        "config.sh",
        "run.sh",
        "run-helper.sh.template",
        "env.sh",
        "safe_sleep.sh",
        "bin/Runner.Listener",
    ):
        assert os.access(runner / name, os.X_OK), name
    shim = (runner / "bin/Runner.Listener").read_text()
    assert "-m fake_runner.listener" in shim
    assert (runner / "bin/fake_runner/listener.py").is_file()
    assert json.loads((runner / "fake-runner.json").read_text())["version"] == Behaviour().version


def test_configure_takes_token_from_env_and_never_stores_it(runner: Path) -> None:
    done = configure(runner, "--ephemeral", "--disableupdate")
    assert done.returncode == 0, done.stderr
    assert "√ Connected to GitHub" in done.stdout
    assert "√ Runner successfully added" in done.stdout
    assert "√ Settings Saved." in done.stdout
    settings = json.loads((runner / ".runner").read_text(encoding="utf-8-sig"))
    assert settings["agentName"] == "vm-1"
    assert settings["gitHubUrl"] == URL
    assert settings["ephemeral"] is True
    assert settings["workFolder"] == "_work"
    for name in (".runner", ".credentials"):
        assert "reg-token-1" not in (runner / name).read_text(encoding="utf-8-sig")
    [call] = read_calls(runner)
    assert call["cmd"] == "configure"
    assert call["token"] == "reg-token-1"
    assert call["token_source"] == "env"
    assert "reg-token-1" not in call["argv"]
    assert call["env_runasroot"] == "1"


def test_rejected_token_fails_like_github_404(tmp_path: Path) -> None:
    runner = install(tmp_path / "runner", Behaviour(reject_tokens=("expired",)))
    done = configure(runner, token="expired")
    assert done.returncode == 1
    assert "Http response code: NotFound from 'POST https://api.github.com/actions/runner-registration'" in done.stderr
    assert done.stderr.rstrip().endswith("Response status code does not indicate success: 404 (Not Found).")
    assert not (runner / ".runner").exists()


def test_configure_failures(tmp_path: Path) -> None:
    runner = install(tmp_path / "runner", Behaviour(existing_runners=("taken",)))
    env = clean_env(RUNNER_ALLOW_RUNASROOT="1")
    no_token = run_sync(["./config.sh", *CONFIG_ARGS], runner, env)
    assert no_token.returncode == 1
    assert "Invalid configuration provided for token. Terminating unattended configuration." in no_token.stderr
    no_url = configure(runner, "--url", "")
    assert no_url.returncode == 1
    assert "Invalid configuration provided for url." in no_url.stderr

    env["ACTIONS_RUNNER_INPUT_TOKEN"] = "t"
    conflict = run_sync(["./config.sh", "--unattended", "--url", URL, "--name", "taken"], runner, env)
    assert conflict.returncode == 1
    assert "A runner exists with the same name" in conflict.stdout
    assert "A runner exists with the same name taken." in conflict.stderr
    replaced = run_sync(["./config.sh", "--unattended", "--url", URL, "--name", "taken", "--replace"], runner, env)
    assert replaced.returncode == 0, replaced.stderr
    assert "√ Successfully replaced the runner" in replaced.stdout
    again = configure(runner)
    assert again.returncode == 1
    assert "Cannot configure the runner because it is already configured." in again.stderr

    removed = run_sync(["./config.sh", "remove"], runner, env)
    assert removed.returncode == 0, removed.stderr
    assert "√ Runner removed successfully" in removed.stdout
    assert not (runner / ".runner").exists()
    assert not (runner / ".credentials").exists()
    assert read_calls(runner)[-1]["cmd"] == "remove"


def test_root_is_refused_without_runasroot(runner: Path) -> None:
    env = clean_env(ACTIONS_RUNNER_INPUT_TOKEN="t")
    done = run_sync(["./config.sh", *CONFIG_ARGS], runner, env)
    assert (done.returncode, done.stdout) == (1, "Must not run with sudo\n")
    ran = run_sync(["./run.sh"], runner, clean_env(RUNNER_MANUALLY_TRAP_SIG="1"))
    # like the real run.sh (trap mode), the helper's exit code 1 is lost: run.sh exits 0
    assert (ran.returncode, ran.stdout) == (0, "Must not run interactively with sudo\nExiting runner...\n")
    assert read_calls(runner) == []


@pytest.mark.skipif(not Path("/usr/bin/python3").exists() or os.getuid() != 0, reason="needs root + system python")
def test_configure_as_unprivileged_user() -> None:
    base = Path(tempfile.mkdtemp())
    try:
        base.chmod(0o755)
        runner = install(base / "runner", python="/usr/bin/python3", owner="nobody")
        env = clean_env(ACTIONS_RUNNER_INPUT_TOKEN="t")
        done = subprocess.run(
            ["./config.sh", *CONFIG_ARGS], cwd=runner, env=env, user="nobody", capture_output=True, text=True,
            timeout=TIMEOUT, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert read_calls(runner)[0]["uid"] == 65534
    finally:
        shutil.rmtree(base)


def test_run_unconfigured_fails(runner: Path) -> None:
    proc = start_run(runner)
    proc.expect(r"^Runner listener exit with terminated error, stop the service, no retry needed\.$")
    proc.expect(r"^Exiting runner\.\.\.$")
    assert proc.finish() == 0
    assert "An error occurred: Not configured. Run config.(sh/cmd) to configure the runner." in proc.stderr


def test_run_listens_runs_queued_job_and_stops_on_sigint(runner: Path) -> None:
    assert configure(runner).returncode == 0
    proc = start_run(runner)
    try:
        proc.expect(r"^√ Connected to GitHub$")
        proc.expect(r"^Current runner version: '2\.336\.0'$")
        proc.expect(rf"^{TS}: Listening for Jobs$")
        enqueue_job(runner, "build", "Failed", 0.05)
        proc.expect(rf"^{TS}: Running job: build$")
        proc.expect(rf"^{TS}: Job build completed with result: Failed$")
        call = read_calls(runner)[-1]
        assert call["cmd"] == "run"
        assert call["env_manually_trap_sig"] == "1"
        assert call["sid"] == proc.popen.pid  # same session as run.sh ...
        assert call["pgid"] != proc.popen.pid  # ... but its own process group (set -m)
        os.killpg(proc.popen.pid, signal.SIGINT)
        proc.expect(r"^Exiting\.\.\.$")
        proc.expect(r"^Runner listener exit with 0 return code")
        proc.expect(r"^Exiting runner\.\.\.$")
        assert proc.finish() == 0
    finally:
        if proc.popen.poll() is None:
            proc.kill()
    assert (runner / ".runner").exists()


def test_sigint_during_job_cancels_it(runner: Path) -> None:
    assert configure(runner, "--ephemeral").returncode == 0
    proc = start_run(runner)
    try:
        proc.expect(r"Listening for Jobs$")
        enqueue_job(runner, "long", "Succeeded", 60)
        proc.expect(r"Running job: long$")
        os.killpg(proc.popen.pid, signal.SIGINT)
        proc.expect(r"^Exiting\.\.\.$")
        proc.expect(rf"^{TS}: Job long completed with result: Canceled$")
        proc.expect(r"^Exiting runner\.\.\.$")
        assert proc.finish() == 0
    finally:
        if proc.popen.poll() is None:
            proc.kill()
    assert (runner / ".runner").exists(), "a cancelled ephemeral runner keeps its config"


def test_ephemeral_runner_exits_after_one_job(tmp_path: Path) -> None:
    runner = install(tmp_path / "runner", Behaviour(jobs=(Job("only", "SucceededWithIssues"), Job("never"))))
    assert configure(runner, "--ephemeral").returncode == 0
    proc = start_run(runner)
    proc.expect(r"Job only completed with result: SucceededWithIssues$")
    proc.expect(r"^√ Removed \.credentials$")
    proc.expect(r"^√ Removed \.runner$")
    proc.expect(r"^Exiting runner\.\.\.$")
    assert proc.finish() == 0
    assert not any("never" in line for line in proc.seen)
    assert not (runner / ".runner").exists()


def test_a_jobs_own_lines_are_printed_while_it_runs(tmp_path: Path) -> None:
    job = Job("chatty", duration_s=0.3, lines=("[WORKER] step 1", "[WORKER] step 2"))
    runner = install(tmp_path / "runner", Behaviour(jobs=(job,)))
    assert configure(runner, "--ephemeral").returncode == 0
    proc = start_run(runner)
    proc.expect(r"Running job: chatty$")
    proc.expect(r"^\[WORKER\] step 1$")
    proc.expect(r"^\[WORKER\] step 2$")
    proc.expect(r"Job chatty completed with result: Succeeded$")
    assert proc.finish() == 0


def test_jitconfig_from_env_replaces_configure(tmp_path: Path) -> None:
    runner = install(tmp_path / "runner", Behaviour(jobs=(Job("jit-job"),)))
    jit = encode_jitconfig("jit-runner", URL)
    proc = start_run(runner, ACTIONS_RUNNER_INPUT_JITCONFIG=jit)
    proc.expect(r"Job jit-job completed with result: Succeeded$")
    proc.expect(r"^Exiting runner\.\.\.$")
    assert proc.finish() == 0
    [call] = read_calls(runner)
    assert (call["jitconfig"], call["jitconfig_source"]) == (jit, "env")
    assert jit not in call["argv"]


def test_crash_after_listening_still_exits_zero(tmp_path: Path) -> None:
    runner = install(tmp_path / "runner", Behaviour(exit_after_listening=1))
    assert configure(runner).returncode == 0
    proc = start_run(runner)
    proc.expect(r"Listening for Jobs$")
    proc.expect(r"^Runner listener exit with terminated error")
    assert proc.finish() == 0


def test_ignore_sigint_needs_sigkill_of_the_whole_session(tmp_path: Path) -> None:
    runner = install(tmp_path / "runner", Behaviour(ignore_sigint=True))
    assert configure(runner).returncode == 0
    proc = start_run(runner)
    proc.expect(r"Listening for Jobs$")
    os.killpg(proc.popen.pid, signal.SIGINT)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.popen.wait(timeout=0.5)
    listener = read_calls(runner)[-1]["pid"]
    os.killpg(proc.popen.pid, signal.SIGKILL)  # run.sh's group only: the listener survives
    proc.popen.wait(timeout=TIMEOUT)
    assert listener in session_pids(proc.popen.pid)
    proc.kill()
    assert listener not in session_pids(proc.popen.pid)


def test_colour_always_matches_dotnet_terminal(tmp_path: Path) -> None:
    runner = install(tmp_path / "runner", Behaviour(colour="always", exit_after_listening=0))
    assert configure(runner).returncode == 0
    out = run_sync(["./run.sh"], runner, clean_env(RUNNER_ALLOW_RUNASROOT="1")).stdout
    assert "\x1b[92m√ \x1b[97mConnected to GitHub\n\x1b[39;49m\n" in out
    assert re.search(rf"\nCurrent runner version: '[\d.]+'\n{TS}: Listening for Jobs\n", out)


def test_a_hostile_job_leaves_processes_outside_the_runners_session(tmp_path: Path) -> None:
    job = Job("hostile", duration_s=600, leave_behind=("setsid", "double-fork"))
    runner = install(tmp_path / "runner", Behaviour(jobs=(job,)))
    assert configure(runner).returncode == 0
    proc = start_run(runner)
    proc.expect(r"Running job: hostile$")
    records = read_left_behind(runner)
    try:
        assert [(record["how"], record["by"]) for record in records] == [
            ("setsid", "job hostile"),
            ("double-fork", "job hostile"),
        ]
        listener = read_calls(runner)[-1]["pid"]
        setsid, daemon = (read_entry(record["pid"]) for record in records)
        assert (setsid.name, daemon.name) == ("sleep", "sleep")
        assert {setsid.session, daemon.session}.isdisjoint({proc.popen.pid})
        assert setsid.ppid == listener  # orphaned only when the listener exits
        assert daemon.ppid != listener  # orphaned from the start
        assert setsid.start_ticks == records[0]["start_ticks"]
    finally:
        for record in records:
            os.kill(record["pid"], signal.SIGKILL)


def test_warmup_prints_nothing_and_exits_0_configured_or_not(runner: Path) -> None:
    done = run_sync(["./bin/Runner.Listener", "warmup"], runner, clean_env())
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_an_unknown_command_is_refused_as_the_real_listener_refuses_it(runner: Path) -> None:
    assert configure(runner).returncode == 0
    done = run_sync(["./bin/Runner.Listener", "warmpu"], runner, clean_env())
    assert done.returncode == 0  # the real one warns, prints its usage, and exits 0
    assert "This command does not recognize the command-line input arguments: 'warmpu'." in done.stderr
    assert "./config.sh remove  Unconfigures the runner" in done.stdout


def test_job_hooks_run_like_the_workers_and_a_failing_started_hook_fails_the_job(tmp_path: Path) -> None:
    runner = install(tmp_path / "runner")
    assert configure(runner).returncode == 0
    seen = tmp_path / "seen"
    started, completed = tmp_path / "started.sh", tmp_path / "completed.sh"
    started.write_text(f'echo "$GITHUB_REPOSITORY $GITHUB_RUN_ID $PWD" >> {seen}\nexit "$HOOK_EXIT"\n')
    completed.write_text(f'echo "completed $GITHUB_JOB" >> {seen}\n')
    hooks = {"ACTIONS_RUNNER_HOOK_JOB_STARTED": str(started), "ACTIONS_RUNNER_HOOK_JOB_COMPLETED": str(completed)}
    for exit_status, result in ((0, "Succeeded"), (1, "Failed")):
        seen.unlink(missing_ok=True)
        queue = runner / "_fake_github" / "jobs"
        job = {"name": "build", "github": {"GITHUB_REPOSITORY": "octo/app", "GITHUB_RUN_ID": "42"}}
        (queue / "1.json").write_text(json.dumps(job))
        proc = start_run(runner, HOOK_EXIT=str(exit_status), **hooks)
        proc.expect(rf"^{TS}: Job build completed with result: {result}$")
        os.killpg(proc.popen.pid, signal.SIGINT)
        assert proc.finish() == 0
        workspace = runner / "_work" / "app" / "app"
        assert seen.read_text() == f"octo/app 42 {workspace}\ncompleted build\n"
