"""Shared fixtures: a configuration builder, the in-process fake controller, a simulated runner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import settings

from fake_controller import FakeController, Settings
from fake_controller.simulated_runner import SimulatedRunner
from miglet.config import Config
from tests.agents import ConfigFactory

# A slow or busy machine must not turn a property test into a failure: no per-example deadline.
settings.register_profile("miglet", deadline=None)
settings.load_profile("miglet")


@pytest.fixture
def make_config(tmp_path: Path) -> ConfigFactory:
    def build(**overrides: Any) -> Config:
        values: dict[str, Any] = {
            "vm_id": "vm-123",
            "pool_id": "pool-001",
            "controller_endpoint": "http://controller.test",
            "runner_dir": tmp_path / "runner",
            "state_file": tmp_path / "state.json",
            "command_wait": 0,
        }
        values.update(overrides)
        return Config(**values)

    return build


@pytest.fixture
def controller() -> FakeController:
    return FakeController(Settings(long_poll=True))


@pytest.fixture
def transport(controller: FakeController) -> httpx.ASGITransport:
    return httpx.ASGITransport(app=controller)


@pytest.fixture
def runner() -> SimulatedRunner:
    return SimulatedRunner()
