"""`run`: connect, listen, run jobs, stop on Ctrl-C, like the real `Runner.RunAsync` + `JobDispatcher`.

Lines and exit codes follow the real listener: `√ Connected to GitHub`, `Current runner version: 'X'`,
`<ts>: Listening for Jobs`, `<ts>: Running job: N`, `<ts>: Job N completed with result: R`. SIGINT
prints `Exiting...`, cancels a running job (`Canceled`) and exits 0; an ephemeral runner exits 0 after
one job and deletes its config files. Signal handlers only set flags; the main loop does the printing,
so a handler never re-enters a buffered write.
"""

from __future__ import annotations

import hashlib
import json
import signal
import time
from collections import deque
from pathlib import Path
from types import FrameType

from .behaviour import Behaviour, BehaviourError, Job
from .cmdline import CommandLine
from .leftovers import leave_behind
from .remove_config import delete_local_config
from .store import (
    JOBS_DIR,
    decode_jitconfig,
    github_dir,
    load_registry,
    new_settings,
    read_settings,
    save_config,
    save_registry,
    write_jit_files,
)
from .terminal import YELLOW, Terminal
from .worker import job_environment, run_hook

POLL_S = 0.05
NOT_CONFIGURED = "An error occurred: Not configured. Run config.(sh/cmd) to configure the runner."
REGISTRATION_DELETED = (
    "Failed to create a session. The runner registration has been deleted from the server, please "
    "re-configure. Runner registrations are automatically deleted for runners that have not connected "
    "to the service recently."
)


class Stopper:
    """SIGINT/SIGTERM bookkeeping: handlers record, `sleep` reports and prints `Exiting...`."""

    def __init__(self, term: Terminal) -> None:
        self._term = term
        self._exiting: list[int] = []
        self.requested = False

    def install(self, ignore: bool) -> None:
        """Handle SIGINT (Ctrl-C: `Exiting...`) and SIGTERM (silent unload), or ignore both."""
        if ignore:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            return
        signal.signal(signal.SIGINT, self._on_sigint)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        self._exiting.append(signum)
        self.requested = True

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def sleep(self, seconds: float, interruptible: bool = True) -> bool:
        """Wait up to `seconds`; True as soon as a stop was requested (if interruptible)."""
        deadline = time.monotonic() + seconds
        while True:
            while self._exiting:
                self._exiting.pop()
                self._term.line("Exiting...")
            remaining = deadline - time.monotonic()
            if (interruptible and self.requested) or remaining <= 0:
                return self.requested
            time.sleep(min(remaining, POLL_S))


class JobSource:
    """Jobs from the behaviour file first, then `*.json` files in the queue directory (name order)."""

    def __init__(self, root: Path, jobs: tuple[Job, ...], term: Terminal) -> None:
        self._pending = deque(jobs)
        self._queue = github_dir(root) / JOBS_DIR
        self._term = term

    def take(self) -> Job | None:
        """The next job, or None if there is none right now."""
        if self._pending:
            return self._pending.popleft()
        try:
            names = sorted(p.name for p in self._queue.iterdir())
        except FileNotFoundError:
            return None
        for name in names:
            if name.startswith(".") or not name.endswith(".json"):
                continue
            path = self._queue / name
            try:
                text = path.read_text(encoding="utf-8")
                path.unlink()
            except FileNotFoundError:
                continue
            try:
                return Job.from_obj(_json(text))
            except BehaviourError as exc:
                self._term.error(f"fake runner: ignoring job file {name}: {exc}")
        return None


