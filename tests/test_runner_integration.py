"""Job identity and warmup with MIGlet as a real process and the fake runner, which runs job hooks as the real
runner's worker does (bash -e, the job's GITHUB_* environment, its workspace as working directory).

Rules as in test_end_to_end.py: real clock, 127.0.0.1, a hard deadline, waits on MIGlet's log and the
controller's record.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import msgspec
import trio

from fake_controller import FakeController, Settings
from fake_controller.fake_runner import Behaviour, enqueue_job, read_calls
from fake_controller.fake_runner.behaviour import Job
from fake_controller.fake_runner.install import install
from fake_controller.fake_runner.store import JOBS_DIR, github_dir
from miglet.runner.hooks import CHAINED_PREFIX
from tests.test_end_to_end import TIMEOUT, miglet_against

GITHUB = {
    "GITHUB_REPOSITORY": "octo-org/app",
    "GITHUB_WORKFLOW": "CI",
    "GITHUB_RUN_ID": "7712345678",
    "GITHUB_RUN_ATTEMPT": "3",
    "GITHUB_SHA": "9fceb02d0ae598e95dc970b74767f19372d61af8",
}


def queue_job(runner_dir: Path, name: str, github: dict[str, str], result: str = "Succeeded") -> None:
    """Like `enqueue_job`, with the job's own GITHUB_* values."""
    queue = github_dir(runner_dir) / JOBS_DIR
    job = {"name": name, "result": result, "github": github}
    Job.from_obj(job)
    (queue / ".job.tmp").write_text(msgspec.json.encode(job).decode())
    (queue / ".job.tmp").replace(queue / "0-job.json")


def types(controller: FakeController) -> list[str]:
    return [event["type"] for event in controller.events_of("vm-123") if event["type"] != "heartbeat"]


