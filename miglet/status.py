"""`miglet status` and `miglet check-config`: what an operator or a health check asks of a VM's agent."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import msgspec

from miglet.config import Config
from miglet.statefile import StateRecord, read_state_file

UNHEALTHY_STATES = frozenset({"Stopped"})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def health(record: StateRecord) -> str | None:
    """Why the agent that wrote `record` is unhealthy, or None when it is healthy."""
    if record.state in UNHEALTHY_STATES:
        return f"agent is {record.state}"
    if not _alive(record.pid):
        return f"agent process {record.pid} is not running"
    return None


def status_command(state_file: Path | None, *, as_json: bool) -> int:
    path = state_file or Path(os.environ.get("MIGLET_STATE_FILE") or "/run/miglet/state.json")
    try:
        record = read_state_file(path)
    except FileNotFoundError:
        print(f"miglet: no state file at {path}: the agent is not running", file=sys.stderr)
        return 1
    except (OSError, msgspec.DecodeError) as exc:
        print(f"miglet: cannot read state file {path}: {exc}", file=sys.stderr)
        return 1
    problem = health(record)
    if as_json:
        print(msgspec.json.encode(record).decode())
    else:
        job = f", job {record.job!r}" if record.job else ""
        print(f"{record.state} since {record.since} (vm {record.vm_id}, runner {record.runner_name}{job})")
    if problem is not None:
        print(f"miglet: unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


def print_config(config: Config) -> None:
    """Print the effective configuration; secrets show as masked because `Secret` never prints its value."""
    for field in config.__struct_fields__:
        value = getattr(config, field)
        print(f"{field} = {'unset' if value is None else value}")
