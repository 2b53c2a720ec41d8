"""What Linux's /proc/<pid>/stat says about a process: the few facts MIGlet needs."""

from __future__ import annotations

import os
from typing import NamedTuple


class ProcStat(NamedTuple):
    state: bytes  # b"R", b"S", ... b"Z" for a zombie (dead, not yet reaped)
    session: int
    cpu_ticks: int  # user + system time used so far
    start_ticks: int  # when it started, in clock ticks since boot

    @property
    def alive(self) -> bool:
        return self.state != b"Z"


def _read_stat_fields(pid: int | str, indices: tuple[int, ...]) -> tuple[bytes, bytes, list[int]]:
    """A stat line's command name, state and the numbers at `indices` (counted from the state, 0); raises OSError
    (no such process) or ValueError (unreadable line)."""
    with open(f"/proc/{pid}/stat", "rb") as handle:
        stat = handle.read(4096)  # a few hundred bytes; the kernel's comm is at most 64
    # The command name is parenthesised and may itself hold ")" or spaces: the fields start after the last ")".
    end = stat.rfind(b")")
    fields = stat[end + 2 :].split()
    numbers = [fields[index] for index in indices if index < len(fields)]
    # Plain decimal digits, as the kernel writes them: int() would also take "+1", "1_0" or 5,000 digits.
    if end < 0 or len(numbers) < len(indices) or not all(n.isdigit() and len(n) <= 20 for n in numbers):
        raise ValueError(f"unreadable /proc/{pid}/stat")
    values = [int(number) for number in numbers]
    if any(value >= 2**64 for value in values):  # twenty digits can still exceed the kernel's 64 bits
        raise ValueError(f"unreadable /proc/{pid}/stat")
    return stat[stat.find(b"(") + 1 : end], fields[0], values


def read_stat(pid: int | str = "self") -> ProcStat:
    """Read a process's stat line; raises OSError (no such process) or ValueError (unreadable line)."""
    _, state, (session, utime, stime, start) = _read_stat_fields(pid, (3, 11, 12, 19))
    return ProcStat(state, session, utime + stime, start)


def clock_ticks_per_second() -> int:
    return os.sysconf("SC_CLK_TCK")


class ProcEntry(NamedTuple):
    """A process as the sweep of the runner's leftovers sees it: who it is and whose child."""

    name: str  # the command name (comm: at most 15 characters, chosen by the process itself)
    state: bytes
    ppid: int
    group: int  # the process group
    session: int
    start_ticks: int

    @property
    def alive(self) -> bool:
        return self.state != b"Z"


def read_entry(pid: int) -> ProcEntry:
    """Read a process's name, state, parent, group, session and start time; raises OSError or ValueError."""
    name, state, (ppid, group, session, start) = _read_stat_fields(pid, (1, 2, 3, 19))
    return ProcEntry(name.decode("utf-8", "replace"), state, ppid, group, session, start)


def process_table() -> dict[int, ProcEntry]:
    """Every process this one can see, by pid (those that vanish while being read are left out)."""
    table: dict[int, ProcEntry] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return table
    for name in names:
        if name.isdigit():
            try:
                table[int(name)] = read_entry(int(name))
            except (OSError, ValueError):
                continue
    return table
