"""What MIGlet and its VM are, for `vm_started`: read without a process, and never failing the handshake.

Each host fact comes from the kernel or a small file. One that cannot be read (a container without
`/etc/os-release`, say) is left out, and the rest are still sent.
"""

from __future__ import annotations

import contextlib
import os
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from miglet import __version__, protocol
from miglet.smallfile import UnsuitableFile, read_small_file

OS_RELEASE: Final = Path("/etc/os-release")
MAX_FACT: Final = 128
BASE_CAPABILITIES: Final = ("long_poll", "jit_config", "shutdown", "remove_token", "heartbeat")


def agent_info(*, preemption: bool) -> protocol.AgentInfo:
    capabilities = [*BASE_CAPABILITIES, *(["preemption"] if preemption else [])]
    return protocol.AgentInfo(version=__version__, capabilities=capabilities)


def host_info(os_release: Path = OS_RELEASE, proc: Path = Path("/proc")) -> protocol.HostInfo:
    uname = os.uname()
    return protocol.HostInfo(
        hostname=_fact(socket.gethostname()),
        os=_os_name(os_release),
        kernel=_fact(uname.release),
        arch=_fact(uname.machine),
        cpus=os.cpu_count(),
        memory_mb=_memory_mb(proc),
        boot_time=_boot_time(proc),
    )


def _fact(text: str | None) -> str | None:
    if not text:
        return None
    cleaned = "".join(character for character in text if character.isprintable())[:MAX_FACT]
    return cleaned or None


def _read(path: Path) -> str | None:
    try:
        return read_small_file(path, 64 * 1024).decode("utf-8", "replace")
    except (OSError, UnsuitableFile, ValueError):
        return None


def _os_name(os_release: Path) -> str | None:
    text = _read(os_release)
    if text is None:
        return None
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "PRETTY_NAME":
            return _fact(value.strip().strip("\"'"))
    return None


def _memory_mb(proc: Path) -> int | None:
    for line in (_read(proc / "meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            with contextlib.suppress(ValueError, IndexError):
                return int(line.split()[1]) // 1024  # kB
    return None


def _boot_time(proc: Path) -> str | None:
    for line in (_read(proc / "stat") or "").splitlines():
        if line.startswith("btime "):
            with contextlib.suppress(ValueError, IndexError, OverflowError, OSError):
                return datetime.fromtimestamp(int(line.split()[1]), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return None
