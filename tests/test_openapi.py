"""The OpenAPI document: committed copy up to date, valid OpenAPI 3.1, true to both sides of the wire and to the
JSON examples of docs/protocol.md.

Rules: the document is checked against what really crosses the wire, the fake controller's answers (in-process,
`httpx.ASGITransport`) and MIGlet's own encoded events; `$ref`s resolve against the whole document.
"""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from openapi_schema_validator import OAS31Validator, oas31_format_checker
from openapi_spec_validator import validate as validate_openapi
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from fake_controller import FakeController
from miglet import __version__, openapi, protocol
from miglet.stamp import Stamper

DOCS = Path(__file__).resolve().parent.parent / "docs"
COMMITTED = DOCS / "openapi.json"
PROTOCOL_MD = DOCS / "protocol.md"
DOCUMENT_URI = "urn:miglet:openapi"
EVENTS = "/api/v1/vms/{vm_id}/events"
COMMANDS = "/api/v1/vms/{vm_id}/commands"


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return openapi.build()


def validator_at(document: dict[str, Any], pointer: str) -> Any:
    """A validator for the schema at `pointer` in `document`, its refs resolved against the whole document."""
    registry: Registry[Any] = Registry().with_resource(
        DOCUMENT_URI, Resource.from_contents(document, default_specification=DRAFT202012)
    )
    # OAS31Validator is jsonschema's Draft 2020-12 validator with the OpenAPI 3.1 vocabulary added.
    return OAS31Validator(
        {"$ref": f"{DOCUMENT_URI}#{quote(pointer)}"}, registry=registry, format_checker=oas31_format_checker
    )


def component(document: dict[str, Any], name: str) -> Any:
    return validator_at(document, f"/components/schemas/{name}")


def escaped(path: str) -> str:
    return path.replace("~", "~0").replace("/", "~1")


# --- (a) and (b): the document itself ---------------------------------------------------------------------------


def test_committed_document_is_up_to_date() -> None:
    assert COMMITTED.read_text(encoding="utf-8") == openapi.render(), (
        "docs/openapi.json is stale: regenerate it with `.venv/bin/python -m miglet.openapi > docs/openapi.json`"
    )


def test_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1.")
    assert document["info"]["version"] == __version__
    validate_openapi(document)


def test_render_is_stable_json() -> None:
    text = openapi.render()
    assert text.endswith("}\n")
    assert text == openapi.render()
    assert json.loads(text) == openapi.build()


