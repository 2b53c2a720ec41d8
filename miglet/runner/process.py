"""The real runner: `config.sh` and `run.sh` as subprocesses.

Each runs from the runner directory as an argument list (never through a shell), in a new session so that its
whole process group can be signalled, with secrets passed only in its environment. When MIGlet is root it runs
them as MIGLET_RUNNER_USER, or else allows the runner to run as root and says so once. Whatever a process leaves
behind when it ends is killed and reaped (`miglet.runner.reaper`), and the pid of the one running is reported as
it starts and ends, for the state file.
"""

from __future__ import annotations

import codecs
import contextlib
import logging
import os
import pwd
import shutil
import signal
import subprocess
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any, Final

import trio

from miglet.procfs import process_table, read_stat
from miglet.runner.backend import ConfigureFailed, Exited, Grace, Line, LineSink, Registration, RunEvent, Started
from miglet.runner.output import clean
from miglet.runner.reaper import Leftover, kill_leftovers, trio_children
from miglet.secret import Secret, redact, redact_partial

log = logging.getLogger(__name__)

MAX_LINE: Final = 16 * 1024
# A failure is reported with the last lines the runner wrote to stderr (its errors span several lines).
ERROR_LINES_KEPT: Final = 3
# The runner's configuration; a new configuration must not find any of it. config.sh writes the first three; the
# runner writes the "_migrated" pair when GitHub moves it to new credentials, and then prefers that pair.
RUNNER_CONFIG_FILES: Final = (
    ".runner",
    ".credentials",
    ".credentials_rsaparams",
    ".runner_migrated",
    ".credentials_migrated",
)
MAX_ERROR: Final = 1000
CONFIG_SH_GRACE_S: Final = 5.0
# The warmup runs at the lowest priority, so that whatever else runs (config.sh, the runner) goes first.
WARMUP_NICENESS: Final = 19
# Once the runner has exited, how long its output pipes may stay open before they are abandoned.
DRAIN_SECONDS: Final = 2.0
_DROPPED_ENV_PREFIXES: Final = ("MIGLET_", "ACTIONS_RUNNER_INPUT_")
# What systemd hands MIGlet itself: its notification socket, credentials, socket activation and watchdog.
_DROPPED_ENV: Final = frozenset(
    {
        "NOTIFY_SOCKET",
        "CREDENTIALS_DIRECTORY",
        "LISTEN_PID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
        "WATCHDOG_PID",
        "WATCHDOG_USEC",
        "INVOCATION_ID",
        "JOURNAL_STREAM",
    }
)


def runner_environment(base: Mapping[str, str]) -> dict[str, str]:
    """The environment the runner (and so every job) inherits: MIGlet's own, less what is MIGlet's alone."""
    return {
        key: value
        for key, value in base.items()
        if not key.startswith(_DROPPED_ENV_PREFIXES) and key not in _DROPPED_ENV
    }


def _failure(what: str, code: int, error: str | None) -> str:
    return f"{what} exited with code {code}" + (f": {error}" if error else "")


def config_arguments(registration: Registration) -> list[str]:
    argv = [
        "./config.sh",
        "--unattended",
        "--url",
        registration.url,
        "--name",
        registration.name,
        "--labels",
        ",".join(registration.labels),
        "--runnergroup",
        registration.group,
        "--work",
        "_work",
        "--replace",
    ]
    if registration.ephemeral:
        argv.append("--ephemeral")
    if registration.disable_update:
        argv.append("--disableupdate")
    return argv


