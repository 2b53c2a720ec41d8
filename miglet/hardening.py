"""What `miglet run` does to its own process so that the runner's jobs can neither read its secrets nor outlive it.

Non-dumpable (`PR_SET_DUMPABLE` 0): the /proc files that show MIGlet's memory and environment (`environ`, `mem`,
`fd`, ...) turn root's, and no other process of MIGlet's user may ptrace it, so a job running as that user cannot
read the controller token out of MIGlet. It does not hold against root, nor protect files MIGlet reads; only a
runner under another uid does that, and `token_exposures` says when it is not. Child subreaper
(`PR_SET_CHILD_SUBREAPER`): a process the runner orphans (a `setsid` or double-forked daemon) is re-parented to
MIGlet instead of init, so it stays MIGlet's descendant, to be found and killed (`miglet.runner.reaper`).

Both are Linux's `prctl`; elsewhere, or when it fails, MIGlet warns and carries on.
"""

from __future__ import annotations

import ctypes
import functools
import os
import pwd
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final, NamedTuple

from miglet.config import Config

PR_GET_DUMPABLE: Final = 3
PR_SET_DUMPABLE: Final = 4
PR_SET_CHILD_SUBREAPER: Final = 36
PR_GET_CHILD_SUBREAPER: Final = 37


@functools.cache
def _prctl() -> Any:
    """libc's prctl, or None where there is none."""
    try:
        function = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    function.restype = ctypes.c_int
    return function


def prctl(option: int, argument: int = 0) -> int:
    """Call prctl(2); raises OSError when it fails or the system has none."""
    function = _prctl()
    if function is None:
        raise OSError(38, "prctl is not available on this system")  # ENOSYS
    result: int = function(option, argument, 0, 0, 0)
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return result


def make_non_dumpable() -> None:
    prctl(PR_SET_DUMPABLE, 0)


def is_dumpable() -> bool:
    return prctl(PR_GET_DUMPABLE) != 0


def become_child_subreaper() -> None:
    prctl(PR_SET_CHILD_SUBREAPER, 1)


def is_child_subreaper() -> bool:
    """Whether orphaned descendants are re-parented to this process; False where that cannot be known."""
    flag = ctypes.c_int(0)
    try:
        prctl(PR_GET_CHILD_SUBREAPER, ctypes.addressof(flag))
    except OSError:
        return False
    return flag.value != 0


def harden_process() -> list[tuple[str, str]]:
    """Make this process non-dumpable and a child subreaper; returns (what failed, why) for each that did not
    take, to be logged once logging is set up."""
    steps = (
        (make_non_dumpable, "Cannot make MIGlet non-dumpable: processes of its user can read its memory"),
        (become_child_subreaper, "Cannot make MIGlet a child subreaper: what the runner orphans may outlive it"),
    )
    problems: list[tuple[str, str]] = []
    for step, what in steps:
        try:
            step()
        except OSError as exc:
            problems.append((what, exc.strerror or str(exc)))
    return problems


class Exposure(NamedTuple):
    """How a job could read the controller token: a stable message, and the particulars."""

    message: str
    fields: dict[str, str | int]


def token_exposures(config: Config, token_file: str | None) -> list[Exposure]:
    """How a job could read the controller token under this configuration; [] when it could not, or there is
    no token.

    A job runs as the runner's user. Sharing MIGlet's uid (MIGlet not root, or root without MIGLET_RUNNER_USER)
    gives it every file MIGlet can read and every signal MIGlet may receive (non-dumpable only keeps it out of
    MIGlet's memory, and not at all when that user is root). A runner user of its own still reads a token file
    whose permission bits let it.
    """
    if config.controller_token is None:
        return []
    if os.geteuid() != 0:
        return [
            Exposure(
                "The runner runs as MIGlet's own user: a job can read the files MIGlet reads, a controller token "
                "file among them, and signal MIGlet. Run MIGlet as root with MIGLET_RUNNER_USER",
                {"uid": os.geteuid()},
            )
        ]
    if config.runner_user is None:
        return [
            Exposure(
                "The runner runs as root, as MIGlet does: a job can read the controller token. Set MIGLET_RUNNER_USER",
                {},
            )
        ]
    if token_file is not None:
        entry = pwd.getpwnam(config.runner_user)
        if readable_by(Path(token_file), entry.pw_uid, os.getgrouplist(config.runner_user, entry.pw_gid)):
            return [
                Exposure(
                    "The runner's user can read the controller token file, and so can every job: make it "
                    "readable by root only (chmod 0400)",
                    {"path": token_file, "runner_user": config.runner_user},
                )
            ]
    return []


def readable_by(path: Path, uid: int, gids: Iterable[int]) -> bool:
    """Whether `uid` (with groups `gids`) may read `path` by its permission bits, every directory on the way
    included (access control lists are not looked at). A path that cannot be examined counts as unreadable."""
    groups = set(gids)

    def allows(info: os.stat_result, user: int, group: int, other: int) -> bool:
        if info.st_uid == uid:
            return bool(info.st_mode & user)
        if info.st_gid in groups:
            return bool(info.st_mode & group)
        return bool(info.st_mode & other)

    try:
        resolved = path.resolve(strict=True)
        if not allows(resolved.stat(), stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH):
            return False
        return all(allows(parent.stat(), stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH) for parent in resolved.parents)
    except OSError:
        return False
