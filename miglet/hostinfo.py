"""What MIGlet and its VM are, for `vm_started`: read without a process, and never failing the handshake.

Each host fact comes from the kernel, its clocks, or `/etc/os-release`. One that cannot be read (a container without
`/etc/os-release`, say) is left out, and the rest are still sent.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from miglet import __version__, protocol
from miglet.smallfile import UnsuitableFile, read_small_file

OS_RELEASE: Final = Path("/etc/os-release")
MAX_FACT: Final = 128
BASE_CAPABILITIES: Final = ("long_poll", "jit_config", "shutdown", "remove_token", "heartbeat")


def agent_info(*, preemption: bool, job_identity: bool = True) -> protocol.AgentInfo:
    optional = {"job_identity": job_identity, "preemption": preemption}
    capabilities = [*BASE_CAPABILITIES, *(name for name, on in optional.items() if on)]
    return protocol.AgentInfo(version=__version__, capabilities=capabilities)


def host_info(os_release: Path = OS_RELEASE) -> protocol.HostInfo:
    uname = os.uname()
    return protocol.HostInfo(
        hostname=_fact(socket.gethostname()),
        os=_os_name(os_release),
        kernel=_fact(uname.release),
        arch=_fact(uname.machine),
        cpus=os.cpu_count(),
        memory_mb=_memory_mb(),
        boot_time=_boot_time(),
    )


def _fact(text: str | None) -> str | None:
    if not text:
        return None
    cleaned = protocol.printable(text)[:MAX_FACT]
    return cleaned or None


def _os_name(os_release: Path) -> str | None:
    try:
        text = read_small_file(os_release, 64 * 1024).decode("utf-8", "replace")
    except (OSError, UnsuitableFile, ValueError):
        return None
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "PRETTY_NAME":
            return _fact(value.strip().strip("\"'"))
    return None


def _memory_mb() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    return None


def _boot_time() -> str | None:
    """From the clocks, not /proc/stat (whose size grows with the number of CPUs and interrupts)."""
    with contextlib.suppress(OSError, ValueError, OverflowError):
        booted = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
        return datetime.fromtimestamp(booted, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return None
