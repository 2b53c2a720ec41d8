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
        stat = handle.read()
    # The command name is parenthesised and may itself hold ")" or spaces: the fields start after the last ")".
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return ProcStat(fields[0], int(fields[3]), int(fields[11]) + int(fields[12]), int(fields[19]))
    except IndexError:
        raise ValueError(f"unreadable /proc/{pid}/stat") from None


def clock_ticks_per_second() -> int:
    return os.sysconf("SC_CLK_TCK")
