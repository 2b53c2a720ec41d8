"""Wire types: the seed's examples decode exactly, unknown fields are tolerated, bad commands are isolated.

Rules: bodies are bytes as a controller would send them; the seed's JSON is copied verbatim.
"""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from miglet import protocol
from miglet.secret import Secret

SEED_ACK = b"""{
  "status": "acknowledged",
  "acknowledged": true,
  "vm_id": "vm-123",
  "pool_id": "pool-001",
  "org_id": "org-001",
  "message": "VM started event acknowledged - MIGlet is ready for registration config"
}"""

SEED_COMMANDS = b"""{
  "commands": [
    {
      "id": "register-vm-123-1234567890",
      "type": "register_runner",
      "parameters": {
        "registration_token": "AHTXXXXXXXXXXXXXXXXXXXX",
        "runner_url": "https://github.com/leaffyAdmin/django_repo",
        "runner_group": "default",
        "labels": ["self-hosted", "linux", "x64"],
        "expires_at": "2024-01-15T11:30:00Z"
      },
      "created_at": "2024-01-15T10:30:00Z"
    }
  ],
  "vm_id": "vm-123"
}"""


def test_seed_acknowledgment() -> None:
    ack = protocol.decode_acknowledgment(SEED_ACK)
    assert ack.is_acknowledged
    assert ack.vm_id == "vm-123"
    assert ack.message == "VM started event acknowledged - MIGlet is ready for registration config"


@pytest.mark.parametrize(
    ("body", "acknowledged"),
    [
        (b'{"status": "acknowledged"}', True),
        (b'{"acknowledged": true}', True),
        (b'{"status": "acknowledged", "acknowledged": false}', False),
        (b'{"status": "pending"}', False),
        (b"{}", False),
        (b'{"acknowledged": true, "registration_token": "old-style", "extra": [1, 2]}', True),
    ],
)
def test_acknowledgment_variants(body: bytes, acknowledged: bool) -> None:
    assert protocol.decode_acknowledgment(body).is_acknowledged is acknowledged


@pytest.mark.parametrize("body", [b"", b"not json", b"[]", b'{"acknowledged": "yes"}'])
def test_unusable_acknowledgment(body: bytes) -> None:
    with pytest.raises(protocol.ProtocolError, match="unusable acknowledgment"):
        protocol.decode_acknowledgment(body)


def test_seed_register_runner_command() -> None:
    batch = protocol.decode_commands(SEED_COMMANDS)
    assert batch.rejected == []
    [command] = batch.commands
    assert isinstance(command, protocol.RegisterRunner)
    assert command.id == "register-vm-123-1234567890"
    params = command.parameters
    assert isinstance(params.registration_token, Secret)
    assert params.registration_token.reveal() == "AHTXXXXXXXXXXXXXXXXXXXX"
    assert params.runner_url == "https://github.com/leaffyAdmin/django_repo"
    assert params.runner_group == "default"
    assert params.labels == ["self-hosted", "linux", "x64"]
    assert params.expires_at == datetime(2024, 1, 15, 11, 30, tzinfo=UTC)
    assert command.created_at == datetime(2024, 1, 15, 10, 30, tzinfo=UTC)
    assert "AHTX" not in repr(command)


def test_malformed_command_is_rejected_alone() -> None:
    body = msgspec.json.encode(
        {
            "commands": [
                {"id": "a", "type": "register_runner", "parameters": {"labels": "x"}},
                {"id": "b", "type": "reboot", "parameters": {}},
                {"id": 7, "type": "register_runner"},
                "not an object",
                {"id": "c", "type": "shutdown", "parameters": {"reason": "scale-in", "grace_period_s": 5}},
                {
                    "id": "d",
                    "type": "register_runner",
                    "parameters": {"runner_url": "https://github.com/o", "registration_token": "tok-123456"},
                },
            ],
            "vm_id": "vm-123",
            "unexpected": True,
        }
    )
    batch = protocol.decode_commands(body)
    assert [command.id for command in batch.commands] == ["c", "d"]
    rejected = {(r.id, r.type): r.error for r in batch.rejected}
    assert "malformed command" in rejected[("a", "register_runner")]
    assert rejected[("b", "reboot")] == "unknown command type 'reboot'"
    assert (None, "register_runner") in rejected
    assert (None, None) in rejected


