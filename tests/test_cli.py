"""`miglet run` and `miglet check-config` in-process: what the command sets up around the agent.

Rules: pytest's process is never hardened, and its signal handlers are given back after every test
(`process_left_alone`); an agent that really runs talks to a closed loopback port and flushes nothing.
"""

from __future__ import annotations

import gc
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import miglet.cli
import miglet.logs
from fake_controller.fake_runner import install
from miglet import exitcodes
from miglet.cli import main
from miglet.config import VARIABLES
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
        "MIGLET_RUNNER_DIR": str(install(tmp_path / "runner")),
        "MIGLET_STATE_FILE": str(tmp_path / "state.json"),
    }.items():
        monkeypatch.setenv(name, value)
    gc.unfreeze()

    assert main(["run"]) == 0

    # A long-lived agent with the collector left off would never free a reference cycle.
    assert seen["collector_enabled"] is True
    assert seen["frozen"] > 0


def environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **extra: str) -> None:
    for name, value in {
        "MIGLET_VM_ID": "vm-1",
        "MIGLET_POOL_ID": "pool-1",
        "MIGLET_CONTROLLER_ENDPOINT": "http://127.0.0.1:9",
        "MIGLET_RUNNER_DIR": str(install(tmp_path / "runner")),
        "MIGLET_STATE_FILE": str(tmp_path / "state.json"),
        **extra,
    }.items():
        monkeypatch.setenv(name, value)


def test_stop_signals_before_the_agent_listens_stop_it_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_run = trio.run

    def run_after_signals(function: Callable[[], Any]) -> Any:
        # Before the agent listens: without anything to hold them, SIGINT would raise KeyboardInterrupt here,
        # and SIGHUP or SIGTERM would end pytest.
        for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
            signal.raise_signal(signum)
        return real_run(function)

    monkeypatch.setattr(trio, "run", run_after_signals)
    monkeypatch.setattr(miglet.logs, "configure_logging", lambda fmt, level: None)
    environment(monkeypatch, tmp_path, MIGLET_FLUSH_TIMEOUT="0")
    caplog.set_level("INFO", logger="miglet")

    # An orderly stop; no controller answers and there is no time to flush, so it says that vm_stopping is owed.
    assert main(["run"]) == exitcodes.UNDELIVERED

    said = [(record.getMessage(), getattr(record, "signal", None)) for record in caplog.records]
    assert ("Received signal", "SIGINT") in said
    assert ("Second signal: killing the runner now", "SIGHUP") in said
    assert ("Second signal: killing the runner now", "SIGTERM") in said
    assert "Interrupted before the agent could stop cleanly" not in [message for message, _ in said]
    # Stopped: from here to the process's exit a stop signal has nothing left to do, and must not kill it.
    assert {signal.getsignal(signum) for signum in STOP_SIGNALS} == {signal.SIG_IGN}


@pytest.mark.skipif(os.geteuid() != 0, reason="a runner running as root needs MIGlet to be root")
def test_check_config_warns_when_a_job_could_read_the_controller_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    environment(monkeypatch, tmp_path, MIGLET_CONTROLLER_TOKEN="controller-token-0123456789")
    assert main(["check-config"]) == 0
    assert "miglet: warning: The runner runs as root, as MIGlet does" in capsys.readouterr().err
    monkeypatch.delenv("MIGLET_CONTROLLER_TOKEN")
    assert main(["check-config"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("command", ["run", "check-config"])
def test_help_lists_every_flag_with_its_variable_and_default(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for variable in VARIABLES:
        if variable.secret:
            # A secret on the command line would show in every process list.
            assert f"{variable.flag} VALUE" not in text
        else:
            assert f"{variable.flag} VALUE" in text
            assert f"({variable.name}; default: {variable.default})" in text
