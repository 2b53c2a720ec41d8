"""`miglet status` and `miglet check-config`: what an operator or a health check asks of a VM's agent."""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import msgspec

from miglet.config import Config, default_of
from miglet.statefile import StateFileError, StateFileMissing, StateRecord, read_state_file

UNHEALTHY_STATES: Final = frozenset({"Stopped"})
# A live agent rewrites its state file every `refresh_s`; this many missed rewrites mean it is hung or gone.
STALE_FACTOR: Final = 3
STALE_MINIMUM_S: Final = 30.0


def _alive(pid: int) -> bool:
    if pid == 1:
        return True  # init lives as long as its PID namespace (MIGlet is pid 1 in a container without --init)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def health(record: StateRecord, now: datetime | None = None) -> str | None:
    """Why the agent that wrote `record` is unhealthy, or None when it is healthy."""
    if record.state in UNHEALTHY_STATES:
        return f"agent is {record.state}"
    try:
        updated = datetime.fromisoformat(record.updated_at)
    except ValueError:
        return f"state file has an unreadable updated_at: {record.updated_at!r}"
    if updated.tzinfo is None:
        updated = updated.replace(tzinfo=UTC)
    age = ((now or datetime.now(UTC)) - updated).total_seconds()
    limit = max(STALE_MINIMUM_S, STALE_FACTOR * record.refresh_s)
    if age > limit:
        return f"state file is stale: last written {age:.0f} s ago (limit {limit:.0f} s)"
    if not _alive(record.pid):
        return f"agent process {record.pid} is not running"
    return None


def status_command(state_file: Path | None, *, as_json: bool) -> int:
    path = state_file or Path(os.environ.get("MIGLET_STATE_FILE") or default_of("state_file"))
    try:
        record = read_state_file(path)
    except StateFileMissing:
        print(f"miglet: no state file at {path}: the agent is not running", file=sys.stderr)
        return 1
    except StateFileError as exc:
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
    effective = {
        "runner_name": config.effective_runner_name,
        "metadata_endpoint": config.effective_metadata_endpoint,
    }
    for field in config.__struct_fields__:
        value = effective.get(field, getattr(config, field))
        print(f"{field} = {'unset' if value is None else value}")
