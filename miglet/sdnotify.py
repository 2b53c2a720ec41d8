"""systemd readiness and watchdog (`Type=notify`), spoken directly over `$NOTIFY_SOCKET`: no libsystemd.

MIGlet tells the service manager `READY=1` once the runner listens for jobs (so `systemctl start miglet` returns
when the VM can take one), `STATUS=<phase>` on every phase change, `STOPPING=1` as it begins to stop, and, when
`$WATCHDOG_USEC` is set for this process, `WATCHDOG=1` at half that interval. Without `$NOTIFY_SOCKET` (not under
systemd, or another `Type=`) nothing is sent. A message that cannot be sent is logged once and never stops MIGlet.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from contextlib import aclosing
from typing import Final

from trio_util import periodic

from miglet.machine import AgentState, Phase

log = logging.getLogger(__name__)

_READY_PHASES: Final = frozenset({Phase.IDLE, Phase.BUSY})


class Notifier:
    """Sends sd_notify messages to one socket."""

    def __init__(self, address: str, watchdog_s: float | None = None) -> None:
        # An address starting with "@" is in the abstract namespace: a NUL byte in its place.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_s = watchdog_s
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._socket.setblocking(False)
        self._failed = False
        self._ready = False

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> Notifier | None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        if not address or not (address.startswith(("/", "@"))):
            return None
        return cls(address, _watchdog_interval(env))

    def send(self, message: str) -> None:
        try:
            self._socket.sendto(message.encode(), self._address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("Cannot notify the service manager", extra={"error": f"{type(exc).__name__}: {exc}"})

    def observe(self, before: AgentState, after: AgentState) -> None:
        """A `Driver` observer: the phase as the service's status, readiness, the beginning of the stop."""
        if after.phase is before.phase:
            return
        messages = [f"STATUS={after.phase.value}"]
        if after.phase in _READY_PHASES and not self._ready:
            self._ready = True
            messages.append("READY=1")
        if after.phase is Phase.STOPPING:
            messages.append("STOPPING=1")
        self.send("\n".join(messages))

    async def watchdog(self) -> None:
        """Ping the watchdog at half its interval, until cancelled."""
        if self.watchdog_s is None:
            return
        async with aclosing(periodic(self.watchdog_s / 2)) as ticks:
            async for _ in ticks:
                self.send("WATCHDOG=1")

    def close(self) -> None:
        self._socket.close()


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """`$WATCHDOG_USEC` in seconds, when the watchdog is meant for this process."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1_000_000