class ProcessRunner:
    """Runs GitHub's actions/runner from `runner_dir`."""

    def __init__(
        self,
        runner_dir: Path,
        *,
        grace: Callable[[], Grace],
        user: str | None = None,
        environ: Mapping[str, str] | None = None,
        on_pid: Callable[[int | None], object] = lambda pid: None,
        prepare_run: Callable[[Mapping[str, str]], Mapping[str, str]] = lambda env: {},
    ) -> None:
        self._dir = runner_dir
        self._grace = grace
        # Called with the runner's environment just before run.sh starts; returns variables to add to it (the
        # job hooks, `miglet.runner.hooks`).
        self._prepare_run = prepare_run
        # Told the pid of each runner process as it starts, and None once it has ended.
        self._on_pid = on_pid
        self._env = runner_environment(os.environ if environ is None else environ)
        self._spawn_options: dict[str, Any] = {}
        if os.geteuid() == 0:
            if user is not None:
                self._run_as(user)
            else:
                log.warning(
                    "MIGlet runs as root and MIGLET_RUNNER_USER is not set: the runner will run as root "
                    "(RUNNER_ALLOW_RUNASROOT=1)"
                )
                self._env["RUNNER_ALLOW_RUNASROOT"] = "1"

    def _run_as(self, user: str) -> None:
        entry = pwd.getpwnam(user)
        self._spawn_options = {
            "user": entry.pw_uid,
            "group": entry.pw_gid,
            "extra_groups": os.getgrouplist(user, entry.pw_gid),
        }
        self._env.update(HOME=entry.pw_dir, USER=user, LOGNAME=user)

    async def configure(self, registration: Registration, on_line: LineSink) -> None:
        if registration.token is None:
            raise ConfigureFailed("no registration token to configure the runner with")
        env = {**self._env, "ACTIONS_RUNNER_INPUT_TOKEN": registration.token.reveal()}
        code, error = await self._run(config_arguments(registration), env, on_line, grace=_config_grace)
        if code != 0:
            raise ConfigureFailed(_failure("config.sh", code, error))

    async def run(self, registration: Registration, events: trio.MemorySendChannel[RunEvent]) -> None:
        env = {**self._env, **self._prepare_run(self._env), "RUNNER_MANUALLY_TRAP_SIG": "1"}
        if registration.jit_config is not None:
            env["ACTIONS_RUNNER_INPUT_JITCONFIG"] = registration.jit_config.reveal()
        await self._run(["./run.sh"], env, _nowhere, self._grace, events)

    async def warmup(self) -> bool:
        """`./bin/Runner.Listener warmup`, at the lowest CPU priority; cancelling it kills it at once (it keeps
        nothing). False when there is no Runner.Listener to warm up."""
        listener = self._dir / "bin" / "Runner.Listener"
        if not listener.is_file():
            return False
        argv = ["./bin/Runner.Listener", "warmup"]
        if (nice := shutil.which("nice")) is not None:
            argv = [nice, "-n", str(WARMUP_NICENESS), *argv]
        try:
            with trio_children.track() as adopt:
                process = await trio.lowlevel.open_process(
                    argv,
                    cwd=self._dir,
                    env=self._env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                    **self._spawn_options,
                )
                adopt(process.pid)
                log.info("Warming the runner up", extra={"pid": process.pid})
                try:
                    await process.wait()
                except BaseException:
                    # Stopped: its session goes with it, killed before it is reaped so that its pid cannot name
                    # another process yet. Not a sweep of MIGlet's descendants, which would take config.sh's
                    # processes, started meanwhile, for leftovers.
                    with trio.CancelScope(shield=True):
                        await kill_session_and_wait(process.pid)
                        await process.wait()
                    raise
        except OSError as exc:
            raise ConfigureFailed(f"cannot start the warmup in {self._dir}: {exc.strerror or exc}") from None
        if process.returncode != 0:
            raise ConfigureFailed(f"Runner.Listener warmup exited with code {process.returncode}")
        return True

    async def remove(self, token: Secret, on_line: LineSink) -> None:
        env = {**self._env, "ACTIONS_RUNNER_INPUT_TOKEN": token.reveal()}
        code, error = await self._run(["./config.sh", "remove"], env, on_line, grace=_config_grace)
        if code != 0:
            raise ConfigureFailed(_failure("config.sh remove", code, error))

    async def clean(self) -> None:
        for name in RUNNER_CONFIG_FILES:
            path = self._dir / name
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("Cannot remove runner file", extra={"path": str(path), "error": str(exc)})

    async def _run(
        self,
        argv: list[str],
        env: dict[str, str],
        on_line: LineSink,
        grace: Callable[[], Grace],
        events: trio.MemorySendChannel[RunEvent] | None = None,
    ) -> tuple[int, str | None]:
        """Run `argv` to completion, relaying its output (to `on_line`, or as events); returns its exit code and
        its last error lines."""
        exited = trio.Event()
        errors: deque[str] = deque(maxlen=ERROR_LINES_KEPT)
        # Some failures are told on stdout only: config.sh's own checks ("Must not run with sudo", a missing
        # .NET dependency) print there before exiting 1.
        said: deque[str] = deque(maxlen=ERROR_LINES_KEPT)

        async def sink(stream: str, line: str) -> None:
            if cleaned := clean(line):
                (errors if stream == "stderr" else said).append(cleaned)
            if events is None:
                on_line(stream, line)
            else:
                await _tell(events, Line(stream, line))

        process: trio.Process | None = None
        start_error: OSError | ValueError | None = None
        # Processes of the runner that stopping it killed: gone with it, not left behind.
        stopped: set[int] = set()
        leftovers: list[Leftover] = []
        try:
            with trio_children.track() as adopt:
                async with trio.open_nursery() as nursery:
                    try:
                        process = await nursery.start(partial(self._process_task, argv, env, exited, grace, stopped))
                    except (OSError, ValueError) as exc:
                        # Raised from here, it would leave the nursery wrapped in an exception group.
                        start_error = exc
                    else:
                        adopt(process.pid)
                        self._on_pid(process.pid)
                        if events is not None:
                            await _tell(events, Started(process.pid))
                        nursery.start_soon(_relay_output, process, exited, sink, stopped, leftovers)
        finally:
            # Also when cancelled: by then the process has exited (run_process waits for it, shielded).
            if process is not None:
                self._on_pid(None)
            if events is not None and process is not None and process.returncode is not None:
                with trio.CancelScope(shield=True) as telling:
                    telling.deadline = trio.current_time() + DRAIN_SECONDS
                    await _tell(events, Exited(process.returncode, len(leftovers)))
        if process is None:
            reason = start_error.strerror if isinstance(start_error, OSError) and start_error.strerror else start_error
            raise ConfigureFailed(f"cannot start {argv[0]} in {self._dir}: {reason}")
        assert process.returncode is not None
        last_words = errors or said
        error = redact(" ".join(last_words))[:MAX_ERROR] if last_words else None
        return process.returncode, error

    async def _process_task(
        self,
        argv: list[str],
        env: dict[str, str],
        exited: trio.Event,
        grace: Callable[[], Grace],
        stopped: set[int],
        *,
        task_status: trio.TaskStatus[trio.Process],
    ) -> None:
        try:
            await trio.run_process(
                argv,
                cwd=self._dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                check=False,
                start_new_session=True,
                deliver_cancel=partial(_deliver_cancel, grace, stopped),
                task_status=task_status,
                **self._spawn_options,
            )
        finally:
            exited.set()


