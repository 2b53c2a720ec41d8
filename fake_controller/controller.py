"""The fake controller: the seed's controller behaviour as an ASGI application, with a record of every request.

Seed behaviour: `vm_started` is acknowledged without a token and marks the VM ready; the first poll of a ready VM
gets one `register_runner` command, sent once per VM. Beyond the seed, a poll may ask to be held (`?wait=N`)
until a command exists, and commands can be queued for any VM (from a test, or the admin API).
"""

from __future__ import annotations

import importlib.util
import math
import secrets
import string
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from urllib.parse import parse_qs, unquote

import msgspec
import trio

from fake_controller.faults import GARBLED, DroppedConnection, Fault, FaultInjector, FaultPlan
from miglet import protocol
from miglet.config import MAX_COMMAND_WAIT

_VM_PATH: Final = "/api/v1/vms/"
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
# Told of everything a VM does: (vm_id, what, details); the command line prints it.
Observer = Callable[[str, str, dict[str, Any]], None]
_HEADER: Final = frozenset({"type", "vm_id", "pool_id", "org_id", "event_id", "timestamp"})
# What every event must carry (docs/protocol.md, "Header fields"); org_id only when the VM has one.
_REQUIRED_HEADER: Final = ("vm_id", "pool_id", "event_id", "timestamp")
_GARBLED: Final = frozenset({*GARBLED, "huge"})
# Faults that come after the request was processed.
_AFTER: Final = frozenset({"drop_after", "trickle"})
# About 2 KB of JSON a parser must descend 1,000 levels into; without field x, a good answer for either endpoint.
_NESTED: Final = b'{"status":"acknowledged","acknowledged":true,"commands":[],"x":' + b"[" * 1000 + b"]" * 1000 + b"}"
# The right shape, with a byte that is not UTF-8 inside a string the agent reads: an acknowledgment's `status`, a
# shutdown command's `id` (which would stop the agent, were the command taken).
_BAD_UTF8_ACK: Final = b'{"status":"acknowledged\xff","vm_id":"vm"}'
_BAD_UTF8_COMMANDS: Final = b'{"commands":[{"id":"cmd-\xff","type":"shutdown","parameters":{}}]}'
_TOKEN_ALPHABET: Final = string.ascii_uppercase + string.digits


class Settings(msgspec.Struct, kw_only=True):
    """What the controller hands out, and how it behaves."""

    runner_url: str = "https://github.com/example-org/example-repo"
    runner_group: str = "default"
    labels: list[str] = msgspec.field(default_factory=lambda: ["self-hosted", "linux", "x64"])
    token_ttl_s: float = 3600.0
    registration_delay_s: float = 0.0  # after vm_started, before the register_runner command exists
    send_registration: bool = True
    long_poll: bool = True  # honour ?wait=N; False answers at once, like the seed's controller
    max_wait_s: float = 60.0
    # When set, the agents' API answers 401 unless the request carries `Authorization: Bearer <one of these>`.
    accepted_tokens: list[str] | None = None


class RecordedRequest(msgspec.Struct, kw_only=True):
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    at: float  # trio clock


