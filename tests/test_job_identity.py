"""Job identity from the runner's job hooks: the hook scripts under real shells, the spool read as untrusted input,
the runner's .env chained and put back, the machine's events, and a whole agent on the autojump clock.

The runs with the real fake runner, where the runner itself runs the hooks, are in test_runner_integration.py.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import trio
import trio.testing

from fake_controller import FakeController
from fake_controller.fake_runner.behaviour import Job
from fake_controller.simulated_runner import SimulatedRunner
from miglet import machine, protocol
from miglet.driver import Driver
from miglet.machine import AgentState, Phase
from miglet.runner.hooks import (
    CHAINED_PREFIX,
    IDENTITY_VARIABLES,
    MAX_VALUE,
    JobHooks,
    MalformedHandover,
    Spool,
    hook_script,
    parse_handover,
)
from miglet.secret import Secret
from miglet.tasks.runner_extras import Identities
from tests.agents import ConfigFactory, running_agent

SHELLS = [
    pytest.param(["bash", "--noprofile", "--norc", "-e", "-o", "pipefail"], id="bash"),
    pytest.param(["sh", "-e"], id="sh"),
]
CONTEXT = {"GITHUB_REPOSITORY": "octo-org/app", "GITHUB_RUN_ID": "7712345678", "GITHUB_RUN_ATTEMPT": "2"}


def handover(stage: str = "started", **values: str) -> bytes:
    """A spool file as MIGlet's hooks write it."""
    records = ["miglet-job-hook 1", f"stage={stage}", *(f"{key}={value}" for key, value in values.items()), "end"]
    return "".join(record + "\0" for record in records).encode()


