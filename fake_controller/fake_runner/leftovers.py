"""Processes left behind, as a hostile job or a sloppy script leaves them: not part of the real runner.

Whatever the real runner runs (a job's steps, the scripts it calls) can start a process that outlives it; the
fake does so when its behaviour asks (`Job.leave_behind`, `Behaviour.configure_leaves_behind`). Three ways:

- `setsid`: a process in a session of its own, as `setsid CMD &` starts it, still holding the runner's stdout
  and stderr (so whoever reads the runner's output sees no end of it while it lives);
- `double-fork`: a classic daemon: fork, setsid, fork, and the middle process exits at once, so the daemon is
  orphaned from the start; its stdio is /dev/null.
- `hop`: a script that starts a copy of itself and exits, over and over, so that its pid keeps changing: whoever
  reads the process table and then kills what it read finds it gone, and its successor not yet read. It stops
  once `_fake_github/hop.stop` exists (`stop_hopping`); `hopping` finds its current copies.

The first two are a `sleep` of an hour, recorded (pid, start time, how, by whom) in
`_fake_github/left_behind.jsonl`, so that tests can tell whether it still runs; `hop` is recorded with the pid
of its first copy.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .store import LEFT_BEHIND_FILE, append_record, github_dir

LINGER = ["sleep", "3600"]
HOP_SCRIPT = "hop.sh"
HOP_STOP = "hop.stop"
_HOP = '#!/bin/sh\n[ -e "$1" ] && exit 0\n"$0" "$1" &\nexit 0\n'

# Popen objects of the `setsid` processes, kept so that their collection does not warn: they are never waited.
_kept: list[subprocess.Popen[bytes]] = []


def leave_behind(root: Path, ways: tuple[str, ...], by: str) -> None:
    """Start one lingering process per entry of `ways`, and record each."""
    for how in ways:
        pid = _setsid() if how == "setsid" else _hop(root) if how == "hop" else _double_fork()
        append_record(root, LEFT_BEHIND_FILE, {"pid": pid, "start_ticks": _start_ticks(pid), "how": how, "by": by})


def _hop(root: Path) -> int:
    script = github_dir(root) / HOP_SCRIPT
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(_HOP)
    script.chmod(0o755)
    stdio = subprocess.DEVNULL
    process = subprocess.Popen(
        [str(script), str(github_dir(root) / HOP_STOP)], start_new_session=True, stdout=stdio, stderr=stdio
    )
    _kept.append(process)
    return process.pid


def stop_hopping(root: Path) -> None:
    """End every copy of a `hop` leftover, the next time it would start another."""
    stop = github_dir(root) / HOP_STOP
    stop.parent.mkdir(parents=True, exist_ok=True)
    stop.touch()


def hopping(root: Path) -> list[int]:
    """The pids of the copies of a `hop` leftover that run now."""
    script = str(github_dir(root) / HOP_SCRIPT).encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                if script in handle.read():
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def _setsid() -> int:
    process = subprocess.Popen(LINGER, start_new_session=True)
    _kept.append(process)
    return process.pid


def _double_fork() -> int:
    reader, writer = os.pipe()  # both close on exec: the reader sees the end once the daemon runs `sleep`
    middle = os.fork()
    if middle == 0:
        code = 1
        try:
            os.close(reader)
            os.setsid()
            if os.fork() == 0:
                _daemon(writer)
            code = 0
        finally:
            os._exit(code)
    os.close(writer)
    os.waitpid(middle, 0)
    with os.fdopen(reader, "rb") as pipe:
        return int(pipe.read())


def _daemon(writer: int) -> None:
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.write(writer, str(os.getpid()).encode())
        os.execvp(LINGER[0], LINGER)  # noqa: S606 (a fixed argument list)
    finally:
        os._exit(127)


def _start_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:  # gone already (a `hop` copy lives for a moment)
        return None
    return int(stat[stat.rfind(b")") + 2 :].split()[19])
