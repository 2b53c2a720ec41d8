"""Property: whatever the controller does wrong, and in whatever order, the agent's invariants hold.

Rules: hypothesis draws a script of faults for each endpoint and a list of register_runner mishaps; the whole
agent runs in-process on the autojump clock against the fake controller. Scripts are finite, so the controller
recovers, and the agent must then reach Idle, having made only legal transitions in the seed's order, acted on
each command at most once, registered exactly once, and lost no event.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fake_controller import FakeController, Settings
from fake_controller.faults import Fault
from fake_controller.simulated_runner import SimulatedRunner
from miglet.app import Agent
from miglet.machine import LEGAL_TRANSITIONS, AgentState, Phase
from tests.agents import ConfigFactory

REJECTED = "AHTREJECTED00000000000000001"

faults = st.one_of(
    st.none(),
    st.builds(Fault, kind=st.just("status"), status=st.sampled_from([408, 429, 500, 502, 503, 504])),
    st.builds(
        Fault,
        kind=st.just("status"),
        status=st.sampled_from([429, 503]),
        retry_after=st.sampled_from(["1", "7", "Mon, 01 Jan 99999999999999999999 00:00:00 GMT"]),
    ),
    st.builds(Fault, kind=st.sampled_from(["malformed", "wrong_shape", "huge", "nested", "bad_utf8", "drop"])),
    st.builds(Fault, kind=st.just("drop_after")),
    st.builds(Fault, kind=st.just("latency"), delay_s=st.floats(0, 30)),
)
mishaps = st.lists(st.sampled_from(["malformed", "expired", "rejected", "unknown", "duplicate"]), max_size=4)


def mishap_command(controller: FakeController, kind: str, index: int) -> dict[str, Any]:
    command = controller.registration_command("vm-123") | {"id": f"{kind}-{index}"}
    match kind:
        case "malformed":
            return {"id": command["id"], "type": "register_runner", "parameters": {"labels": 1}}
        case "expired":
            past = (datetime.now(UTC) - timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
            return command | {"parameters": command["parameters"] | {"expires_at": past}}
        case "rejected":
            return command | {"parameters": command["parameters"] | {"registration_token": REJECTED}}
        case "unknown":
            return {"id": command["id"], "type": "reimage", "parameters": {}}
    return command


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    event_faults=st.lists(faults, max_size=8),
    poll_faults=st.lists(faults.filter(lambda fault: fault is None or fault.kind != "drop_after"), max_size=8),
    bad_commands=mishaps,
)
async def test_invariants_hold_under_any_faults(
    make_config: ConfigFactory,
    autojump_clock: trio.testing.MockClock,
    event_faults: list[Fault | None],
    poll_faults: list[Fault | None],
    bad_commands: list[str],
) -> None:
    controller = FakeController(Settings(send_registration=False))
    controller.faults.script("events", event_faults)
    controller.faults.script("commands", poll_faults)
    good = controller.registration_command("vm-123") | {"id": "good"}
    for index, kind in enumerate(bad_commands):
        controller.enqueue("vm-123", good if kind == "duplicate" else mishap_command(controller, kind, index))
    controller.enqueue("vm-123", good)
    runner = SimulatedRunner(reject_tokens=frozenset({REJECTED}), configure_delay_s=2)
    agent = Agent(
        make_config(heartbeat_interval=5),
        transport=httpx.ASGITransport(app=controller),
        backend=runner,
        handle_signals=False,
        write_state_file=False,
    )
    phases: list[Phase] = [agent.phase]
    accepted: list[str] = []

    def watch(before: AgentState, after: AgentState) -> None:
        if after.phase is not before.phase:
            assert (before.phase, after.phase) in LEGAL_TRANSITIONS
            assert before.phase is not Phase.STOPPED
            phases.append(after.phase)
        if after.command_id != before.command_id and after.command_id is not None:
            accepted.append(after.command_id)

    agent.driver.observe(watch)
    with trio.fail_after(7200):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(agent.run)
            await agent.driver.wait_for(lambda state: state.phase is Phase.IDLE)
            await agent.outbox.wait_empty()
            agent.request_stop("test over")
    seed_order = [Phase.WAITING_FOR_CONTROLLER, Phase.READY, Phase.REGISTERING_RUNNER, Phase.IDLE]
    assert [phase for phase in dict.fromkeys(phases) if phase in seed_order] == seed_order
    assert phases[-2:] == [Phase.STOPPING, Phase.STOPPED]
    assert len(accepted) == len(set(accepted))
    assert [call.registration.command_id for call in runner.configure_calls if call.token != REJECTED] == ["good"]
    events = controller.events_of("vm-123")
    # Every delivery of an event_id, the retries included, carries the same event: no id names two events.
    first_of: dict[str, dict[str, object]] = {}
    for delivery in controller.vm("vm-123").deliveries:
        assert first_of.setdefault(delivery["event_id"], delivery) == delivery
    # Nothing lost: every event the agent owed was delivered or is still queued (a stop flushes for a bounded
    # time only); the controller may hold more, those it processed but whose answer was lost.
    outbox = agent.outbox
    assert outbox.dropped == 0
    assert outbox.delivered + len(outbox) == outbox.stamped
    assert len(events) >= 1 + outbox.delivered
    assert [event["type"] for event in events].count("runner_registered") == 1