def run_hook(shell: list[str], script: Path, env: dict[str, str], **options: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*shell, str(script)], env={"PATH": os.environ["PATH"], **env}, capture_output=True, text=True, timeout=10,
        **options,
    )  # fmt: skip


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the runner's user (nobody) can reach, unlike pytest's own, which are root's alone."""
    path = Path(tempfile.mkdtemp(prefix="miglet-hooks-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def errors_logged(caplog: pytest.LogCaptureFixture) -> str:
    return " ".join(str(getattr(record, "error", "")) for record in caplog.records)


def install_script(tmp_path: Path, chained: str | None = None, spool: Path | None = None) -> tuple[Path, Path]:
    spool = spool or tmp_path / "spool"
    script = tmp_path / "job-started.sh"
    script.write_text(hook_script("started", spool, chained, tmp_path))
    return script, spool


# --- The hook script, under the shells the runner uses ------------------------------------------------------------


@pytest.mark.parametrize("shell", SHELLS)
def test_the_hook_hands_the_allow_listed_identity_over_and_exits_0(tmp_path: Path, shell: list[str]) -> None:
    script, spool = install_script(tmp_path)
    spool.mkdir()
    done = run_hook(shell, script, {**CONTEXT, "GITHUB_TOKEN": "ghs_notforus", "SECRET_X": "y"})
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    [name] = os.listdir(spool)
    data = (spool / name).read_bytes()
    assert b"ghs_notforus" not in data
    assert b"SECRET_X" not in data
    [taken] = Spool(spool).take()
    assert taken.stage == "started"
    assert taken.github == protocol.GithubContext(repository="octo-org/app", run_id="7712345678", run_attempt="2")
    assert os.listdir(spool) == []  # read once, then gone


@pytest.mark.parametrize("shell", SHELLS)
def test_hostile_values_are_cut_in_the_hook_and_cleaned_by_miglet(tmp_path: Path, shell: list[str]) -> None:
    script, spool = install_script(tmp_path)
    spool.mkdir()
    hostile = {
        "GITHUB_REPOSITORY": "octo/app\nGITHUB_SHA=forged\n",
        "GITHUB_REF": "refs/heads/\x1b[31mred\r\x07",
        "GITHUB_SHA": "f" * 20_000,
        "GITHUB_ACTOR": "\u202eevil",
    }
    done = run_hook(shell, script, hostile)
    assert done.returncode == 0
    [name] = os.listdir(spool)
    # Each value is cut to 256 bytes by the hook itself: a few KiB at most whatever the job's environment holds.
    assert (spool / name).stat().st_size < 3 * 1024
    [taken] = Spool(spool).take()
    github = taken.github
    assert github.repository == "octo/appGITHUB_SHA=forged"
    assert github.sha == "f" * MAX_VALUE
    assert github.ref == "refs/heads/[31mred"
    assert github.actor == "evil"


@pytest.mark.parametrize("shell", SHELLS)
def test_a_missing_spool_costs_the_job_nothing(tmp_path: Path, shell: list[str]) -> None:
    script, spool = install_script(tmp_path)
    done = run_hook(shell, script, CONTEXT)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert not spool.exists()


@pytest.mark.parametrize("shell", SHELLS)
def test_an_unwritable_spool_costs_the_job_nothing(shared_dir: Path, shell: list[str]) -> None:
    nobody = pwd.getpwnam("nobody")
    script, spool = install_script(shared_dir)
    spool.mkdir(mode=0o700)  # root's: the runner's user may not write there
    done = run_hook(shell, script, CONTEXT, user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[])
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert os.listdir(spool) == []


@pytest.mark.parametrize("shell", SHELLS)
def test_a_fifo_planted_where_the_hook_writes_does_not_hang_it(tmp_path: Path, shell: list[str]) -> None:
    script, spool = install_script(tmp_path)
    spool.mkdir()
    # The hook writes to a name made of its shell's pid; a job cannot know it, but may plant FIFOs for many.
    plant = f'mkfifo "{spool}/.started.$$"; exec "$@"'
    process = subprocess.Popen(["sh", "-c", plant, "sh", *shell, str(script)])
    assert process.wait(timeout=10) == 0
    assert [name.startswith("started.") for name in os.listdir(spool)] == [True]


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(("operator_exits", "expected"), [(0, 0), (3, 3)])
def test_the_operators_hook_runs_after_and_its_exit_status_is_the_hooks(
    tmp_path: Path, shell: list[str], operator_exits: int, expected: int
) -> None:
    operator = tmp_path / "operator's hook.sh"
    operator.write_text(f'echo "operator saw $GITHUB_REPOSITORY in $PWD"\nexit {operator_exits}\n')
    script, spool = install_script(tmp_path, chained=str(operator))
    spool.mkdir()
    done = run_hook(shell, script, CONTEXT, cwd=tmp_path)
    assert done.returncode == expected
    assert done.stdout == f"operator saw octo-org/app in {tmp_path}\n"
    assert len(Spool(spool).take()) == 1  # MIGlet's part ran first, whatever the operator's did


def test_the_operators_hook_is_run_under_set_e_as_the_runner_would(tmp_path: Path) -> None:
    operator = tmp_path / "hook.sh"
    operator.write_text("false\necho not reached\n")
    script, _ = install_script(tmp_path, chained=str(operator))
    done = run_hook(["sh", "-e"], script, {})
    assert (done.returncode, done.stdout) == (1, "")


@pytest.mark.parametrize("chained", ["/nonexistent/hook.sh", "hook.txt"])
def test_an_operators_hook_the_runner_would_refuse_still_fails_the_job(tmp_path: Path, chained: str) -> None:
    if not chained.startswith("/"):
        (tmp_path / chained).write_text("exit 0\n")
        chained = str(tmp_path / chained)
    script, _ = install_script(tmp_path, chained=chained)
    assert run_hook(["sh", "-e"], script, {}).returncode == 1


# --- The spool, read as untrusted input -------------------------------------------------------------------------


def test_handovers_that_are_not_the_hooks_are_refused() -> None:
    for data, why in [
        (b"", "unfinished"),
        (handover()[:-1], "unfinished"),
        (b"miglet-job-hook 2\0stage=started\0GITHUB_REPOSITORY=a\0end\0", "not written"),
        (b"miglet-job-hook 1\0stage=sideways\0GITHUB_REPOSITORY=a\0end\0", "stage"),
        (b"miglet-job-hook 1\0started\0GITHUB_REPOSITORY=a\0end\0", "stage"),
        (handover(GITHUB_REPOSITORY="a")[: -len(b"end\0")], "not written"),
        (handover(GITHUB_TOKEN="ghs_x", HOME="/root"), "no identity"),
        (handover(GITHUB_REPOSITORY="\x00\x01\x1b"), "no identity"),
    ]:
        with pytest.raises(MalformedHandover, match=why):
            parse_handover(data)


def test_only_the_allow_list_is_read_each_key_once_and_secrets_are_masked() -> None:
    token = Secret("AHT-registration-token-123")
    token.reveal()
    data = (
        handover(
            GITHUB_REPOSITORY="first/one",
            GITHUB_WORKFLOW=f"leaks {token.reveal()} here",
            GITHUB_TOKEN="ghs_secret",
            GITHUB_EVENT_PATH="/etc/shadow",
        )
        + b"GITHUB_REPOSITORY=second/one\0"
    )
    github = parse_handover(data.replace(b"end\0GITHUB_REPOSITORY=second/one\0", b"GITHUB_REPOSITORY=x\0end\0")).github
    assert github.repository == "first/one"
    assert github.workflow == "leaks *** here"
    assert set(msgspec_fields(github)) <= set(IDENTITY_VARIABLES.values())


def msgspec_fields(github: protocol.GithubContext) -> list[str]:
    return [name for name in github.__struct_fields__ if getattr(github, name) is not None]


def test_the_spool_removes_what_no_hook_wrote_and_never_follows_a_link(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    secret_file = tmp_path / "root-only"
    secret_file.write_bytes(handover(GITHUB_REPOSITORY="read/through-a-link"))
    (spool / "started.1").symlink_to(secret_file)
    os.mkfifo(spool / "started.2")
    (spool / "started.3").write_bytes(b"x" * 100_000)
    (spool / "started.4").mkdir()
    (spool / "\nforged log line").write_bytes(handover(GITHUB_REPOSITORY="a"))
    (spool / "completed.5").write_bytes(handover("completed", GITHUB_REPOSITORY="good/completed"))
    (spool / "started.6").write_bytes(handover(GITHUB_REPOSITORY="good/started"))
    taken = Spool(spool).take()
    assert [(h.stage, h.github.repository) for h in taken] == [
        ("started", "good/started"),
        ("completed", "good/completed"),
    ]
    assert os.listdir(spool) == []
    assert secret_file.exists()
    assert "forged" not in caplog.text


def test_a_flooded_spool_is_emptied_a_bounded_look_at_a_time(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    for index in range(1000):
        (spool / f"junk{index}").write_bytes(b"")
    reader = Spool(spool)
    looks = 0
    while os.listdir(spool):
        assert reader.take() == []
        looks += 1
    assert looks == 4


def test_a_part_written_handover_is_left_to_its_hook_until_it_is_stale(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    part = spool / ".started.77"
    part.write_bytes(handover()[:10])
    now = part.stat().st_mtime
    assert Spool(spool, clock=lambda: now + 1).take() == []
    assert part.exists()
    assert Spool(spool, clock=lambda: now + 3600).take() == []
    assert not part.exists()
    future = spool / ".completed.78"
    future.write_bytes(b"")
    os.utime(future, (now + 10**6, now + 10**6))  # a job may date its files as it likes
    assert Spool(spool, clock=lambda: now).take() == []
    assert not future.exists()


# --- Installing the hooks: MIGlet's scripts, the spool, the operator's hooks in .env ------------------------------


def hooks(tmp_path: Path, user: str | None = None) -> JobHooks:
    runner_dir = tmp_path / "runner"
    runner_dir.mkdir(exist_ok=True)
    return JobHooks(tmp_path / "state" / "job-hooks", runner_dir, user)


def test_prepare_points_the_runner_at_miglets_hooks(tmp_path: Path) -> None:
    installed = hooks(tmp_path)
    env = installed.prepare({})
    assert env == {
        "ACTIONS_RUNNER_HOOK_JOB_STARTED": str(installed.script("started")),
        "ACTIONS_RUNNER_HOOK_JOB_COMPLETED": str(installed.script("completed")),
    }
    assert installed.script("started").stat().st_mode & 0o777 == 0o755
    assert installed.spool.path.stat().st_mode & 0o777 == 0o700
    assert not (installed.runner_dir / ".env").exists()


def test_an_operators_hook_in_the_environment_is_chained(tmp_path: Path) -> None:
    installed = hooks(tmp_path)
    installed.prepare({"ACTIONS_RUNNER_HOOK_JOB_STARTED": "/opt/hooks/start.sh"})
    assert "hook=/opt/hooks/start.sh" in installed.script("started").read_text()
    assert "exit 0" in installed.script("completed").read_text()


def test_an_operators_hook_in_dotenv_is_chained_kept_and_put_back(tmp_path: Path) -> None:
    installed = hooks(tmp_path)
    dotenv = installed.runner_dir / ".env"
    original = "LANG=C.UTF-8\nACTIONS_RUNNER_HOOK_JOB_STARTED=/opt/hooks/start.sh\nHTTPS_PROXY=http://p:3128\n"
    dotenv.write_text(original)
    dotenv.chmod(0o640)
    environ = {"ACTIONS_RUNNER_HOOK_JOB_STARTED": "/loses/to/dotenv.sh"}
    for _ in range(2):  # again, as after a restart of MIGlet: the operator's hook is never lost, never itself
        installed.prepare(environ)
        lines = dotenv.read_text().splitlines()
        assert f"ACTIONS_RUNNER_HOOK_JOB_STARTED={installed.script('started')}" in lines
        assert f"{CHAINED_PREFIX}ACTIONS_RUNNER_HOOK_JOB_STARTED=/opt/hooks/start.sh" in lines
        assert {"LANG=C.UTF-8", "HTTPS_PROXY=http://p:3128"} <= set(lines)
        assert "hook=/opt/hooks/start.sh" in installed.script("started").read_text()
        assert dotenv.stat().st_mode & 0o777 == 0o640
    installed.restore()
    assert sorted(dotenv.read_text().splitlines()) == sorted(original.splitlines())


def test_hooks_the_runners_user_cannot_reach_are_not_installed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # pytest's tmp_path is root's alone: the runner's user could not run the scripts, and a hook that cannot be
    # run fails every job. So MIGlet's are not installed, and the operator's is left where it was.
    installed = hooks(tmp_path, user="nobody")
    dotenv = installed.runner_dir / ".env"
    dotenv.write_text("ACTIONS_RUNNER_HOOK_JOB_STARTED=/opt/hooks/start.sh\n")
    assert installed.prepare({}) == {}
    assert dotenv.read_text() == "ACTIONS_RUNNER_HOOK_JOB_STARTED=/opt/hooks/start.sh\n"
    assert "cannot reach" in errors_logged(caplog)


def test_hooks_are_installed_for_a_runners_user_who_can_reach_them(shared_dir: Path) -> None:
    installed = hooks(shared_dir, user="nobody")
    (shared_dir / "state").mkdir(mode=0o711)
    assert installed.prepare({}) != {}
    assert installed.spool.path.stat().st_uid == pwd.getpwnam("nobody").pw_uid


def test_a_huge_dotenv_turns_job_identity_off_and_is_left_as_it_is(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    installed = hooks(tmp_path)
    dotenv = installed.runner_dir / ".env"
    huge = b"ACTIONS_RUNNER_HOOK_JOB_STARTED=/opt/x.sh\n" + b"PADDING=" + b"x" * 1_000_000 + b"\n"
    dotenv.write_bytes(huge)
    assert installed.prepare({}) == {}
    assert dotenv.read_bytes() == huge
    assert "larger than" in errors_logged(caplog)


def test_an_operators_hook_path_with_quotes_and_a_newline_is_run_as_named(tmp_path: Path) -> None:
    operator = tmp_path / 'it\'s a "hook"\nwith $(echo no) `echo no`.sh'
    operator.write_text("exit 5\n")
    script, _ = install_script(tmp_path, chained=str(operator))
    assert run_hook(["sh", "-e"], script, {}).returncode == 5


def test_a_link_on_the_way_to_the_state_directory_is_fine(shared_dir: Path) -> None:
    # /var/run -> /run on every current Debian and Ubuntu: a link's own mode (0777) says nothing.
    (shared_dir / "run").mkdir(mode=0o755)
    (shared_dir / "var-run").symlink_to(shared_dir / "run")
    installed = JobHooks(shared_dir / "var-run" / "miglet" / "job-hooks", shared_dir, None)
    assert installed.prepare({}) != {}
    assert (shared_dir / "run" / "miglet" / "job-hooks" / "spool").is_dir()


def test_a_symlinked_dotenv_is_left_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    installed = hooks(tmp_path)
    target = tmp_path / "elsewhere"
    target.write_text("ACTIONS_RUNNER_HOOK_JOB_STARTED=/opt/x.sh\n")
    (installed.runner_dir / ".env").symlink_to(target)
    assert installed.prepare({}) == {}
    assert target.read_text() == "ACTIONS_RUNNER_HOOK_JOB_STARTED=/opt/x.sh\n"
    assert "symbolic link" in errors_logged(caplog)


def test_an_operators_hook_survives_a_move_of_miglets_own_directory(tmp_path: Path) -> None:
    before = hooks(tmp_path)
    dotenv = before.runner_dir / ".env"
    dotenv.write_text("ACTIONS_RUNNER_HOOK_JOB_COMPLETED=/opt/ops/done.sh\n")
    before.prepare({})
    after = JobHooks(tmp_path / "elsewhere" / "job-hooks", before.runner_dir, None)
    after.prepare({})
    assert "hook=/opt/ops/done.sh" in after.script("completed").read_text()
    after.restore()
    assert dotenv.read_text() == "ACTIONS_RUNNER_HOOK_JOB_COMPLETED=/opt/ops/done.sh\n"


def test_an_empty_hook_in_dotenv_stays_empty(tmp_path: Path) -> None:
    # Empty in .env turns off a hook set in the environment, for the runner: so it must stay, also once restored.
    installed = hooks(tmp_path)
    dotenv = installed.runner_dir / ".env"
    dotenv.write_text("ACTIONS_RUNNER_HOOK_JOB_STARTED=\n")
    installed.prepare({"ACTIONS_RUNNER_HOOK_JOB_STARTED": "/opt/env-hook.sh"})
    assert "exit 0" in installed.script("started").read_text()
    installed.restore()
    assert dotenv.read_text() == "ACTIONS_RUNNER_HOOK_JOB_STARTED=\n"


def test_a_hook_path_that_is_not_utf8_is_kept_as_it_was(tmp_path: Path) -> None:
    installed = hooks(tmp_path)
    operator = tmp_path.joinpath(os.fsdecode(b"caf\xe9.sh"))
    operator.write_text("exit 7\n")
    (installed.runner_dir / ".env").write_bytes(b"ACTIONS_RUNNER_HOOK_JOB_STARTED=" + os.fsencode(operator) + b"\n")
    env = installed.prepare({})
    assert run_hook(["sh", "-e"], Path(env["ACTIONS_RUNNER_HOOK_JOB_STARTED"]), {}).returncode == 7


def test_hooks_are_not_installed_where_others_could_swap_their_directory(
    shared_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = shared_dir / "state"
    state.mkdir()
    state.chmod(0o777)
    installed = JobHooks(state / "job-hooks", shared_dir, None)
    assert installed.prepare({}) == {}
    assert "may be changed by users other than MIGlet's" in errors_logged(caplog)


def test_each_runner_gets_an_empty_spool(tmp_path: Path) -> None:
    installed = hooks(tmp_path)
    installed.prepare({})
    (installed.spool.path / "started.1").write_bytes(handover(GITHUB_REPOSITORY="left/by-an-earlier-job"))
    (installed.spool.path / "tree").mkdir()
    (installed.spool.path / "tree" / "file").write_text("")
    installed.prepare({})
    assert os.listdir(installed.spool.path) == []


def test_a_spool_set_aside_is_read_for_recent_handovers_then_deleted(tmp_path: Path) -> None:
    installed = hooks(tmp_path)
    installed.prepare({})
    now = time.time()
    (installed.spool.path / "started.1").write_bytes(handover(GITHUB_REPOSITORY="recent/one"))
    old = installed.spool.path / "started.2"
    old.write_bytes(handover(GITHUB_REPOSITORY="old/one"))
    os.utime(old, (now - 60, now - 60))
    installed.fresh_spool()
    assert os.listdir(installed.spool.path) == []
    assert [h.github.repository for h in installed.recent(since=now - 2)] == ["recent/one"]
    set_aside = installed.set_aside()
    assert len(set_aside) == 1
    assert installed.set_aside() == []
    JobHooks.discard(set_aside)
    assert not set_aside[0].exists()


def test_spools_an_earlier_miglet_set_aside_are_deleted_with_this_ones(tmp_path: Path) -> None:
    earlier = hooks(tmp_path)
    earlier.prepare({})
    earlier.fresh_spool()
    [left] = earlier.set_aside()
    (left / "started.1").write_bytes(b"")  # never deleted: that MIGlet was killed
    later = hooks(tmp_path)
    later.prepare({})
    later.fresh_spool()
    set_aside = later.set_aside()
    assert left in set_aside
    assert len(set_aside) == 3  # the earlier one's, and this one's two
    JobHooks.discard(set_aside)
    assert sorted(path.name for path in later.directory.iterdir()) == ["job-completed.sh", "job-started.sh", "spool"]


def test_the_real_shell_runs_the_installed_hook_end_to_end(tmp_path: Path) -> None:
    installed = hooks(tmp_path)
    env = installed.prepare({})
    bash = shutil.which("bash")
    assert bash is not None
    done = run_hook([bash, "-e"], Path(env["ACTIONS_RUNNER_HOOK_JOB_STARTED"]), CONTEXT)
    assert done.returncode == 0
    assert [h.github.repository for h in installed.spool.take()] == ["octo-org/app"]


# --- The machine ------------------------------------------------------------------------------------------------

GITHUB = protocol.GithubContext(repository="octo-org/app", run_id="1")


def busy() -> AgentState:
    return AgentState(phase=Phase.BUSY, job="build", listening=True, runner_name="vm")


def test_identity_is_sent_once_per_job_and_rides_on_its_completion() -> None:
    step = machine.transition(busy(), machine.JobIdentified("started", GITHUB))
    assert step.events == (protocol.JobIdentified(job_name="build", github=GITHUB),)
    again = machine.transition(step.state, machine.JobIdentified("completed", GITHUB))
    assert not again.accepted
    done = machine.transition(step.state, machine.JobDone("build", "Succeeded"))
    assert done.events == (protocol.JobCompleted(job_name="build", result="Succeeded", github=GITHUB),)
    assert done.state.github is None


def test_a_handover_between_jobs_belongs_to_no_job() -> None:
    idle = AgentState(phase=Phase.IDLE, listening=True, runner_name="vm")
    for stage in ("started", "completed"):
        assert not machine.transition(idle, machine.JobIdentified(stage, GITHUB)).accepted


def test_a_job_the_runner_never_finished_keeps_its_identity() -> None:
    identified = machine.transition(busy(), machine.JobIdentified("started", GITHUB)).state
    gone = machine.transition(identified, machine.RunnerGone(137))
    [completed] = [event for event in gone.events if isinstance(event, protocol.JobCompleted)]
    assert (completed.result, completed.github) == ("Abandoned", GITHUB)


# --- A whole agent on the autojump clock ------------------------------------------------------------------------


async def test_identity_arrives_before_job_completed_even_for_an_instant_job(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_agent(make_config(), controller, runner) as running:
        spool = running.agent.job_hooks.spool.path
        spool.mkdir(parents=True)
        await running.reach(Phase.IDLE)
        # The hook hands over as the job starts; the job is over before the spool is looked at again.
        (spool / "started.1").write_bytes(handover(**CONTEXT))
        runner.submit_job(Job("build"))
    assert running.event_types()[2:5] == ["job_started", "job_identified", "job_completed"]
    [identified] = running.events("job_identified")
    expected = {"repository": "octo-org/app", "run_id": "7712345678", "run_attempt": "2"}
    assert (identified["job_name"], identified["github"]) == ("build", expected)
    assert running.events("job_completed")[0]["github"] == expected


async def test_no_identity_no_harm(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_agent(make_config(), controller, runner) as running:
        await running.reach(Phase.IDLE)
        runner.submit_job(Job("build", duration_s=5))
    assert "job_identified" not in running.event_types()
    assert "github" not in running.events("job_completed")[0]
    assert running.exit_code == 0


async def test_job_identity_off_reads_no_spool_and_says_so(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_agent(make_config(job_identity=False), controller, runner) as running:
        spool = running.agent.job_hooks.spool.path
        spool.mkdir(parents=True)
        (spool / "started.1").write_bytes(handover(**CONTEXT))
        await running.reach(Phase.IDLE)
        runner.submit_job(Job("build", duration_s=5))
    assert "job_identified" not in running.event_types()
    assert "job_identity" not in running.events("vm_started")[0]["agent"]["capabilities"]


async def test_a_handover_left_between_jobs_is_not_the_next_jobs(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_agent(make_config(), controller, runner) as running:
        hooks = running.agent.job_hooks
        hooks.prepare({})
        await running.reach(Phase.IDLE)
        # Written while no job ran (by a process an earlier job left behind, say), and a flood of directories.
        forged = hooks.spool.path / "started.1"
        forged.write_bytes(handover(GITHUB_REPOSITORY="forged/by-a-leftover"))
        os.utime(forged, (time.time() - 60, time.time() - 60))
        for index in range(300):
            (hooks.spool.path / f"junk{index}").mkdir()
            (hooks.spool.path / f"junk{index}" / "file").write_text("")
        runner.submit_job(Job("build", duration_s=5))
        await running.reach(Phase.BUSY)
        (hooks.spool.path / "started.2").write_bytes(handover(**CONTEXT))
    [identified] = running.events("job_identified")
    assert identified["github"]["repository"] == "octo-org/app"


async def test_a_hook_that_runs_before_miglet_sees_its_job_start_still_identifies_it(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_agent(make_config(), controller, runner) as running:
        hooks = running.agent.job_hooks
        hooks.prepare({})
        await running.reach(Phase.IDLE)
        (hooks.spool.path / "started.3").write_bytes(handover(**CONTEXT))  # a moment before `Running job` is read
        runner.submit_job(Job("build", duration_s=600))
        state = await running.reach(Phase.BUSY)
        # Taken as the job started, not only once it is over.
        assert state.github is not None
        assert state.github.repository == "octo-org/app"
        running.agent.request_stop("test over")
    assert running.event_types()[2:4] == ["job_started", "job_identified"]


class RecordingDriver:
    """Just enough of a driver for `Identities`: what it is told, and a job running."""

    def __init__(self) -> None:
        self.applied: list[machine.Input] = []
        self.state = AgentState(phase=Phase.BUSY, job="A", listening=True)

    def apply(self, event: machine.Input) -> None:
        self.applied.append(event)


def identities(tmp_path: Path) -> tuple[JobHooks, Identities, RecordingDriver]:
    installed = hooks(tmp_path)
    installed.prepare({})
    driver = RecordingDriver()
    return installed, Identities(installed, cast(Driver, driver)), driver


def told(driver: RecordingDriver) -> list[tuple[str, str | None]]:
    return [
        (event.stage, event.github.repository) for event in driver.applied if isinstance(event, machine.JobIdentified)
    ]


def test_the_completed_handover_of_a_lost_job_goes_before_the_next_job_starts(tmp_path: Path) -> None:
    # The runner can drop a job it could not renew and start the next at once: the first one's completed hook has
    # just written, in the spool that the next job's start sets aside.
    installed, watcher, driver = identities(tmp_path)
    (installed.spool.path / "completed.1").write_bytes(handover("completed", GITHUB_REPOSITORY="org/job-a"))
    watcher.job_starting()
    assert told(driver) == [("completed", "org/job-a")]  # before the machine hears of job B
    watcher.job_started()
    watcher.collect()
    assert told(driver) == [("completed", "org/job-a")]
    (installed.spool.path / "started.2").write_bytes(handover(GITHUB_REPOSITORY="org/job-b"))
    watcher.collect()
    assert told(driver) == [("completed", "org/job-a"), ("started", "org/job-b")]


@pytest.mark.parametrize("shell", SHELLS)
def test_a_started_hook_writing_as_its_job_starts_is_still_read(tmp_path: Path, shell: list[str]) -> None:
    installed, watcher, driver = identities(tmp_path)
    # The hook is stopped half-way through its write (a slow disk, a busy machine) while the job's start sets
    # its spool aside; it finishes there, and the next look finds it.
    script = installed.script("started")
    ready, go = tmp_path / "ready", tmp_path / "go"
    os.mkfifo(ready)
    os.mkfifo(go)
    slow = tmp_path / "slow-hook.sh"
    slow.write_text(script.read_text().replace("printf 'end", f"echo >{ready}; read _ <{go}; printf 'end"))
    writing = subprocess.Popen([*shell, str(slow)], env={"PATH": os.environ["PATH"], **CONTEXT})
    with open(ready) as halfway:  # opens once the hook has written half its hand-over
        halfway.read()
    watcher.job_starting()
    watcher.job_started()
    assert told(driver) == []
    with open(go, "w") as resume:
        resume.write("\n")
    assert writing.wait(timeout=10) == 0
    watcher.collect()
    assert told(driver) == [("started", "octo-org/app")]
