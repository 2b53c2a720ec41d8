"""Nothing the runner starts outlives it: what a runner process leaves behind is killed, waited for and reaped.

`miglet run` makes MIGlet a child subreaper (`miglet.hardening`), so a process the runner orphans, a `setsid` or
double-forked daemon, a job's background server, is re-parented to MIGlet instead of init and stays one of its
descendants. Whenever a runner process (`config.sh`, `run.sh`, `config.sh remove`) ends, `kill_leftovers`
SIGKILLs what is left of its session and, in a subreaper, every other descendant of MIGlet; then it waits until
they are dead and reaps those that became MIGlet's children. Outside a subreaper (tests, benchmarks, where "every
descendant" would be the test runner's own processes) only the session is swept. `miglet run` runs one agent,
whose runner processes run one at a time, so at that moment every descendant is a leftover.

Reaping: trio waits on the processes it started and must be the one to reap them, or it would read a wrong exit
code. `trio_children` holds their pids, from before the spawn until trio has reaped them; every other zombie
child of a subreaper MIGlet is reaped here, after each sweep and on SIGCHLD (`reap_orphans_task`), which the
kernel sends whenever an adopted process dies or is adopted dead. A process MIGlet runs must go through
`trio_children.track()`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Final, NamedTuple

import trio

from miglet.hardening import is_child_subreaper
from miglet.procfs import ProcEntry, process_table, read_entry

log = logging.getLogger(__name__)

# How long a sweep may take, stopping what is left and waiting for it to die (a process stuck in the kernel may
# take longer; it has its SIGKILL and dies on its way out of the kernel, later).
SWEEP_WAIT_S: Final = 1.0
# Each round stops what the processes found before forked before they were stopped; a few rounds catch them all,
# even a process that keeps starting a copy of itself and exiting.
MAX_ROUNDS: Final = 100
# Between two passes of reaping on SIGCHLD: a zombie waits at most this long.
REAP_PAUSE_S: Final = 0.05
# One log line per killed process up to this many, then one line with the total.
LOGGED_KILLS: Final = 20


class Leftover(NamedTuple):
    pid: int
    command: str


class TrioChildren:
    """The pids of the runner processes trio waits on: theirs to reap, never the sweep's."""

    def __init__(self) -> None:
        self._pids: set[int] = set()
        # Spawns under way: their pid is not known yet, so reaping waits until it is.
        self._starting = 0
        self._reap_deferred = False

    def __contains__(self, pid: object) -> bool:
        return pid in self._pids

    @contextlib.contextmanager
    def track(self) -> Iterator[Callable[[int], None]]:
        """Around a spawn and the wait for its end: call the function given with the new process's pid."""
        self._starting += 1
        adopted: list[int] = []

        def adopt(pid: int) -> None:
            self._pids.add(pid)
            adopted.append(pid)
            self._started()

        try:
            yield adopt
        finally:
            if adopted:
                self._pids.discard(adopted[0])
            else:  # the spawn failed
                self._started()

    def _started(self) -> None:
        self._starting -= 1
        if self._reap_deferred and not self._starting:
            reap_orphans()

    def defer_reaping(self) -> bool:
        """True (and reaping is done once the spawn is known) while a spawn's pid is not known yet."""
        self._reap_deferred = self._starting > 0
        return self._reap_deferred


trio_children = TrioChildren()


def descendants(root: int, table: Mapping[int, ProcEntry]) -> set[int]:
    """Every process in `table` below `root` in the tree of parents."""
    children: dict[int, list[int]] = {}
    for pid, entry in table.items():
        children.setdefault(entry.ppid, []).append(pid)
    found: set[int] = set()
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _scope(sid: int | None, table: Mapping[int, ProcEntry], subreaper: bool) -> set[int]:
    """The processes, dead or alive, that a runner process with session `sid` left behind (with no session: every
    descendant)."""
    found = {pid for pid, entry in table.items() if entry.session == sid} if sid is not None else set()
    if subreaper:
        found |= descendants(os.getpid(), table)
    return {pid for pid in found if pid not in trio_children and pid != os.getpid()}


def _own_groups(scope: set[int], table: Mapping[int, ProcEntry]) -> set[int]:
    """The process groups of the processes in `scope` that hold nothing else (never MIGlet's own).

    Dead processes count: of a process that keeps starting a copy of itself and exiting, a scan of the table may
    find only the dead copies, and their group holds the live one.
    """
    groups = {table[pid].group for pid in scope} - {os.getpgrp(), 0, 1}
    for pid, entry in table.items():
        if entry.group in groups and pid not in scope:
            groups.discard(entry.group)
    return groups


