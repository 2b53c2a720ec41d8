"""The controller API as an OpenAPI 3.1 document, generated from the wire types in `miglet.protocol`.

`python -m miglet.openapi > docs/openapi.json` regenerates the committed copy; a test fails when that copy
drifts from what `build()` says. docs/protocol.md is the same contract in prose.
"""

from __future__ import annotations

import json
import sys
import typing
from typing import Any, Final

import msgspec

from miglet import __version__, protocol
from miglet.config import MAX_COMMAND_WAIT
from miglet.controller import MAX_BODY_BYTES
from miglet.retry import MAX_RETRY_AFTER
from miglet.secret import Secret

REF_TEMPLATE: Final = "#/components/schemas/{name}"
Schema = dict[str, Any]

_EVENT_DESCRIPTION: Final = (
    "Every event MIGlet sends, chosen by `type`. MIGlet always fills `vm_id`, `pool_id`, `event_id` and"
    " `timestamp`, and `org_id` when it is set. Only `vm_started` is from the seed; the rest are extensions."
)
_COMMAND_DESCRIPTION: Final = (
    "A command for the agent, chosen by `type`. MIGlet decodes each command on its own and ignores unknown"
    " fields. A command of an unknown type, or one that does not match its schema, is skipped and reported as"
    " `command_failed` (a malformed `register_runner` as `registration_failed` with reason `invalid_command`);"
    " the other commands of the answer are still carried out. A command id seen before is ignored."
)
_MIB: Final = f"{MAX_BODY_BYTES // (1 << 20)} MiB"


def _ref(name: str) -> Schema:
    return {"$ref": REF_TEMPLATE.format(name=name)}


def _schema_hook(type_: type) -> Schema:
    if type_ is Secret:
        # Not `writeOnly`: the controller sends these in its answers, and tools read writeOnly as "never in a
        # response" (schemathesis flags a correct answer, generators drop the field).
        return {
            "type": "string",
            "format": "password",
            "x-secret": True,
            "description": "A secret: MIGlet uses it, but never logs, prints or sends it anywhere else.",
        }
    raise NotImplementedError(f"no schema for {type_!r}")


def _schemas() -> dict[str, Schema]:
    (event, command, _, _), schemas = msgspec.json.schema_components(
        [protocol.AnyEvent, protocol.Command, protocol.Acknowledgment, protocol.CommandsEnvelope],
        schema_hook=_schema_hook,
        ref_template=REF_TEMPLATE,
    )
    # The envelope's commands are raw JSON to the decoder (each is decoded alone); on the wire each is a Command.
    commands = schemas["CommandsEnvelope"]["properties"]["commands"]
    array = next(option for option in commands["anyOf"] if option.get("type") == "array")
    array["items"] = _ref("Command")
    # The header's fields have defaults in the types (the outbox stamps them), but are on every event sent.
    for name in _event_type_names(schemas):
        schema = schemas[name]
        schema["required"] = sorted({*schema.get("required", ()), *_HEADER_ALWAYS_SENT})
    return {
        "Event": {"description": _EVENT_DESCRIPTION, **event},
        "Command": {"description": _COMMAND_DESCRIPTION, **command},
        **schemas,
    }


_HEADER_ALWAYS_SENT: Final = ("vm_id", "pool_id", "event_id", "timestamp", "type")


def _event_type_names(schemas: dict[str, Schema]) -> list[str]:
    """The schema names of the event types."""
    return [event.__name__ for event in typing.get_args(protocol.AnyEvent) if event.__name__ in schemas]


def _vm_id() -> Schema:
    return {
        "name": "vm_id",
        "in": "path",
        "required": True,
        "description": "The VM's id (MIGLET_VM_ID), percent-encoded.",
        "schema": {"type": "string"},
    }


