"""The runner supervisor in isolation: command checks, and each way a registration can end.

Rules: the runner is the in-process `SimulatedRunner`; the machine is fed directly to put the agent in
RegisteringRunner as the poller would; time is the autojump clock.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fake_controller.simulated_runner import SimulatedRunner
from miglet import protocol, secret
from miglet.driver import Driver
from miglet.machine import Acknowledged, CommandArrived, Effect, Phase, Register, Start
from miglet.outbox import Outbox
from miglet.protocol import unprintable_character
from miglet.runner.backend import Exited, Line, RunEvent
from miglet.stamp import Stamper
from miglet.tasks.supervisor import InvalidRegistration, registration_from_command, supervisor_task
from miglet.timings import PhaseTimings
from tests.agents import ConfigFactory

NOW = datetime(2024, 1, 15, 10, 30, tzinfo=UTC)


def command(**parameters: Any) -> protocol.RegisterRunner:
    body: dict[str, Any] = {
        "id": "register-vm-123-1",
        "type": "register_runner",
        "parameters": {
            "registration_token": "AHTXXXXXXXXXXXXXXXXXXXX",
            "runner_url": "https://github.com/org/repo",
            "runner_group": "default",
            "labels": ["self-hosted", "linux", "x64"],
            "expires_at": "2024-01-15T11:30:00Z",
            **parameters,
        },
    }
    body["parameters"] = {key: value for key, value in body["parameters"].items() if value is not None}
    return msgspec.json.decode(msgspec.json.encode(body), type=protocol.RegisterRunner, dec_hook=secret.dec_hook)


def test_a_good_command_becomes_a_registration(make_config: ConfigFactory) -> None:
    registration = registration_from_command(command(), make_config(runner_name="runner-a"), NOW)
    assert registration.url == "https://github.com/org/repo"
    assert registration.name == "runner-a"
    assert registration.labels == ("self-hosted", "linux", "x64")
    assert registration.group == "default"
    assert registration.ephemeral is True
    assert registration.token is not None
    assert registration.token.reveal() == "AHTXXXXXXXXXXXXXXXXXXXX"


@pytest.mark.parametrize(
    ("parameters", "reason", "message"),
    [
        ({"expires_at": "2024-01-15T10:29:00Z"}, "token_expired", "expired at 2024-01-15T10:29:00+00:00"),
        ({"registration_token": None}, "invalid_command", "neither registration_token nor jit_config"),
        ({"runner_url": "github.com/org/repo"}, "invalid_command", "runner_url must be an https URL with a host"),
        ({"runner_url": "http://ghe.internal/org"}, "invalid_command", "runner_url must be an https URL"),
        ({"runner_url": "https://user:pw@github.com/o"}, "invalid_command", "must not carry credentials"),
        ({"runner_url": "https://github.com/o r"}, "invalid_command", "must not carry credentials, spaces"),
        ({"labels": []}, "invalid_command", "labels must not be empty"),
        ({"labels": ["a,b"]}, "invalid_command", "commas or white space"),
        ({"labels": ["has space"]}, "invalid_command", "commas or white space"),
        ({"labels": [""]}, "invalid_command", "commas or white space"),
        ({"labels": [f"l{i}" for i in range(101)]}, "invalid_command", "at most 100 labels"),
        ({"runner_group": "bad\ngroup"}, "invalid_command", "runner_group"),
        ({"labels": ["--replace"]}, "invalid_command", "starts with '-'"),
        ({"runner_group": "--ephemeral"}, "invalid_command", "not starting with '-'"),
    ],
)
def test_bad_commands_are_refused_with_a_reason(
    make_config: ConfigFactory, parameters: dict[str, Any], reason: str, message: str
) -> None:
    with pytest.raises(InvalidRegistration) as caught:
        registration_from_command(command(**parameters), make_config(), NOW)
    assert caught.value.reason == reason
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"registration_token": ""}, "registration_token must have at least 8 characters"),
        ({"registration_token": "AHT1234"}, "registration_token must have at least 8 characters"),
        ({"registration_token": " \t\n \u2028\u3000  "}, "registration_token must have at least 8 characters"),
        ({"registration_token": "  AHT12\n"}, "registration_token must have at least 8 characters"),
        ({"registration_token": "AHTFIRSTHALF\nSECONDHALF"}, "registration_token must not contain control or format"),
        ({"registration_token": "AHTINVISIBLE\u200bJOIN"}, "registration_token must not contain control or format"),
        ({"registration_token": None, "jit_config": "", "labels": []}, "jit_config must have at least 8 characters"),
        (
            {"jit_config": "eyJqaXQi\r\nOiAiY29uZmlnIn0="},
            "jit_config must not contain control or format characters (U+000D)",
        ),
        ({"labels": ["linux\x85"]}, "contains a control or format character (U+0085)"),
        ({"labels": ["x64\u2028"]}, "contains a control or format character (U+2028)"),
        ({"labels": ["gpu\u202e"]}, "contains a control or format character (U+202E)"),
        ({"labels": ["arm\x9b2J"]}, "contains a control or format character (U+009B)"),
        ({"labels": ["\ufeffbom"]}, "contains a control or format character (U+FEFF)"),
        ({"runner_group": "group\u2029"}, "runner_group must not contain control or format characters (U+2029)"),
        ({"runner_group": "my\u200dgroup"}, "runner_group must not contain control or format characters (U+200D)"),
        ({"runner_group": "ops\x1b[2J"}, "runner_group must not contain control or format characters (U+001B)"),
    ],
)
def test_unusable_tokens_labels_and_groups_are_refused(
    make_config: ConfigFactory, parameters: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidRegistration) as caught:
        registration_from_command(command(**parameters), make_config(), NOW)
    assert caught.value.reason == "invalid_command"
    assert message in str(caught.value)
    assert "AHT" not in str(caught.value)


@pytest.mark.parametrize(
    ("where", "parameters"),
    [
        ("runner_url", {"runner_url": "https://github.com/org/AHTXXXXXXXXXXXXXXXXXXXX"}),
        ("labels", {"labels": ["self-hosted", "AHTXXXXXXXXXXXXXXXXXXXX"]}),
        ("runner_group", {"runner_group": "group-AHTXXXXXXXXXXXXXXXXXXXX"}),
    ],
)
def test_a_secret_never_goes_into_config_sh_arguments(
    make_config: ConfigFactory, where: str, parameters: dict[str, Any]
) -> None:
    with pytest.raises(InvalidRegistration) as caught:
        registration_from_command(command(**parameters), make_config(), NOW)
    assert caught.value.reason == "invalid_command"
    assert f"{where} must not contain a secret" in str(caught.value)


@pytest.mark.parametrize("url", ["https://github.com/org/repo?token=abc", "https://github.com/org/repo#frag"])
def test_a_runner_url_with_a_query_or_fragment_is_refused(make_config: ConfigFactory, url: str) -> None:
    with pytest.raises(InvalidRegistration, match="must not carry a query or a fragment"):
        registration_from_command(command(runner_url=url), make_config(), NOW)


def test_white_space_around_a_token_and_spaces_in_a_group_are_accepted(make_config: ConfigFactory) -> None:
    registration = registration_from_command(
        command(registration_token="AHTWHITESPACEAROUND0001\n", runner_group="Build Farm"), make_config(), NOW
    )
    assert registration.group == "Build Farm"
    assert registration.token is not None
    assert registration.token.reveal() == "AHTWHITESPACEAROUND0001\n"


async def test_a_refused_token_is_reported_as_an_invalid_command(
    make_config: ConfigFactory, autojump_clock: trio.testing.MockClock
) -> None:
    runner = SimulatedRunner()
    with trio.fail_after(60):  # were the token taken, the runner would listen and the agent never be Ready again
        harness = await supervise(make_config, runner, command(registration_token="   "), Phase.READY)
    [failed] = harness.events()
    assert isinstance(failed, protocol.RegistrationFailed)
    assert failed.reason == "invalid_command"
    assert failed.error.startswith("registration_token must have at least 8 characters")
    assert runner.configure_calls == []


def test_http_runner_url_needs_an_explicit_setting(make_config: ConfigFactory) -> None:
    ghe = command(runner_url="http://ghe.internal/org")
    assert registration_from_command(ghe, make_config(allow_http_runner_url=True), NOW).url == "http://ghe.internal/org"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=25,
)
parameter_values = st.fixed_dictionaries(
    {},
    optional={
        "registration_token": st.text(max_size=40) | json_values,
        "jit_config": st.text(max_size=40),
        "runner_url": st.sampled_from(["https://github.com/o/r", "http://x", "ftp://y", "https://", ""]) | st.text(),
        "runner_group": st.text(max_size=300) | json_values,
        "labels": st.lists(st.text(max_size=20), max_size=120) | json_values,
        "expires_at": st.sampled_from(["2024-01-15T11:30:00Z", "2099-01-01T00:00:00+02:00", "soon", "2024-01-15"])
        | json_values,
    },
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.fixed_dictionaries(
            {"id": st.text(max_size=8) | json_values, "type": st.just("register_runner")},
            optional={"parameters": parameter_values | json_values},
        ),
        max_size=3,
    )
)
def test_any_command_is_accepted_or_refused_with_a_reason(make_config: ConfigFactory, raw: list[object]) -> None:
    batch = protocol.decode_commands(msgspec.json.encode({"commands": raw}))
    assert all(rejected.error for rejected in batch.rejected)
    for decoded in batch.commands:
        assert isinstance(decoded, protocol.RegisterRunner)
        try:
            registration = registration_from_command(decoded, make_config(), NOW)
        except InvalidRegistration as exc:
            assert exc.reason in ("invalid_command", "token_expired")
            assert str(exc)
        else:
            assert registration.url.startswith("https://")
            assert all(label and "," not in label and not label.startswith("-") for label in registration.labels)
            assert not registration.group.startswith("-")
            assert not any(map(unprintable_character, (*registration.labels, registration.group)))
            used = registration.jit_config if registration.jit_config is not None else registration.token
            assert used is not None
            assert len(used.reveal().strip()) >= 8


def test_a_token_that_never_expires(make_config: ConfigFactory) -> None:
    forever = command(expires_at="9999-12-31T23:59:59Z")
    assert registration_from_command(forever, make_config(), NOW).command_id == "register-vm-123-1"


def test_clock_skew_is_allowed_on_expiry(make_config: ConfigFactory) -> None:
    just_expired = command(expires_at="2024-01-15T10:29:45Z")
    assert registration_from_command(just_expired, make_config(), NOW).command_id == "register-vm-123-1"
    with pytest.raises(InvalidRegistration):
        registration_from_command(just_expired, make_config(), NOW + timedelta(seconds=30))


class Harness:
    def __init__(self) -> None:
        self.outbox = Outbox(Stamper("vm-123", "pool-001", None))
        self.driver = Driver(vm_id="vm-123", pool_id="pool-001", send=self.outbox.put)
        self.driver.apply(Start(runner_name="vm-123", ephemeral=True))
        self.driver.apply(Acknowledged())

    def events(self) -> list[protocol.AnyEvent]:
        return list(self.outbox.queued())


async def supervise(
    make_config: ConfigFactory, runner: SimulatedRunner, cmd: protocol.RegisterRunner, until: Phase
) -> Harness:
    harness = Harness()
    send, receive = trio.open_memory_channel[Register](math.inf)

    def hand_over(effect: Effect) -> None:
        if isinstance(effect, Register):
            send.send_nowait(effect)

    harness.driver.carry_out = hand_over
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            supervisor_task, make_config(), harness.driver, runner, receive, PhaseTimings(0), lambda: NOW
        )
        assert harness.driver.apply(CommandArrived(cmd)).accepted
        await harness.driver.wait_for(lambda state: state.phase is until)
        nursery.cancel_scope.cancel()
    return harness


async def test_rejected_token_reports_configure_failed(
    make_config: ConfigFactory, autojump_clock: trio.testing.MockClock
) -> None:
    runner = SimulatedRunner(reject_tokens=frozenset({"AHTXXXXXXXXXXXXXXXXXXXX"}))
    harness = await supervise(make_config, runner, command(), Phase.READY)
    [failed] = harness.events()
    assert isinstance(failed, protocol.RegistrationFailed)
    assert failed.reason == "configure_failed"
    assert "NotFound" in failed.error
    assert runner.runs == 0


async def test_runner_exiting_before_listening_is_a_start_failure(
    make_config: ConfigFactory, autojump_clock: trio.testing.MockClock
) -> None:
    class NeverListens(SimulatedRunner):
        async def run(self, registration: Any, events: trio.MemorySendChannel[RunEvent]) -> None:
            await events.send(Line("stderr", "An error occurred: Not configured. Run config.(sh/cmd) to configure."))
            await events.send(Exited(1))

    harness = await supervise(make_config, NeverListens(), command(), Phase.READY)
    [failed] = harness.events()
    assert isinstance(failed, protocol.RegistrationFailed)
    assert (failed.reason, failed.error) == (
        "runner_start_failed",
        "runner exited with code 1 before listening for jobs",
    )


async def test_jit_config_skips_config_sh(make_config: ConfigFactory, autojump_clock: trio.testing.MockClock) -> None:
    runner = SimulatedRunner()
    jit = command(registration_token=None, jit_config="eyJqaXQiOiJjb25maWcifQ==", labels=[])
    harness = await supervise(make_config, runner, jit, Phase.IDLE)
    assert runner.configure_calls == []
    assert runner.runs == 1
    assert isinstance(harness.events()[0], protocol.RunnerRegistered)


async def test_a_registration_no_longer_in_progress_is_not_carried_out(
    make_config: ConfigFactory, autojump_clock: trio.testing.MockClock
) -> None:
    harness = Harness()
    runner = SimulatedRunner()
    send, receive = trio.open_memory_channel[Register](math.inf)
    harness.driver.apply(CommandArrived(command()))  # attempt 1 is in progress
    send.send_nowait(Register(command(), attempt=0))  # a hand-over the agent has moved on from
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            supervisor_task, make_config(), harness.driver, runner, receive, PhaseTimings(0), lambda: NOW
        )
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert runner.configure_calls == []
    assert harness.driver.phase is Phase.REGISTERING_RUNNER
