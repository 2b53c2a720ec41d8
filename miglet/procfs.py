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


def read_stat(pid: int | str = "self") -> ProcStat:
    """Read a process's stat line; raises OSError (no such process) or ValueError (unreadable line)."""
    with open(f"/proc/{pid}/stat", "rb") as handle:
        stat = handle.read(4096)  # a few hundred bytes; the kernel's comm is at most 64
    # The command name is parenthesised and may itself hold ")" or spaces: the fields start after the last ")".
    end = stat.rfind(b")")
    fields = stat[end + 2 :].split()
    numbers = [fields[index] for index in (3, 11, 12, 19) if index < len(fields)]
    # Plain decimal digits, as the kernel writes them: int() would also take "+1", "1_0" or 5,000 digits.
    if end < 0 or len(numbers) < 4 or not all(n.isdigit() and len(n) <= 20 for n in numbers):
        raise ValueError(f"unreadable /proc/{pid}/stat")
    session, utime, stime, start = map(int, numbers)
    return ProcStat(fields[0], session, utime + stime, start)


def clock_ticks_per_second() -> int:
    return os.sysconf("SC_CLK_TCK")