async def _deliver_cancel(grace: Callable[[], Grace], stopped: set[int], process: trio.Process) -> None:
    """Graceful stop: SIGINT to the process group; SIGKILL to all of its session after the grace period (the
    processes killed are added to `stopped`)."""
    period = grace()
    log.info("Stopping the runner", extra={"pid": process.pid, "grace_s": period.seconds})
    signal_group(process.pid, signal.SIGINT)
    await period.wait()
    log.warning("The runner did not stop within its grace period; killing it", extra={"pid": process.pid})
    stopped.update(kill_session(process.pid))


def _config_grace() -> Grace:
    """`config.sh` (configure or remove) stops at once on SIGINT; it gets a short grace of its own, so that
    neither a stop during configuration nor a bounded removal waits for the runner's grace."""
    return Grace(CONFIG_SH_GRACE_S)


def signal_group(pgid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def kill_session(sid: int) -> list[int]:
    """SIGKILL every process in session `sid`; returns the pids found in it.

    The real run.sh turns on job control (`set -m`) so the listener gets a process group of its own: killing
    run.sh's group alone would orphan it. Every process MIGlet started shares the session it was given, unless it
    left it (`setsid`): those are found among MIGlet's descendants when the runner process has ended.
    """
    signal_group(sid, signal.SIGKILL)
    members = _session_members(sid)
    for pid in members:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return members


async def kill_session_and_wait(sid: int) -> None:
    """SIGKILL every process in session `sid`, then wait until they are gone: a killed process takes a moment
    to die, and whoever is told the runner has stopped may look for what is left of it."""
    kill_session(sid)
    for pid in _session_members(sid):
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:  # gone already (or no pidfd support: nothing to wait with)
            continue
        try:
            await trio.lowlevel.wait_readable(pidfd)  # readable once the process has exited
        finally:
            os.close(pidfd)


def kill_leftover_runner(pid: int, runner_dir: Path) -> bool:
    """Kill a runner that an earlier MIGlet (killed itself, say) left running from `runner_dir`.

    Only a session leader working in `runner_dir` qualifies, so that a reused pid is never mistaken for one.
    """
    try:
        stat = read_stat(pid)
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except (OSError, ValueError):
        return False
    if stat.session != pid or not stat.alive or Path(cwd) != runner_dir.resolve():
        return False
    kill_session(pid)
    return True


def _session_members(sid: int) -> list[int]:
    """The live processes of session `sid` (a zombie is already dead)."""
    return [pid for pid, entry in process_table().items() if entry.session == sid and entry.alive]


# Called with (stream name, line) for each line, as it is read.
_AsyncSink = Callable[[str, str], Awaitable[object]]


def _nowhere(stream: str, line: str) -> None:
    """The output of run.sh goes to its events instead."""


async def _tell(events: trio.MemorySendChannel[RunEvent], event: RunEvent) -> None:
    """Send `event`; a reader that has gone away has stopped listening, which is not the runner's concern."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await events.send(event)


async def _relay_output(
    process: trio.Process,
    exited: trio.Event,
    sink: _AsyncSink,
    stopped: set[int],
    leftovers: list[Leftover],
) -> None:
    """Relay stdout and stderr line by line, even while the caller is being cancelled.

    Shielded so that a stopping runner's last lines (a job ending `Canceled`) are still read, and bounded:
    once the runner has exited, what it left behind is killed (and added to `leftovers`), which also closes
    the pipes a leftover held, and the pipes get DRAIN_SECONDS.
    """
    with trio.CancelScope(shield=True) as scope:
        async with trio.open_nursery() as nursery:
            assert process.stdout is not None
            assert process.stderr is not None
            nursery.start_soon(_relay_lines, process.stdout, "stdout", sink)
            nursery.start_soon(_relay_lines, process.stderr, "stderr", sink)
            await exited.wait()
            scope.deadline = trio.current_time() + DRAIN_SECONDS
            leftovers.extend(await kill_leftovers(process.pid, already_killed=stopped))


async def _relay_lines(stream: trio.abc.ReceiveStream, name: str, sink: _AsyncSink) -> None:
    lines = _MaskedLines()
    async with stream:
        while chunk := await stream.receive_some(65536):
            for line in lines.feed(chunk):
                await sink(name, line)
    for line in lines.finish():
        await sink(name, line)


# Ends a line cut at MAX_LINE characters.
CUT_MARK: Final = "…"


class _MaskedLines:
    """A runner's output as lines, secrets masked before a line is cut to MAX_LINE characters.

    Decoding is incremental, so a character split across reads stays whole. A line is masked as it arrives,
    holding back only what could be the start of a secret, so memory stays bounded whatever the runner prints:
    once the masked line is longer than MAX_LINE, its first MAX_LINE characters are passed on (ending in
    CUT_MARK) and the rest of it is dropped, never passed on as lines of their own that could be read as the
    runner's.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._masked = ""  # the line so far, masked: nothing that follows can change it
        self._raw = ""  # the rest of the line so far, not masked yet
        self._held = 0  # how much of `_raw` the last masking held back, as a secret might start in it
        self._dropping = False  # the line was cut: the rest of it goes

    def feed(self, data: bytes | bytearray) -> list[str]:
        return self._split(self._decoder.decode(data))

    def finish(self) -> list[str]:
        """The lines left when the stream has ended, the last one without its newline."""
        lines = self._split(self._decoder.decode(b"", final=True))
        if (self._masked or self._raw) and not self._dropping:
            lines.append(self._end_line())
        return lines

    def _split(self, text: str) -> list[str]:
        lines: list[str] = []
        *ended, rest = text.split("\n")
        for part in ended:
            if self._dropping:
                self._dropping = False
            else:
                self._raw += part
                lines.append(self._end_line())
        if rest and not self._dropping:
            self._raw += rest
            # Masking scans what it held back last time (up to a JIT config's length): once per MAX_LINE new
            # characters, not once per read, which may be a single byte.
            if len(self._raw) > self._held + MAX_LINE:
                done, self._raw = redact_partial(self._raw)
                self._held = len(self._raw)
                self._masked += done
                if len(self._masked) > MAX_LINE and len(self._masked.rstrip("\r")) > MAX_LINE:
                    lines.append(self._masked[:MAX_LINE] + CUT_MARK)
                    self._reset()
                    self._dropping = True
        return lines

    def _end_line(self) -> str:
        line = (self._masked + redact(self._raw)).rstrip("\r")
        self._reset()
        return line if len(line) <= MAX_LINE else line[:MAX_LINE] + CUT_MARK

    def _reset(self) -> None:
        self._masked = self._raw = ""
        self._held = 0