class VmRecord:
    """What the controller knows of one VM."""

    def __init__(self) -> None:
        self.ready = False
        self.registration_sent = False
        self.registration_due: float | None = None
        self.registration_token: str | None = None
        self.pending: deque[dict[str, Any]] = deque()
        self.sent: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []  # each event once, by event_id
        self.deliveries: list[dict[str, Any]] = []  # every event received, repeats included
        self.event_ids: set[str] = set()
        self.duplicates = 0
        self.changed = trio.Event()

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class FakeController:
    """An ASGI app; `requests` and `vms` hold everything that happened."""

    def __init__(
        self, settings: Settings | None = None, observer: Observer | None = None, faults: FaultPlan | None = None
    ) -> None:
        self.settings = settings or Settings()
        self.faults = FaultInjector(faults)
        self._observer = observer
        self.requests: list[RecordedRequest] = []
        self.vms: dict[str, VmRecord] = {}
        self.request_arrived = trio.Event()

    # --- test and admin API -----------------------------------------------------------------------------------

    def vm(self, vm_id: str) -> VmRecord:
        return self.vms.setdefault(vm_id, VmRecord())

    def enqueue(self, vm_id: str, command: dict[str, Any]) -> dict[str, Any]:
        """Queue a command for `vm_id`; it is delivered once, on the next poll."""
        command = {"id": f"cmd-{secrets.token_hex(6)}", "parameters": {}, "created_at": _now_text(), **command}
        vm = self.vm(vm_id)
        vm.pending.append(command)
        vm.notify()
        return command

    def events_of(self, vm_id: str, event_type: str | None = None) -> list[dict[str, Any]]:
        events = self.vm(vm_id).events
        return [event for event in events if event_type is None or event.get("type") == event_type]

    def requests_to(self, suffix: str) -> list[RecordedRequest]:
        return [request for request in self.requests if request.path.endswith(suffix)]

    def registration_command(self, vm_id: str) -> dict[str, Any]:
        """A fresh `register_runner` command in the seed's shape, with a new token."""
        vm = self.vm(vm_id)
        token = "AHT" + "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(26))
        vm.registration_token = token
        expires = datetime.now(UTC) + timedelta(seconds=self.settings.token_ttl_s)
        return {
            "id": f"register-{vm_id}-{int(time.time())}",
            "type": "register_runner",
            "parameters": {
                "registration_token": token,
                "runner_url": self.settings.runner_url,
                "runner_group": self.settings.runner_group,
                "labels": list(self.settings.labels),
                "expires_at": _text(expires),
            },
            "created_at": _now_text(),
        }

    # --- ASGI ---------------------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        request = await read_request(scope, receive)
        self.requests.append(request)
        path, query, headers, body = request.path, request.query, request.headers, request.body
        self.request_arrived.set()
        self.request_arrived = trio.Event()
        is_event = path.endswith("/events")
        if path.startswith(_VM_PATH) and not self._authorised(headers):
            await _respond(send, 401, {"error": "missing or unknown bearer token"})
            return
        # Only the agents' API misbehaves; the admin API always answers.
        fault = self.faults.choose("events" if is_event else "commands") if path.startswith(_VM_PATH) else None
        if fault is not None and fault.delay_s and fault.kind != "trickle":
            await trio.sleep(fault.delay_s)
        # A 2xx answer means "received": a garbled 2xx to an event comes after the event was processed.
        after = fault is not None and (fault.kind in _AFTER or (is_event and fault.kind in _GARBLED))
        if fault is not None and fault.kind != "latency" and not after:
            await _misbehave(send, fault, is_event)
            return
        status, payload = await self._route(scope["method"], path, parse_qs(query, keep_blank_values=True), body)
        if fault is not None and fault.kind == "trickle":
            await _trickle(send, status, msgspec.json.encode(payload), fault.delay_s)
            return
        if fault is not None and after:
            await _misbehave(send, fault, is_event)
            return
        await _respond(send, status, payload)

    def _authorised(self, headers: dict[str, str]) -> bool:
        accepted = self.settings.accepted_tokens
        if accepted is None:
            return True
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and token in accepted

    async def _route(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> tuple[int, Any]:
        if path.startswith(_VM_PATH):
            vm_id, _, tail = path[len(_VM_PATH) :].partition("/")
            if method == "POST" and tail == "events":
                return self._handle_event(vm_id, body)
            if method == "GET" and tail == "commands":
                if (problem := _wait_problem(query)) is not None:
                    return 400, {"error": problem}
                return 200, await self._handle_commands(vm_id, query)
        if path.startswith("/_admin/"):
            return self._handle_admin(method, path.removeprefix("/_admin"), body)
        return 404, {"error": f"no route for {method} {path}"}

    def _handle_event(self, vm_id: str, body: bytes) -> tuple[int, Any]:
        try:
            event = msgspec.json.decode(body)
        except msgspec.DecodeError:
            return 400, {"error": "body is not JSON"}
        if not isinstance(event, dict):
            return 400, {"error": "event must be an object"}
        try:
            # The same wire types as MIGlet's: an event of the wrong shape is a broken client, told so.
            msgspec.convert(_integral(event), protocol.AnyEvent)
        except msgspec.ValidationError as exc:
            return 400, {"error": f"not a valid event: {exc}"}
        if missing := [field for field in _REQUIRED_HEADER if not isinstance(event.get(field), str)]:
            return 400, {"error": f"not a valid event: the header lacks {', '.join(missing)}"}
        vm = self.vm(vm_id)
        vm.deliveries.append(event)
        event_id = event.get("event_id")
        duplicate = event_id is not None and event_id in vm.event_ids
        if duplicate:
            # A retry of an event already received (its answer was lost): answer again, record once.
            vm.duplicates += 1
        else:
            if event_id is not None:
                vm.event_ids.add(event_id)
            vm.events.append(event)
            self._observe(vm_id, f"event {event.get('type')}", {k: v for k, v in event.items() if k not in _HEADER})
        if event.get("type") == "vm_started":
            if not duplicate:
                vm.ready = True
                vm.registration_sent = False
                vm.registration_due = trio.current_time() + self.settings.registration_delay_s
                vm.notify()
            return 200, {
                "status": "acknowledged",
                "acknowledged": True,
                "vm_id": vm_id,
                "pool_id": event.get("pool_id"),
                "org_id": event.get("org_id"),
                "message": "VM started event acknowledged - MIGlet is ready for registration config",
            }
        return 200, {"status": "received", "vm_id": vm_id}

    async def _handle_commands(self, vm_id: str, query: dict[str, list[str]]) -> dict[str, Any]:
        vm = self.vm(vm_id)
        wait = _wait_seconds(query) if self.settings.long_poll else 0.0
        deadline = trio.current_time() + min(wait, self.settings.max_wait_s)
        while True:
            self._release_registration(vm_id, vm)
            if vm.pending or trio.current_time() >= deadline:
                break
            wake_at = deadline
            if vm.ready and not vm.registration_sent and vm.registration_due is not None:
                wake_at = min(wake_at, vm.registration_due)
            with trio.move_on_at(wake_at):
                await vm.changed.wait()
        commands = list(vm.pending)
        vm.pending.clear()
        if self.faults.plan.duplicate_commands:
            # Each command comes back once more on the next poll, as from a controller that lost track.
            vm.pending.extend(command for command in commands if command not in vm.sent)
        vm.sent.extend(commands)
        for command in commands:
            self._observe(vm_id, f"command {command.get('type')}", {"id": command.get("id")})
        return {"commands": commands, "vm_id": vm_id}

    def _observe(self, vm_id: str, what: str, detail: dict[str, Any]) -> None:
        if self._observer is not None:
            self._observer(vm_id, what, detail)

    def _release_registration(self, vm_id: str, vm: VmRecord) -> None:
        """Seed: a ready VM gets its register_runner command once."""
        if not (self.settings.send_registration and vm.ready and not vm.registration_sent):
            return
        if vm.registration_due is not None and trio.current_time() < vm.registration_due:
            return
        vm.registration_sent = True
        vm.pending.append(self.registration_command(vm_id))

    def _handle_admin(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        if method == "GET" and path == "/vms":
            return 200, {
                vm_id: {"ready": vm.ready, "registration_sent": vm.registration_sent, "events": vm.events}
                for vm_id, vm in self.vms.items()
            }
        if method == "GET" and path == "/requests":
            return 200, [{"method": r.method, "path": r.path, "query": r.query, "at": r.at} for r in self.requests]
        if method == "POST" and path.startswith("/vms/") and path.endswith("/commands"):
            vm_id = path.removeprefix("/vms/").removesuffix("/commands")
            try:
                command = msgspec.json.decode(body)
            except msgspec.DecodeError:
                return 400, {"error": "body is not JSON"}
            if not isinstance(command, dict) or "type" not in command:
                return 400, {"error": "a command is an object with a type"}
            return 200, self.enqueue(vm_id, command)
        if method == "PUT" and path == "/faults":
            try:
                self.faults.set_plan(msgspec.json.decode(body, type=FaultPlan))
            except msgspec.DecodeError as exc:
                return 400, {"error": f"not a fault plan: {exc}"}
            return 200, msgspec.to_builtins(self.faults.plan)
        return 404, {"error": f"no admin route for {method} {path}"}


def _integral(value: Any) -> Any:
    """`value` with every whole float made an int: JSON's 3.0 is an integer to the document, a float to msgspec."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _integral(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_integral(item) for item in value]
    return value


def _wait_problem(query: dict[str, list[str]]) -> str | None:
    """Why `?wait=` is not what the protocol allows (a whole number of seconds, 0 to MAX_COMMAND_WAIT)."""
    values = query.get("wait")
    if values is None:
        return None
    text = values[0]
    if len(values) > 1 or not text.isdigit() or int(text) > MAX_COMMAND_WAIT:
        return f"wait must be a whole number of seconds from 0 to {MAX_COMMAND_WAIT}, got {text!r}"
    return None


def _wait_seconds(query: dict[str, list[str]]) -> float:
    try:
        value = float(query.get("wait", ["0"])[0])
    except ValueError:
        return 0.0
    return value if math.isfinite(value) and value > 0 else 0.0


def _text(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _now_text() -> str:
    return _text(datetime.now(UTC))


async def read_request(scope: Scope, receive: Receive) -> RecordedRequest:
    """An HTTP request as the fakes record it, its body read whole."""
    return RecordedRequest(
        method=scope["method"],
        path=unquote(scope["path"]),
        query=scope.get("query_string", b"").decode("latin-1"),
        headers={key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]},
        body=await _read_body(receive),
        at=trio.current_time(),
    )


def serving_unavailable(what: str) -> bool:
    """Whether hypercorn, which serving over HTTP needs, is missing (then said in one line on stderr)."""
    if importlib.util.find_spec("hypercorn") is not None:
        return False
    print(
        f"{what}: serving needs hypercorn, an optional dependency: pip install 'miglet[fake-controller]'",
        file=sys.stderr,
    )
    return True


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


async def _respond(send: Send, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
    await _respond_raw(send, status, msgspec.json.encode(payload), b"application/json", headers)


async def _respond_raw(
    send: Send, status: int, body: bytes, content_type: bytes, headers: dict[str, str] | None = None
) -> None:
    raw_headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    raw_headers += [(key.lower().encode(), value.encode()) for key, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


async def _trickle(send: Send, status: int, body: bytes, delay_s: float) -> None:
    """Answer one byte at a time, `delay_s` apart: a controller (or a proxy) that never quite times out."""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    for index in range(len(body)):
        await trio.sleep(delay_s)
        await send({"type": "http.response.body", "body": body[index : index + 1], "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def _misbehave(send: Send, fault: Fault, is_event: bool) -> None:
    match fault.kind:
        case "status":
            headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else None
            await _respond(send, fault.status, {"error": "injected fault"}, headers)
        case "malformed":
            await _respond_raw(send, 200, b"<html><body>502 Bad Gateway</body></html>", b"text/html")
        case "wrong_shape":
            await _respond(send, 200, [{"commands": "not a list"}, 42])
        case "huge":
            await _respond_raw(send, 200, b"[" + b"0," * (1 << 20) + b"0]", b"application/json")
        case "nested":
            await _respond_raw(send, 200, _NESTED, b"application/json")
        case "bad_utf8":
            await _respond_raw(send, 200, _BAD_UTF8_ACK if is_event else _BAD_UTF8_COMMANDS, b"application/json")
        case "drop" | "drop_after":
            # Promise a body, then break off: the client sees the connection fail mid-answer.
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"1000")]})
            await send({"type": "http.response.body", "body": b'{"trunc', "more_body": True})
            raise DroppedConnection("connection dropped by fault injection")


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