def test_secrets_are_marked_as_secrets_but_not_write_only(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    fields = [
        ("RegisterRunnerParameters", "registration_token"),
        ("RegisterRunnerParameters", "jit_config"),
        ("ShutdownParameters", "remove_token"),
    ]
    for struct, field in fields:
        options = schemas[struct]["properties"][field]["anyOf"]
        secret = next(option for option in options if option.get("type") == "string")
        assert (secret["format"], secret["x-secret"]) == ("password", True), (struct, field)
        assert "writeOnly" not in secret
        assert secret["description"]


def test_unions_cover_every_wire_type(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    for name, union in (("Event", protocol.AnyEvent), ("Command", protocol.Command)):
        tags = {member.__struct_config__.tag for member in typing.get_args(union)}
        mapping = schemas[name]["discriminator"]["mapping"]
        assert schemas[name]["discriminator"]["propertyName"] == "type"
        assert set(mapping) == tags
        for tag, ref in mapping.items():
            target = schemas[ref.removeprefix("#/components/schemas/")]
            assert target["properties"]["type"] == {"enum": [tag]}


def test_wait_is_an_optional_bounded_integer(document: dict[str, Any]) -> None:
    parameters = document["paths"][COMMANDS]["get"]["parameters"]
    wait = next(parameter for parameter in parameters if parameter["name"] == "wait")
    assert wait["in"] == "query"
    assert wait["required"] is False
    # MIGLET_COMMAND_WAIT is 0-600 (MIGlet sends no `wait` for 0, which means the same: answer at once).
    assert wait["schema"] == {"type": "integer", "minimum": 0, "maximum": 600}


def test_bearer_auth_is_optional(document: dict[str, Any]) -> None:
    scheme = document["components"]["securitySchemes"]["bearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    # The empty requirement makes it optional: a controller without auth is served too.
    assert document["security"] == [{"bearer": []}, {}]


# --- (c): the fake controller's real answers --------------------------------------------------------------------


async def test_fake_controller_answers_match_the_document(document: dict[str, Any]) -> None:
    controller = FakeController()
    stamper = Stamper("vm-123", "pool-001", "org-001")
    ack_schema = component(document, "Acknowledgment")
    event_answer = validator_at(
        document, f"/paths/{escaped(EVENTS)}/post/responses/200/content/{escaped('application/json')}/schema"
    )
    envelope_schema = component(document, "CommandsEnvelope")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=controller), base_url="http://controller.test"
    ) as http:
        started = protocol.encode_event(stamper.stamp(protocol.VmStarted()))
        answer = await http.post("/api/v1/vms/vm-123/events", content=started)
        assert answer.status_code == 200
        ack = answer.json()
        ack_schema.validate(ack)
        event_answer.validate(ack)
        assert protocol.decode_acknowledgment(answer.content).is_acknowledged

        heartbeat = protocol.encode_event(stamper.stamp(protocol.Heartbeat(state="Ready", uptime_s=1.5)))
        answer = await http.post("/api/v1/vms/vm-123/events", content=heartbeat)
        assert answer.status_code == 200
        event_answer.validate(answer.json())

        answer = await http.get("/api/v1/vms/vm-123/commands")
        assert answer.status_code == 200
        body = answer.json()
        envelope_schema.validate(body)
        assert [command["type"] for command in body["commands"]] == ["register_runner"]
        component(document, "RegisterRunner").validate(body["commands"][0])

        controller.enqueue(
            "vm-123",
            {
                "type": "shutdown",
                "parameters": {"reason": "scale down", "grace_period_s": 10, "remove_token": "AREMOVETOKEN123"},
            },
        )
        controller.enqueue("vm-123", {"type": "shutdown"})
        answer = await http.get("/api/v1/vms/vm-123/commands", params={"wait": "0"})
        assert answer.status_code == 200
        body = answer.json()
        envelope_schema.validate(body)
        assert [command["type"] for command in body["commands"]] == ["shutdown", "shutdown"]
        for command in body["commands"]:
            component(document, "Shutdown").validate(command)

    # What the document accepts, MIGlet's decoder takes as commands (and nothing is rejected).
    batch = protocol.decode_commands(answer.content)
    assert [type(command) for command in batch.commands] == [protocol.Shutdown, protocol.Shutdown]
    assert batch.rejected == []


def test_schemas_reject_what_the_decoder_rejects(document: dict[str, Any]) -> None:
    """The refs really resolve: a broken command fails the envelope schema, as it fails the decoder."""
    envelope = component(document, "CommandsEnvelope")
    no_url = {"id": "c1", "type": "register_runner", "parameters": {"registration_token": "AHTXXXXXXXXXX"}}
    bad_grace = {"id": "c2", "type": "shutdown", "parameters": {"grace_period_s": -1}}
    naive_time = {"id": "c3", "type": "shutdown", "created_at": "2024-01-15 10:30"}
    for command in (no_url, bad_grace, naive_time):
        assert not envelope.is_valid({"commands": [command], "vm_id": "vm-123"}), command
        batch = protocol.decode_commands(json.dumps({"commands": [command]}).encode())
        assert batch.commands == [], command
    assert not component(document, "Acknowledgment").is_valid({"acknowledged": "yes"})
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_acknowledgment(b'{"acknowledged": "yes"}')


# --- (d): every event MIGlet can send ---------------------------------------------------------------------------

EXAMPLES: list[protocol.AnyEvent] = [
    protocol.VmStarted(),
    protocol.RunnerRegistered(runner_name="vm-123", command_id="register-vm-123-1"),
    protocol.RunnerRegistered(
        runner_name="vm-123", command_id="register-vm-123-1", timings={"acknowledged_s": 0.2, "listening_s": 9.5}
    ),
    protocol.RegistrationFailed(command_id="register-vm-123-1", reason="token_expired", error="expired"),
    protocol.JobStarted(job_name="build"),
    protocol.JobCompleted(job_name="build", result="Succeeded"),
    protocol.JobIdentified(
        job_name="build", github=protocol.GithubContext(repository="octo-org/app", run_id="1", run_attempt="1")
    ),
    protocol.JobCompleted(
        job_name="build", result="Failed", github=protocol.GithubContext(repository="octo-org/app", sha="a" * 40)
    ),
    protocol.RunnerExited(exit_code=0, reason="job_done"),
    protocol.CommandFailed(command_id="cmd-1", command_type="reboot", error="unknown command type 'reboot'"),
    protocol.Heartbeat(state="Idle", uptime_s=30.0),
    protocol.Heartbeat(state="Busy", uptime_s=60.0, events_dropped={"heartbeat": 3}),
    protocol.InternalError(task="poller", error_class="KeyError", error="'id'"),
    protocol.VmStopping(reason="shutdown command", runner_name="vm-123"),
    protocol.VmPreempted(
        provider="aws", action="terminate", deadline="2024-01-15T10:32:00Z", phase="Busy", job_name="b"
    ),
    protocol.VmPreempted(provider="aws", action="autoscaling-terminated", deadline=None, phase="Ready"),
]


def test_examples_cover_every_event_type() -> None:
    assert {type(event) for event in EXAMPLES} == set(typing.get_args(protocol.AnyEvent))


@pytest.mark.parametrize("org_id", ["org-001", None])
@pytest.mark.parametrize("event", EXAMPLES, ids=lambda event: type(event).__name__)
def test_every_event_matches_the_request_schema(
    document: dict[str, Any], event: protocol.AnyEvent, org_id: str | None
) -> None:
    body = json.loads(protocol.encode_event(Stamper("vm-123", "pool-001", org_id).stamp(event)))
    request = f"/paths/{escaped(EVENTS)}/post/requestBody/content/{escaped('application/json')}/schema"
    validator_at(document, request).validate(body)
    # The discriminator names the schema that must hold on its own, too.
    target = document["components"]["schemas"]["Event"]["discriminator"]["mapping"][body["type"]]
    validator_at(document, target.removeprefix("#")).validate(body)
    assert ("org_id" in body) == (org_id is not None)


def test_the_header_is_required_on_every_event(document: dict[str, Any]) -> None:
    """The header fields have defaults in the types (the outbox stamps them), yet every event sent has them: the
    document requires them, so that a controller can rely on `event_id`."""
    assert not component(document, "Event").is_valid(json.loads(protocol.encode_event(protocol.VmStarted())))
    stamped = Stamper("vm-123", "pool-001", None).stamp(protocol.VmStarted())
    component(document, "Event").validate(json.loads(protocol.encode_event(stamped)))


# --- docs/protocol.md: its JSON examples hold to the document ---------------------------------------------------


def json_examples(text: str) -> list[Any]:
    """Every JSON value in the ```json blocks of `text` (a block may hold several, one after another)."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    for block in re.findall(r"```json\n(.*?)```", text, flags=re.DOTALL):
        position = 0
        while block[position:].strip():
            position += len(block[position:]) - len(block[position:].lstrip())
            value, position = decoder.raw_decode(block, position)
            values.append(value)
    return values


HEADER = {"vm_id": "vm-123", "pool_id": "pool-001", "event_id": "e1", "timestamp": "2024-01-15T10:30:00.000Z"}


def test_protocol_md_examples_match_the_document(document: dict[str, Any]) -> None:
    event_types = set(document["components"]["schemas"]["Event"]["discriminator"]["mapping"])
    command_types = set(document["components"]["schemas"]["Command"]["discriminator"]["mapping"])
    examples = json_examples(PROTOCOL_MD.read_text(encoding="utf-8"))
    checked: set[str] = set()
    for example in examples:
        if "commands" in example:
            schema = "CommandsEnvelope"
        elif example.get("type") in event_types:
            schema = "Event"
            # The examples leave out the header every event carries.
            example = {**HEADER, **example}
        elif example.get("type") in command_types:
            schema = "Command"
        else:
            schema = "Acknowledgment"
        component(document, schema).validate(example)
        checked.add(example.get("type", schema))
    assert checked >= event_types | {"CommandsEnvelope", "Acknowledgment", "shutdown"}