def run(root: Path, cmd: CommandLine, behaviour: Behaviour, term: Terminal, stopper: Stopper) -> int:
    """`run.sh` => `Runner.Listener run`; returns the listener's exit code."""
    jitconfig = cmd.arg("jitconfig")
    if jitconfig is not None:
        failed = _apply_jitconfig(root, jitconfig, behaviour, term)
        if failed is not None:
            return failed
    settings = read_settings(root)
    if settings is None:
        term.error(NOT_CONFIGURED)
        return 1
    if cmd.flag("once"):
        term.line(
            "Warning: '--once' is going to be deprecated in the future, please consider using "
            "'--ephemeral' during runner registration.",
            YELLOW,
        )
        term.line(
            "https://docs.github.com/en/actions/hosting-your-own-runners/"
            "autoscaling-with-self-hosted-runners#using-ephemeral-runners-for-autoscaling",
            YELLOW,
        )
    ephemeral = settings.get("ephemeral") is True
    run_once = ephemeral or cmd.flag("once")

    if stopper.sleep(behaviour.connect_delay_s):
        return 0
    term.line()
    term.success("Connected to GitHub")
    term.line()
    if jitconfig is not None and jitconfig in behaviour.reject_jitconfigs:
        term.error(REGISTRATION_DELETED)
        return 1
    if stopper.sleep(behaviour.listen_delay_s):
        return 0
    term.line(f"Current runner version: '{behaviour.version}'")
    term.stamped("Listening for Jobs")
    if behaviour.exit_after_listening is not None:
        return behaviour.exit_after_listening

    source = JobSource(root, behaviour.jobs, term)
    while not stopper.sleep(0):
        job = source.take()
        if job is None:
            stopper.sleep(POLL_S)
            continue
        if _run_job(root, job, behaviour, term, stopper, str(settings.get("workFolder") or "_work")):
            return 0
        if run_once:
            if ephemeral:
                _forget_runner(root, behaviour, str(settings.get("agentName", "")))
                delete_local_config(root, term)
            return 0
    return 0


def _run_job(root: Path, job: Job, behaviour: Behaviour, term: Terminal, stopper: Stopper, work_folder: str) -> bool:
    """Run one job (its hooks and steps, as the worker would); True if it was cancelled by a stop request."""
    # Before the job is announced, so that whoever has seen it start finds what it left behind.
    leave_behind(root, job.leave_behind, f"job {job.name}")
    term.stamped(f"Running job: {job.name}")
    env, workspace = job_environment(root, work_folder, job)
    result = job.result
    cancelled = False
    started = run_hook(root, "started", env, workspace)
    if stopper.sleep(0):
        # Stopped while the hook ran (a Ctrl-C reaches the hook's process too): the job is cancelled.
        stopper.sleep(behaviour.cancel_delay_s, interruptible=False)
        cancelled = True
    elif started is False:
        result = "Failed"  # the steps are skipped
    else:
        pause = job.duration_s / (len(job.lines) + 1)
        for line in (*job.lines, None):
            if stopper.sleep(pause):
                stopper.sleep(behaviour.cancel_delay_s, interruptible=False)
                cancelled = True
                break
            if line is not None:
                term.line(line)
    if run_hook(root, "completed", env, workspace) is False and result in ("Succeeded", "SucceededWithIssues"):
        result = "Failed"
    if cancelled:
        term.stamped(f"Job {job.name} completed with result: Canceled")
        return True
    if not job.lost:
        term.stamped(f"Job {job.name} completed with result: {result}")
    return False


def _apply_jitconfig(root: Path, jitconfig: str, behaviour: Behaviour, term: Terminal) -> int | None:
    """Write the JIT config's files; an opaque blob becomes a synthetic ephemeral registration."""
    try:
        write_jit_files(root, decode_jitconfig(jitconfig))
    except ValueError as exc:
        if behaviour.strict_jitconfig:
            term.error(str(exc))
            return 1
        name = "jit-" + hashlib.sha256(jitconfig.encode("utf-8")).hexdigest()[:8]
        save_config(root, new_settings(name, "https://github.com/fake-org", "Default", "_work", True, False))
    return None


def _forget_runner(root: Path, behaviour: Behaviour, name: str) -> None:
    """GitHub deletes an ephemeral runner's registration once its job is done."""
    registry = load_registry(root, behaviour)
    if registry.pop(name, None) is not None:
        save_registry(root, registry)


def _json(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BehaviourError(f"invalid JSON: {exc}") from exc