def test_a_secret_with_a_nul_character_makes_the_command_malformed() -> None:
    body = msgspec.json.encode(
        {
            "commands": [
                {
                    "id": "a",
                    "type": "register_runner",
                    "parameters": {"runner_url": "https://github.com/o", "registration_token": "sec\u0000ret1234"},
                }
            ]
        }
    )
    batch = protocol.decode_commands(body)
    assert batch.commands == []
    [rejected] = batch.rejected
    assert "NUL" in rejected.error
    assert "sec" not in rejected.error


def test_rejection_reason_never_includes_a_secret_value() -> None:
    body = (
        b'{"commands": [{"id": "a", "type": "register_runner", "parameters": {"registration_token": 12345678,'
        b' "runner_url": "https://github.com/o", "jit_config": "jit-secret-abcdef", "labels": [1]}}]}'
    )
    batch = protocol.decode_commands(body)
    [rejected] = batch.rejected
    assert "jit-secret-abcdef" not in rejected.error
    assert "12345678" not in rejected.error


@pytest.mark.parametrize("body", [b"", b"<html>", b"[]", b'{"commands": {}}', b'{"commands": [1], "vm_id": 3}'])
def test_unusable_commands_response(body: bytes) -> None:
    with pytest.raises(protocol.ProtocolError, match="unusable commands response"):
        protocol.decode_commands(body)


def test_empty_and_null_command_lists() -> None:
    assert protocol.decode_commands(b'{"commands": [], "vm_id": "v"}').commands == []
    assert protocol.decode_commands(b'{"commands": null}').commands == []
    assert protocol.decode_commands(b"{}").commands == []


def test_event_encoding_carries_type_first_and_omits_unset_org() -> None:
    event = protocol.VmStarted(vm_id="vm-123", pool_id="pool-001", event_id="e1", timestamp="2024-01-15T10:30:00Z")
    assert protocol.encode_event(event) == (
        b'{"type":"vm_started","vm_id":"vm-123","pool_id":"pool-001","event_id":"e1",'
        b'"timestamp":"2024-01-15T10:30:00Z"}'
    )
    with_org = protocol.JobCompleted(vm_id="v", pool_id="p", org_id="o", job_name="build", result="Succeeded")
    decoded = msgspec.json.decode(protocol.encode_event(with_org))
    assert decoded["org_id"] == "o"
    assert decoded["type"] == "job_completed"


ENCODED_SECRET = Secret("AHTENCODEDEVENTSECRET0001")


@pytest.mark.parametrize(
    "event",
    [
        protocol.JobStarted(job_name="deploy AHTENCODEDEVENTSECRET0001"),
        protocol.JobCompleted(job_name="AHTENCODEDEVENTSECRET0001", result="Succeeded"),
        protocol.RegistrationFailed(command_id="c1", reason="configure_failed", error="bad AHTENCODEDEVENTSECRET0001"),
        protocol.CommandFailed(command_id="AHTENCODEDEVENTSECRET0001", command_type="shutdown", error="e"),
        protocol.VmStopping(reason="asked by AHTENCODEDEVENTSECRET0001", runner_name="vm-123"),
        protocol.RunnerRegistered(runner_name="r", command_id="c1", timings={"AHTENCODEDEVENTSECRET0001_s": 1.0}),
        protocol.Heartbeat(state="Idle AHTENCODEDEVENTSECRET0001", uptime_s=1.0),
        protocol.InternalError(task="poller", error_class="KeyError", error="AHTENCODEDEVENTSECRET0001"),
    ],
)
def test_every_string_an_event_carries_is_masked_on_the_wire(event: protocol.AnyEvent) -> None:
    encoded = protocol.encode_event(event)
    assert ENCODED_SECRET.reveal().encode() not in encoded
    assert b"***" in encoded
    assert ENCODED_SECRET.reveal() in repr(event)  # the event itself is left as it was


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


@given(st.lists(json_values, max_size=5))
def test_any_command_list_decodes_or_rejects_each_item(items: list[object]) -> None:
    batch = protocol.decode_commands(msgspec.json.encode({"commands": items}))
    assert len(batch.commands) + len(batch.rejected) == len(items)
