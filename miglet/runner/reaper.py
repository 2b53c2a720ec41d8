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

# How long a sweep waits for what it killed to die (a process stuck in the kernel may take longer; it has its
# SIGKILL and dies on its way out of the kernel, later).
SWEEP_WAIT_S: Final = 1.0
# Each round kills what the previous round's processes forked before they died; a few rounds catch them all.
MAX_ROUNDS: Final = 10
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


def _targets(sid: int, table: Mapping[int, ProcEntry], subreaper: bool) -> set[int]:
    """The live processes a runner process with session `sid` left behind."""
    found = {pid for pid, entry in table.items() if entry.session == sid}
    if subreaper:
        found |= descendants(os.getpid(), table)
    return {pid for pid in found if table[pid].alive and pid not in trio_children and pid != os.getpid()}


def _kill(pid: int, entry: ProcEntry) -> tuple[bool, int | None]:
    """SIGKILL `pid` if it is still the process `entry` describes: (killed, a pidfd to wait on it with)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False, None
    except OSError:  # no pidfds here: kill by pid, and wait for nothing
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            return True, None
        return False, None
    try:
        # The pidfd holds on to one process; this checks that it is the one found (its pid was not reused).
        if read_entry(pid).start_ticks != entry.start_ticks:
            os.close(pidfd)
            return False, None
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except (OSError, ValueError) as exc:
        os.close(pidfd)
        if isinstance(exc, PermissionError):
            raise
        return False, None
    return True, pidfd


async def _wait_gone(pidfds: list[int]) -> None:
    for pidfd in pidfds:
        await trio.lowlevel.wait_readable(pidfd)  # readable once the process has exited


async def kill_leftovers(sid: int, *, already_killed: Collection[int] = ()) -> list[Leftover]:
    """SIGKILL what a runner process that led session `sid` left behind, wait (briefly) until it is dead, reap it.

    Returns the processes killed and logs them, except those in `already_killed` (killed as part of stopping
    the runner: not left behind). Outside a subreaper, only the session is swept.
    """
    subreaper = is_child_subreaper()
    killed: dict[int, Leftover] = {}
    refused: set[int] = set()
    pidfds: list[int] = []
    try:
        with trio.move_on_after(SWEEP_WAIT_S):
            for _ in range(MAX_ROUNDS):
                table = process_table()
                targets = _targets(sid, table, subreaper) - killed.keys() - refused
                if not targets:
                    break
                for pid in sorted(targets):
                    try:
                        done, pidfd = _kill(pid, table[pid])
                    except PermissionError:
                        log.warning(
                            "Cannot kill a process the runner left behind",
                            extra={"pid": pid, "command": table[pid].name},
                        )
                        refused.add(pid)
                        continue
                    if done:
                        killed[pid] = Leftover(pid, table[pid].name)
                    if pidfd is not None:
                        pidfds.append(pidfd)
                await _wait_gone(pidfds)
    finally:
        for pidfd in pidfds:
            os.close(pidfd)
    if subreaper:
        reap_orphans()
    leftovers = [leftover for pid, leftover in killed.items() if pid not in already_killed]
    _log_kills(leftovers)
    return leftovers


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
