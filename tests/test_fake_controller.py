"""The fake controller over real HTTP: the seed's behaviour, long-poll, the admin API and fault injection.

Rules: served by hypercorn on 127.0.0.1 port 0 inside the test's trio run, real clock, hard timeout.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio

from fake_controller import FakeController, Settings
from fake_controller.server import serve

TIMEOUT = 15


@asynccontextmanager
async def served(controller: FakeController) -> AsyncIterator[httpx.AsyncClient]:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(serve, controller)
            async with httpx.AsyncClient(base_url=url) as client:
                yield client
            nursery.cancel_scope.cancel()


def vm_started(event_id: str) -> dict[str, str]:
    header = {"vm_id": "vm-1", "pool_id": "pool-1", "timestamp": "2024-01-15T10:30:00.000Z"}
    return {"type": "vm_started", "event_id": event_id, **header}


async def test_seed_behaviour_register_once_after_vm_started() -> None:
    controller = FakeController(Settings(long_poll=False))
    async with served(controller) as client:
        before = (await client.get("/api/v1/vms/vm-1/commands")).json()
        ack = (await client.post("/api/v1/vms/vm-1/events", json=vm_started("e0"))).json()
        first = (await client.get("/api/v1/vms/vm-1/commands")).json()
        second = (await client.get("/api/v1/vms/vm-1/commands")).json()
    assert before == {"commands": [], "vm_id": "vm-1"}
    assert ack["status"] == "acknowledged"
    assert ack["acknowledged"] is True
    assert "registration_token" not in ack
    [command] = first["commands"]
    assert command["type"] == "register_runner"
    assert set(command["parameters"]) == {"registration_token", "runner_url", "runner_group", "labels", "expires_at"}
    assert second["commands"] == []


async def test_long_poll_holds_until_a_command_exists() -> None:
    controller = FakeController(Settings(send_registration=False))
    async with served(controller) as client:
        async with trio.open_nursery() as nursery:
            results: list[httpx.Response] = []

            async def poll() -> None:
                results.append(await client.get("/api/v1/vms/vm-1/commands", params={"wait": "10"}))

            nursery.start_soon(poll)
            await controller.request_arrived.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert results == []
            response = await client.post("/_admin/vms/vm-1/commands", json={"type": "shutdown"})
            assert response.status_code == 200
        [answer] = results
    assert [command["type"] for command in answer.json()["commands"]] == ["shutdown"]


async def test_admin_faults_and_dropped_connections() -> None:
    controller = FakeController()
    async with served(controller) as client:
        put = await client.put("/_admin/faults", json={"error_rate": 1.0, "error_statuses": [503], "retry_after_s": 2})
        assert put.status_code == 200
        failed = await client.get("/api/v1/vms/vm-1/commands")
        assert (failed.status_code, failed.headers["retry-after"]) == (503, "2")
        await client.put("/_admin/faults", json={"drop_rate": 1.0})
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post("/api/v1/vms/vm-1/events", json=vm_started("e1"))
        assert controller.events_of("vm-1") == []  # dropped before it was processed
        await client.put("/_admin/faults", json={"drop_after_rate": 1.0})
        for _ in range(2):
            with pytest.raises(httpx.RemoteProtocolError):
                await client.post("/api/v1/vms/vm-1/events", json=vm_started("e2"))
        bad = await client.put("/_admin/faults", json={"error_rate": "lots"})
        assert bad.status_code == 400
    assert [event["event_id"] for event in controller.events_of("vm-1")] == ["e2"]
    assert controller.vm("vm-1").duplicates == 1


async def test_duplicate_commands_fault() -> None:
    controller = FakeController(Settings(send_registration=False))
    controller.faults.plan.duplicate_commands = True
    controller.enqueue("vm-1", {"id": "c1", "type": "shutdown"})
    async with served(controller) as client:
        polls = [(await client.get("/api/v1/vms/vm-1/commands")).json()["commands"] for _ in range(3)]
    assert [[command["id"] for command in poll] for poll in polls] == [["c1"], ["c1"], []]


def test_command_line_help_lists_the_admin_api_and_faults() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fake_controller", "--help"], capture_output=True, text=True, timeout=30, check=True
    )
    assert "POST /_admin/vms/{vm_id}/commands" in result.stdout
    assert "--error-rate" in result.stdout
    assert "--no-long-poll" in result.stdout


async def test_a_malformed_event_or_an_out_of_range_wait_is_answered_400() -> None:
    controller = FakeController()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=controller), base_url="http://c") as http:
        wrong = await http.post("/api/v1/vms/vm-1/events", json={"type": "job_started", "job_name": 7})
        assert wrong.status_code == 400
        assert "not a valid event" in wrong.json()["error"]
        unknown = await http.post("/api/v1/vms/vm-1/events", json={"type": "vm_exploded"})
        assert unknown.status_code == 400
        headless = await http.post("/api/v1/vms/vm-1/events", json={"type": "vm_started", "vm_id": "vm-1"})
        assert headless.status_code == 400
        assert "the header lacks pool_id, event_id, timestamp" in headless.json()["error"]
        for wait in ("-1", "601", "soon", "1.5"):
            answer = await http.get("/api/v1/vms/vm-1/commands", params={"wait": wait})
            assert answer.status_code == 400, wait
            assert "wait must be a whole number" in answer.json()["error"]
    # Nothing malformed is recorded as received.
    assert controller.events_of("vm-1") == []


def test_without_hypercorn_the_command_says_what_to_install(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    import importlib.util

    from fake_controller.__main__ import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "hypercorn" else real(name, *a))
    assert main([]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert "pip install 'miglet[fake-controller]'" in line
