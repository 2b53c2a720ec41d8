"""Pre-flight checks: what `miglet check-config` verifies beyond the values themselves, before any token is spent.

Each check returns every problem it finds (a `ConfigError` naming the variable), so that an image build or a boot
script sees them all at once. `miglet run` checks the runner directory the same way before it announces the VM.
Warnings are for what works but is likely a mistake: a misspelt `MIGLET_` variable, a stop that cannot finish
within the systemd unit's `TimeoutStopSec`.
"""

from __future__ import annotations

import difflib
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from miglet.config import VARIABLES, Config, ConfigError

# The runner's entry points MIGlet starts, and the listener they start (present once the runner is unpacked).
RUNNER_SCRIPTS: Final = ("config.sh", "run.sh")
RUNNER_LISTENER: Final = "bin/Runner.Listener"
# The shipped unit's TimeoutStopSec, and what a stop needs beyond the grace and the flush.
UNIT_TIMEOUT_STOP_S: Final = 100.0
STOP_OVERHEAD_S: Final = 5.0
KNOWN: Final = frozenset(variable.name for variable in VARIABLES)


def runner_dir_problems(runner_dir: Path) -> list[ConfigError]:
    """Whether `runner_dir` holds a runner MIGlet can start."""
    name = "MIGLET_RUNNER_DIR"
    try:
        if not runner_dir.is_dir():
            return [ConfigError(name, f"{str(runner_dir)!r} is not a directory")]
    except (OSError, ValueError) as exc:
        return [ConfigError(name, f"cannot use {str(runner_dir)!r}: {exc}")]
    problems: list[ConfigError] = []
    for script in RUNNER_SCRIPTS:
        problem = _not_executable(runner_dir / script)
        if problem is not None:
            problems.append(ConfigError(name, f"{script} {problem} (unpack actions/runner into {runner_dir})"))
    listener = runner_dir / RUNNER_LISTENER
    if listener.exists() and (problem := _not_executable(listener)) is not None:
        problems.append(ConfigError(name, f"{RUNNER_LISTENER} {problem}"))
    return problems


def _not_executable(path: Path) -> str | None:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "is missing"
    except (OSError, ValueError) as exc:
        return f"cannot be read: {exc}"
    if not stat.S_ISREG(mode):
        return "is not a regular file"
    if not mode & 0o111:
        return "is not executable"
    return None


def state_dir_problem(state_file: Path) -> ConfigError | None:
    """Whether the state file's directory exists or can be created, and can be written."""
    directory = state_file.parent
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return ConfigError("MIGLET_STATE_FILE", f"{str(existing)!r} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        verb = "written in" if existing == directory else f"created in {str(existing)!r}"
        return ConfigError("MIGLET_STATE_FILE", f"{str(directory)!r} cannot be {verb}")
    return None


def preflight(config: Config) -> list[ConfigError]:
    """Every problem with what the configuration points at."""
    problems = runner_dir_problems(config.runner_dir)
    if (problem := state_dir_problem(config.state_file)) is not None:
        problems.append(problem)
    return problems


def misspelt(env: Mapping[str, str]) -> list[str]:
    """A warning for each `MIGLET_` variable that is not a setting, with the closest one."""
    warnings = []
    for name in sorted(key for key in env if key.startswith("MIGLET_") and key not in KNOWN):
        close = difflib.get_close_matches(name, KNOWN, n=1, cutoff=0.8)
        hint = f"; did you mean {close[0]}?" if close else ""
        warnings.append(f"{name} is not a MIGlet setting and is ignored{hint}")
    return warnings


def job_identity_warning(config: Config) -> str | None:
    """Job identity is on, but MIGlet's job hooks could not be installed where they go."""
    if not config.job_identity:
        return None
    from miglet.runner.hooks import JOB_HOOKS_DIR, install_problem

    problem = install_problem(config.state_file.parent / JOB_HOOKS_DIR, config.runner_user)
    if problem is None:
        return None
    return f"job identity will be off: MIGlet's job hooks cannot go beside MIGLET_STATE_FILE: {problem}"


def stop_time_warning(config: Config) -> str | None:
    needed = config.shutdown_grace + config.flush_timeout + STOP_OVERHEAD_S
    if needed <= UNIT_TIMEOUT_STOP_S:
        return None
    return (
        f"MIGLET_SHUTDOWN_GRACE + MIGLET_FLUSH_TIMEOUT ({needed - STOP_OVERHEAD_S:g} s, and a few seconds more) do "
        f"not fit within the systemd unit's TimeoutStopSec={UNIT_TIMEOUT_STOP_S:g}; raise it (systemctl edit "
        "miglet) or lower them"
    )