async def test_the_jobs_workflow_run_arrives_before_its_completion_and_the_operators_hook_still_runs(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "operator-hook-ran"
    operator = tmp_path / "operator-hook.sh"
    operator.write_text(f'echo "$GITHUB_RUN_ID $PWD" > {marker}\n')
    controller = FakeController()
    controller_token = "ctl-secret-token-0123456789"
    env = {"ACTIONS_RUNNER_HOOK_JOB_STARTED": str(operator), "MIGLET_CONTROLLER_TOKEN": controller_token}
    with trio.fail_after(TIMEOUT):
        async with miglet_against(tmp_path, controller, env=env) as (miglet, runner_dir):
            await miglet.wait_state("Idle")
            hooks_dir = tmp_path / "state" / "job-hooks"
            written = b"".join(path.read_bytes() for path in hooks_dir.rglob("*") if path.is_file())
            queue_job(runner_dir, "build", GITHUB)
        assert miglet.process.returncode == 0
    # What MIGlet wrote for the runner's user to run holds no secret.
    registration_token = controller.vm("vm-123").registration_token
    assert registration_token is not None
    assert b"miglet-job-hook 1" in written  # the scripts themselves were read
    for secret in (registration_token, controller_token):
        assert secret.encode() not in written
    assert types(controller)[2:5] == ["job_started", "job_identified", "job_completed"]
    expected = {
        "repository": "octo-org/app",
        "workflow": "CI",
        "job": "build",
        "run_id": "7712345678",
        "run_number": "1",
        "run_attempt": "3",
        "ref": "refs/heads/main",
        "sha": "9fceb02d0ae598e95dc970b74767f19372d61af8",
        "actor": "octocat",
        "event_name": "push",
        "server_url": "https://github.com",
    }
    [identified] = controller.events_of("vm-123", "job_identified")
    assert (identified["job_name"], identified["github"]) == ("build", expected)
    [completed] = controller.events_of("vm-123", "job_completed")
    assert (completed["result"], completed["github"]) == ("Succeeded", expected)
    # The operator's hook ran after MIGlet's, in the job's workspace, with the job's environment.
    assert marker.read_text() == f"7712345678 {runner_dir / '_work' / 'app' / 'app'}\n"
    assert "Job identified" in miglet.messages()


async def test_a_failing_operators_hook_in_dotenv_still_fails_the_job(tmp_path: Path) -> None:
    operator = tmp_path / "refuse.sh"
    operator.write_text("echo 'this runner is retired' >&2\nexit 1\n")
    runner_dir = install(tmp_path / "runner")
    dotenv = runner_dir / ".env"
    dotenv.write_text(f"ACTIONS_RUNNER_HOOK_JOB_STARTED={operator}\n")
    controller = FakeController()
    with trio.fail_after(TIMEOUT):
        async with miglet_against(tmp_path, controller, runner_dir=runner_dir) as (miglet, _):
            await miglet.wait_state("Idle")
            lines = dotenv.read_text().splitlines()
            assert f"{CHAINED_PREFIX}ACTIONS_RUNNER_HOOK_JOB_STARTED={operator}" in lines
            queue_job(runner_dir, "build", GITHUB)
        assert miglet.process.returncode == 0
    [completed] = controller.events_of("vm-123", "job_completed")
    assert completed["result"] == "Failed"
    # MIGlet's own part ran before the operator's refused the job.
    assert controller.events_of("vm-123", "job_identified")[0]["github"]["run_id"] == "7712345678"
    assert "this runner is retired" in (github_dir(runner_dir) / "job-log.txt").read_text()
    # Once MIGlet is done, the runner's .env is as the operator wrote it.
    assert dotenv.read_text() == f"ACTIONS_RUNNER_HOOK_JOB_STARTED={operator}\n"


async def test_hostile_values_neither_fail_the_job_nor_forge_a_log_line(tmp_path: Path) -> None:
    forged = '{"level": "error", "msg": "forged"}'
    hostile = {
        "GITHUB_REPOSITORY": f"octo/app\n{forged}\n",
        "GITHUB_WORKFLOW": "w" * 20_000,
        "GITHUB_REF": "refs/\x1b[2K\r\x07\x7f\u2028main",
    }
    controller = FakeController()
    with trio.fail_after(TIMEOUT):
        async with miglet_against(tmp_path, controller) as (miglet, runner_dir):
            await miglet.wait_state("Idle")
            queue_job(runner_dir, "build", hostile)
        assert miglet.process.returncode == 0
    [completed] = controller.events_of("vm-123", "job_completed")
    assert completed["result"] == "Succeeded"
    github = controller.events_of("vm-123", "job_identified")[0]["github"]
    assert github["repository"] == f"octo/app{forged}"
    assert github["workflow"] == "w" * 256
    assert github["ref"] == "refs/[2Kmain"
    # Every line MIGlet wrote is one of its own JSON records: nothing the job wrote stands as a line of its own.
    for line in bytes(miglet.raw).splitlines():
        record: dict[str, Any] = msgspec.json.decode(line)
        assert record["msg"] != "forged"


async def test_a_spool_removed_or_replaced_is_made_afresh_as_the_next_job_starts(tmp_path: Path) -> None:
    # (A spool missing or unwritable when the hook runs costs the job nothing: test_job_identity.py runs the hook
    # under both shells that way.)
    for broken in ("missing", "not a directory"):
        controller = FakeController()
        case = tmp_path / broken.replace(" ", "-")
        case.mkdir()
        with trio.fail_after(TIMEOUT):
            async with miglet_against(case, controller) as (miglet, runner_dir):
                await miglet.wait_state("Idle")
                spool = case / "state" / "job-hooks" / "spool"
                shutil.rmtree(spool)
                if broken == "not a directory":
                    spool.write_text("")
                queue_job(runner_dir, "build", GITHUB)
            assert miglet.process.returncode == 0
        assert types(controller)[2:5] == ["job_started", "job_identified", "job_completed"]
        assert controller.events_of("vm-123", "job_completed")[0]["result"] == "Succeeded"


async def test_the_warmup_runs_while_ready_and_a_registration_stops_it_at_once(tmp_path: Path) -> None:
    controller = FakeController(Settings(send_registration=False))
    behaviour = Behaviour(warmup_s=600)
    with trio.fail_after(TIMEOUT):
        async with miglet_against(tmp_path, controller, behaviour=behaviour) as (miglet, runner_dir):
            await miglet.wait_state("Ready")
            started = await miglet.wait_for(lambda record: record["msg"] == "Warming the runner up")
            controller.enqueue("vm-123", controller.registration_command("vm-123"))
            await miglet.wait_state("Idle")
            assert not _alive(started["pid"])
            enqueue_job(runner_dir, "build")
        assert miglet.process.returncode == 0
    over = next(record for record in miglet.records if record["msg"] == "Runner warmup over")
    assert over["outcome"] == "stopped"
    timings = controller.events_of("vm-123", "runner_registered")[0]["timings"]
    assert 0 < timings["warmup_s"] < TIMEOUT
    # Stopped before it could do much: it may not even have got as far as recording its start.
    assert [call["argv"] for call in read_calls(runner_dir) if call["cmd"] == "warmup"] in ([], [["warmup"]])


async def test_warmup_off_runs_none(tmp_path: Path) -> None:
    controller = FakeController()
    with trio.fail_after(TIMEOUT):
        env = {"MIGLET_RUNNER_WARMUP": "off"}
        async with miglet_against(tmp_path, controller, env=env) as (miglet, runner_dir):
            await miglet.wait_state("Idle")
            enqueue_job(runner_dir, "build")
        assert miglet.process.returncode == 0
    assert [call["cmd"] for call in read_calls(runner_dir)] == ["configure", "run"]
    assert "warmup_s" not in controller.events_of("vm-123", "runner_registered")[0]["timings"]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False
