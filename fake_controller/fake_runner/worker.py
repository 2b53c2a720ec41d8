"""The job side of the fake runner, like the real `Runner.Worker`: a job's environment and its job hooks.

The real worker runs ACTIONS_RUNNER_HOOK_JOB_STARTED before a job's first step and ACTIONS_RUNNER_HOOK_JOB_COMPLETED
after its last (`JobExtension`, `JobHookProvider`). Each names a script by its absolute path: a `.sh` one is run
as `bash --noprofile --norc -e -o pipefail PATH` (`sh -e PATH` without bash), and `.ps1` and `.js` ones have
shells of their own; anything else, or a file that does not exist, fails the hook. A hook runs with the job's
`GITHUB_*` environment, in the job's workspace (`_work/REPO/REPO`), and its output goes to the job's log, not to
the listener's console. A started hook that fails fails the job and skips its steps; the completed hook runs
whatever happened, and its failure fails the job too.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from .behaviour import Job
from .store import github_dir

JOB_LOG = "job-log.txt"
"""Under `_fake_github/`: what the hooks printed, as GitHub would show it in the job's log."""

HOOK_VARIABLES = {"started": "ACTIONS_RUNNER_HOOK_JOB_STARTED", "completed": "ACTIONS_RUNNER_HOOK_JOB_COMPLETED"}


def job_context(job: Job) -> dict[str, str]:
    """The job's `GITHUB_*` values: made up from its name, then whatever the job sets itself."""
    digest = hashlib.sha1(job.name.encode("utf-8")).hexdigest()  # noqa: S324 - a made-up commit sha
    context = {
        "GITHUB_REPOSITORY": "fake-org/fake-repo",
        "GITHUB_WORKFLOW": "CI",
        "GITHUB_JOB": "".join(c if c.isalnum() else "-" for c in job.name.lower())[:100] or "job",
        "GITHUB_RUN_ID": str(int(digest[:8], 16)),
        "GITHUB_RUN_NUMBER": "1",
        "GITHUB_RUN_ATTEMPT": "1",
        "GITHUB_REF": "refs/heads/main",
        "GITHUB_SHA": digest,
        "GITHUB_ACTOR": "octocat",
        "GITHUB_EVENT_NAME": "push",
        "GITHUB_SERVER_URL": "https://github.com",
    }
    return {**context, **job.github}


def job_environment(root: Path, work_folder: str, job: Job) -> tuple[dict[str, str], Path]:
    """The environment a job's steps and hooks get, and its workspace (created)."""
    context = job_context(job)
    name = context["GITHUB_REPOSITORY"].rpartition("/")[2] or "repo"
    name = "".join(c for c in name if c.isalnum() or c in "-_.").strip(".") or "repo"
    work = root / work_folder
    workspace = work / name / name
    workspace.mkdir(parents=True, exist_ok=True)
    temp = work / "_temp"
    temp.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        **context,
        "CI": "true",
        "GITHUB_ACTIONS": "true",
        "GITHUB_WORKSPACE": str(workspace),
        "RUNNER_WORKSPACE": str(work / name),
        "RUNNER_TEMP": str(temp),
        "RUNNER_OS": "Linux",
    }
    return env, workspace


def run_hook(root: Path, stage: str, env: dict[str, str], workspace: Path) -> bool | None:
    """Run the job hook for `stage` if one is set; None when none is, else whether it succeeded."""
    path = env.get(HOOK_VARIABLES[stage])
    if not path:
        return None
    title = "job started hook" if stage == "started" else "job completed hook"
    log = _JobLog(root)
    log.write(f"A {title} has been configured by the self-hosted runner administrator\n")
    if not os.path.isfile(path):
        log.write("##[error]File doesn't exist\n")
        return False
    argv = _shell(path)
    if argv is None:
        log.write(f"##[error]{path} is not a valid path to a script. Make sure it ends in '.sh', '.ps1' or '.js'.\n")
        return False
    log.write(f"##[group]Run '{path}'\nshell: {' '.join(argv)}\n##[endgroup]\n")
    try:
        completed = subprocess.run(
            argv, cwd=workspace, env=env, stdin=subprocess.DEVNULL, capture_output=True, check=False
        )
    except OSError as exc:
        log.write(f"##[error]{exc}\n")
        return False
    log.write(completed.stdout.decode("utf-8", "replace") + completed.stderr.decode("utf-8", "replace"))
    if completed.returncode != 0:
        log.write(f"##[error]Process completed with exit code {completed.returncode}.\n")
        return False
    return True


def _shell(path: str) -> list[str] | None:
    """`GetDefaultShellForScript` and `ScriptHandlerHelpers`: how the worker runs a hook, by its extension."""
    extension = os.path.splitext(path)[1]
    if extension == ".sh":
        if shutil.which("bash"):
            return ["bash", "--noprofile", "--norc", "-e", "-o", "pipefail", path]
        return ["sh", "-e", path]
    if extension == ".ps1":
        shell = "pwsh" if shutil.which("pwsh") else "powershell"
        return [shell, "-command", f". '{path}'"]
    if extension == ".js":
        return ["node", path]  # the real runner uses the Node.js it ships (externals/nodeNN)
    return None


class _JobLog:
    def __init__(self, root: Path) -> None:
        self._path = github_dir(root) / JOB_LOG

    def write(self, text: str) -> None:
        try:
            with open(self._path, "a", encoding="utf-8") as handle:
                handle.write(text)
        except OSError:
            pass
