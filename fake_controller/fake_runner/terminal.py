"""Console output shaped like the real runner's `Terminal` class (src/Runner.Common/Terminal.cs).

Why it matters: MIGlet parses these lines, so the fake must reproduce the real quirks. Colour is set
through .NET's Console.ForegroundColor, which on Unix emits escapes only when stdout is a terminal (or
DOTNET_SYSTEM_CONSOLE_ALLOW_ANSI_COLOR_REDIRECTION is set); `ResetColor()` comes after `WriteLine`, so
the reset sequence starts the *next* line; errors set the colour on stdout but print on stderr.
Every write is one `write` call followed by a flush, so a reader sees each line at once.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from typing import BinaryIO

GREEN = "\x1b[92m"
WHITE = "\x1b[97m"
RED = "\x1b[91m"
YELLOW = "\x1b[93m"
CYAN = "\x1b[96m"
RESET = "\x1b[39;49m"


def timestamp(now: dt.datetime | None = None) -> str:
    """.NET `{DateTime.UtcNow:u}`: `2024-01-15 10:30:00Z`."""
    moment = now if now is not None else dt.datetime.now(dt.UTC)
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def colour_enabled(mode: str, stdout_fd: int = 1) -> bool:
    """Decide like .NET would for `auto`; `always`/`never` are test overrides."""
    if mode == "always":
        return True
    if mode == "never":
        return False
    allow = os.environ.get("DOTNET_SYSTEM_CONSOLE_ALLOW_ANSI_COLOR_REDIRECTION", "").strip().lower()
    return os.isatty(stdout_fd) or allow in ("1", "true")


class Terminal:
    """Writes UTF-8 to stdout/stderr with the real runner's line shapes."""

    def __init__(self, colour: bool, out: BinaryIO | None = None, err: BinaryIO | None = None) -> None:
        self._colour = colour
        self._out = out if out is not None else sys.stdout.buffer
        self._err = err if err is not None else sys.stderr.buffer

    def _emit(self, stream: BinaryIO, text: str) -> None:
        try:
            stream.write(text.encode("utf-8"))
            stream.flush()
        except BrokenPipeError:
            # The reader went away: keep running (like the real listener), write to /dev/null from now on.
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())

    def _paint(self, colour: str) -> str:
        return colour if self._colour else ""

    def write(self, text: str, colour: str | None = None) -> None:
        """`Terminal.Write`: no newline; optional colour reset right after."""
        if colour is None:
            self._emit(self._out, text)
        else:
            self._emit(self._out, self._paint(colour) + text + self._paint(RESET))

    def line(self, text: str = "", colour: str | None = None) -> None:
        """`Terminal.WriteLine`: with a colour, the reset follows the newline."""
        if colour is None:
            self._emit(self._out, text + "\n")
        else:
            self._emit(self._out, self._paint(colour) + text + "\n" + self._paint(RESET))

    def success(self, message: str) -> None:
        """`WriteSuccessMessage`: green check mark, white text, reset after the newline."""
        self._emit(self._out, f"{self._paint(GREEN)}√ {self._paint(WHITE)}{message}\n{self._paint(RESET)}")

    def section(self, message: str) -> None:
        """`WriteSection`: blank line, white `# message`, reset, blank line."""
        self._emit(self._out, f"\n{self._paint(WHITE)}# {message}\n{self._paint(RESET)}\n")

    def error(self, message: str) -> None:
        """`WriteError`: red is set on the console (stdout), the text goes to stderr."""
        if self._colour:
            self._emit(self._out, RED)
        self._emit(self._err, message + "\n")
        if self._colour:
            self._emit(self._out, RESET)

    def stamped(self, message: str) -> None:
        """A plain line prefixed with the UTC timestamp, as in `Listening for Jobs`."""
        self.line(f"{timestamp()}: {message}")