def _post_event() -> Schema:
    return {
        "operationId": "postEvent",
        "summary": "Report an event (seed: vm_started; the other types are extensions)",
        "description": (
            "Events leave one at a time, in order, through one outbox; `vm_started` is sent on its own before"
            " the others. Any 2xx means delivered. 408, 429, 5xx and network errors are retried with exponential"
            " backoff and full jitter, honouring `Retry-After`; every retry carries the same `event_id`, so"
            " dedupe on it. Any other 4xx drops the event, except `vm_started`, which is tried until acknowledged."
        ),
        "parameters": [_vm_id()],
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("Event")}}},
        "responses": {
            "200": {
                "description": (
                    f"Delivered. The answer to `vm_started` is read (at most {_MIB}) and must be an"
                    " Acknowledgment: MIGlet goes on when `acknowledged` is true, or when `acknowledged` is absent"
                    ' and `status` is "acknowledged"; otherwise it sends `vm_started` again. The answer to any'
                    " other event is not read."
                ),
                "content": {
                    "application/json": {
                        "schema": {
                            "anyOf": [
                                _ref("Acknowledgment"),
                                {"type": "object", "description": "The answer to any other event (not read)."},
                            ]
                        }
                    }
                },
            },
            "2XX": {"description": "Any other 2xx: delivered too (an answer to vm_started is still read)."},
            "408": {"$ref": "#/components/responses/TryAgain"},
            "429": {"$ref": "#/components/responses/TryAgain"},
            "5XX": {"$ref": "#/components/responses/TryAgain"},
            "4XX": {"description": "Any other 4xx: the event is logged and dropped, except vm_started (tried again)."},
        },
    }


def _get_commands() -> Schema:
    return {
        "operationId": "getCommands",
        "summary": "Poll for commands (seed)",
        "description": (
            "Polled from Ready on until the agent stops: at once, then at most every MIGLET_POLL_INTERVAL seconds"
            " (5 by default). A controller that ignores `wait` and answers at once sees exactly that cadence."
            " Any failure (a non-2xx answer, a network error, an answer that is not a commands envelope or is"
            f" over {_MIB}) is tried again after the larger of the poll interval and the backoff or"
            " `Retry-After`."
        ),
        "parameters": [
            _vm_id(),
            {
                "name": "wait",
                "in": "query",
                "required": False,
                "description": (
                    "Long poll (extension): hold the request up to this many seconds until a command exists."
                    " Sent when MIGLET_COMMAND_WAIT > 0; MIGlet waits that long plus 10 s for the answer."
                ),
                "schema": {"type": "integer", "minimum": 0, "maximum": MAX_COMMAND_WAIT},
            },
        ],
        "responses": {
            "200": {
                "description": "The pending commands (often none).",
                "content": {"application/json": {"schema": _ref("CommandsEnvelope")}},
            },
            "default": {
                "description": "Anything else: the poll is tried again later.",
                "headers": {"Retry-After": {"$ref": "#/components/headers/Retry-After"}},
            },
        },
    }


def build() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the controller API that MIGlet speaks."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "MIGlet controller API",
            "version": __version__,
            "description": (
                "The two endpoints a controller serves to its MIGlet agents, as MIGlet uses them. Generated from"
                " miglet/protocol.py by `python -m miglet.openapi`; docs/protocol.md tells the same in prose."
            ),
        },
        "servers": [
            {
                "url": "{endpoint}",
                "description": "The controller's base URL (MIGLET_CONTROLLER_ENDPOINT).",
                "variables": {"endpoint": {"default": "http://localhost:8080"}},
            }
        ],
        "security": [{"bearer": []}, {}],
        "paths": {
            "/api/v1/vms/{vm_id}/events": {"post": _post_event()},
            "/api/v1/vms/{vm_id}/commands": {"get": _get_commands()},
        },
        "components": {
            "schemas": _schemas(),
            "responses": {
                "TryAgain": {
                    "description": "Not delivered: tried again with exponential backoff and full jitter.",
                    "headers": {"Retry-After": {"$ref": "#/components/headers/Retry-After"}},
                }
            },
            "headers": {
                "Retry-After": {
                    "description": (
                        "Delta-seconds or an HTTP date: MIGlet waits that long (at most"
                        f" {MAX_RETRY_AFTER:g} s) instead of its own backoff."
                    ),
                    "schema": {"type": "string"},
                }
            },
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": (
                        "Optional: sent on every request when MIGLET_CONTROLLER_TOKEN (or _TOKEN_FILE) is set."
                    ),
                }
            },
        },
    }


def render() -> str:
    """`build()` as the text of docs/openapi.json."""
    return json.dumps(build(), indent=2) + "\n"


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