def _stop(pid: int, entry: ProcEntry) -> tuple[bool, int | None]:
    """SIGSTOP `pid` if it is still the process `entry` describes: (stopped, a pidfd to signal it and wait on it
    with). A stopped process can neither fork nor exit, so the sweep's picture of the tree stays true."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False, None
    except OSError:  # no pidfds here: signal by pid, and wait for nothing
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
            return True, None
        return False, None
    try:
        # The pidfd holds on to one process; this checks that it is the one found (its pid was not reused).
        if read_entry(pid).start_ticks != entry.start_ticks:
            os.close(pidfd)
            return False, None
        signal.pidfd_send_signal(pidfd, signal.SIGSTOP)
    except (OSError, ValueError) as exc:
        os.close(pidfd)
        if isinstance(exc, PermissionError):
            raise
        return False, None
    return True, pidfd


async def _wait_gone(pidfds: list[int]) -> None:
    for pidfd in pidfds:
        await trio.lowlevel.wait_readable(pidfd)  # readable once the process has exited


async def kill_leftovers(sid: int | None, *, already_killed: Collection[int] = ()) -> list[Leftover]:
    """SIGKILL what a runner process that led session `sid` left behind, wait (briefly) until it is dead, reap it.

    Everything found is stopped first, round after round until nothing new turns up, and only then killed: a
    process that keeps starting a copy of itself and exiting is caught in a round, stopped, and cannot start
    another. Returns the processes killed and logs them, except those in `already_killed` (killed as part of
    stopping the runner: not left behind). Outside a subreaper, only the session is swept; with no session
    (`sid` None), every descendant is.
    """
    subreaper = is_child_subreaper()
    stopped: dict[int, Leftover] = {}
    refused: set[int] = set()
    pidfds: dict[int, int] = {}
    stopped_groups: set[int] = set()
    settled = False
    try:
        with trio.move_on_after(SWEEP_WAIT_S):
            for _ in range(MAX_ROUNDS):
                table = process_table()
                scope = _scope(sid, table, subreaper)
                targets = {pid for pid in scope if table[pid].alive} - stopped.keys() - refused
                groups = _own_groups(scope, table) - stopped_groups
                if not targets and not groups:
                    settled = True
                    break
                # A whole process group at once first: a process forking as it is signalled cannot slip out of
                # its group's signal, as it can out of a list of pids read a moment before.
                for group in groups:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(group, signal.SIGSTOP)
                        stopped_groups.add(group)
                for pid in sorted(targets):
                    try:
                        done, pidfd = _stop(pid, table[pid])
                    except PermissionError:
                        log.warning(
                            "Cannot kill a process the runner left behind",
                            extra={"pid": pid, "command": table[pid].name},
                        )
                        refused.add(pid)
                        continue
                    if done:
                        stopped[pid] = Leftover(pid, table[pid].name)
                    if pidfd is not None:
                        pidfds[pid] = pidfd
                await trio.lowlevel.checkpoint()
    finally:
        # Whatever was stopped is killed, however the rounds ended (cancelled too): a process must never be left
        # stopped.
        for group in stopped_groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        for pid in stopped:
            _kill(pid, pidfds.get(pid))
    try:
        if not settled:
            log.error(
                "The runner left processes that kept multiplying faster than they could be stopped",
                extra={"stopped": len(stopped)},
            )
        with trio.move_on_after(SWEEP_WAIT_S):
            await _wait_gone(list(pidfds.values()))
    finally:
        for pidfd in pidfds.values():
            os.close(pidfd)
    if subreaper:
        reap_orphans()
    leftovers = [leftover for pid, leftover in stopped.items() if pid not in already_killed]
    _log_kills(leftovers)
    return leftovers


async def sweep_descendants() -> list[Leftover]:
    """Kill and reap every descendant this (subreaper) process still has: the last step of a stop, for whatever
    escaped every sweep before it. Nothing happens outside a subreaper."""
    if not is_child_subreaper():
        return []
    return await kill_leftovers(None)


def _kill(pid: int, pidfd: int | None) -> None:
    """SIGKILL a process stopped by the sweep (through its pidfd, which cannot reach a reused pid)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)


def _log_kills(leftovers: list[Leftover]) -> None:
    for leftover in leftovers[:LOGGED_KILLS]:
        log.warning("Killed a process the runner left behind", extra={"pid": leftover.pid, "command": leftover.command})
    if len(leftovers) > LOGGED_KILLS:
        log.warning("Killed more processes the runner left behind", extra={"killed": len(leftovers)})


def reap_orphans() -> int:
    """Reap every zombie child of this (subreaper) process that trio does not wait on; returns how many.

    Only a subreaper does: elsewhere a zombie child is a process someone else (trio, a test) started and waits on.
    """
    if trio_children.defer_reaping() or not is_child_subreaper():
        return 0
    me = os.getpid()
    reaped = 0
    for pid, entry in process_table().items():
        if entry.ppid == me and not entry.alive and pid not in trio_children:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    reaped += 1
                    log.debug("Reaped an orphan", extra={"pid": pid, "command": entry.name})
    return reaped


async def reap_orphans_task() -> None:
    """Reap orphans re-parented to this subreaper as they die, so that none lingers as a zombie (a job waiting
    for a daemon it killed, with `kill -0`, would wait for a zombie forever)."""
    with trio.open_signal_receiver(signal.SIGCHLD) as signals:
        reap_orphans()
        async for _ in signals:
            reap_orphans()
            # Each pass reads all of /proc: a job whose orphans die by the thousand gets one pass per pause, which
            # reaps them all (signals that came meanwhile are one).
            await trio.sleep(REAP_PAUSE_S)
