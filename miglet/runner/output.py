"""Reading the runner's console output.

The runner prints its progress as lines such as `2024-01-15 10:30:00Z: Listening for Jobs`, sometimes wrapped in
ANSI colour codes. `interpret` turns such a line into the machine input it means, or None. A job's name, which a
workflow's author chooses, enters the machine masked: colour codes or control characters inside a secret hide it
from the masking of the raw line, and are removed here.
"""

from __future__ import annotations

import logging
import re
from typing import Final

from miglet import machine
from miglet.secret import redact

_ANSI: Final = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
_CONTROL: Final = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_STAMP: Final = r"(?:\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ: )?"
_LISTENING: Final = re.compile(_STAMP + r"Listening for Jobs")
_RUNNING: Final = re.compile(_STAMP + r"Running job: (?P<name>.+)")
_COMPLETED: Final = re.compile(_STAMP + r"Job (?P<name>.+) completed with result: (?P<result>[A-Za-z]+)")
_VERSION: Final = re.compile(_STAMP + r"Current runner version: '(?P<version>[0-9A-Za-z.+-]{1,64})'")

RunnerSignal = machine.RunnerListening | machine.JobRunning | machine.JobDone | machine.RunnerVersion

# The runner's own lines, tagged as such, so that log readers can tell them from MIGlet's.
runner_log = logging.getLogger("miglet.runner.output")


def clean(line: str) -> str:
    """The line without colour codes, control characters or surrounding white space."""
    return _CONTROL.sub("", _ANSI.sub("", line)).strip()


def interpret(line: str) -> RunnerSignal | None:
    """What a cleaned runner output line tells the machine, if anything."""
    if _LISTENING.fullmatch(line):
        return machine.RunnerListening()
    if match := _COMPLETED.fullmatch(line):
        return machine.JobDone(name=redact(match["name"]), result=match["result"])
    if match := _RUNNING.fullmatch(line):
        return machine.JobRunning(name=redact(match["name"]))
    if match := _VERSION.fullmatch(line):
        return machine.RunnerVersion(match["version"])
    return None


def relay_line(stream: str, line: str) -> str:
    """Log one line of runner output (as the runner's; secrets are masked by the log formatter, also those that
    cleaning joined up) and return it cleaned."""
    cleaned = clean(line)
    if cleaned:
        runner_log.info(cleaned, extra={"source": "runner", "stream": stream})
    return cleaned
