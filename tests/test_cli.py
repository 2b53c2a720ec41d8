"""`miglet run` in-process, with the agent itself replaced: what the command sets up before the agent runs."""

from __future__ import annotations

import gc
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import miglet.cli
import miglet.logs
from miglet.cli import main
from miglet.stop_signals import STOP_SIGNALS


@pytest.fixture
def collector_restored() -> Iterator[None]:
    yield
    gc.unfreeze()
    gc.enable()


@pytest.fixture(autouse=True)
def process_left_alone(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`miglet run` hardens its process and takes over the stop signals (ignoring them once stopped). Not
    pytest's: a subreaper pytest would adopt every later test's orphans, and its subprocesses would inherit
    ignored signals."""
    monkeypatch.setattr(miglet.cli, "harden_process", list)
    saved = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_agent_runs_with_the_collector_on_and_start_up_objects_frozen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, collector_restored: None
) -> None:
    seen: dict[str, Any] = {}

    def agent_run(function: Callable[[], Any]) -> int:
        seen["collector_enabled"] = gc.isenabled()
        seen["frozen"] = gc.get_freeze_count()
        return 0

    monkeypatch.setattr(trio, "run", agent_run)
    monkeypatch.setattr(miglet.logs, "configure_logging", lambda fmt, level: None)
    for name, value in {
        "MIGLET_VM_ID": "vm-1",
        "MIGLET_POOL_ID": "pool-1",
        "MIGLET_CONTROLLER_ENDPOINT": "http://127.0.0.1:9",
        "MIGLET_RUNNER_DIR": str(tmp_path),
        "MIGLET_STATE_FILE": str(tmp_path / "state.json"),
    }.items():
        monkeypatch.setenv(name, value)
    gc.unfreeze()

    assert main(["run"]) == 0

    # A long-lived agent with the collector left off would never free a reference cycle.
    assert seen["collector_enabled"] is True
    assert seen["frozen"] > 0
