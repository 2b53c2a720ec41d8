"""Fake cloud metadata services (AWS IMDSv2, GCP, Azure Scheduled Events) as one ASGI application.

Each answers the paths MIGlet reads as the cloud documents them, and checks what the cloud checks: AWS wants a
session token (`PUT /latest/api/token`) that expires after the TTL asked for, GCP the `Metadata-Flavor: Google`
header, Azure `Metadata: true`. A test (or the admin API, or `python -m fake_controller.metadata`) gives a notice,
breaks the service, or revokes tokens; every request is recorded. It serves on loopback only, so that nothing
that tests MIGlet ever asks a real metadata address.

admin API (JSON bodies):
  POST /_admin/notice     aws: {"action": "terminate", "in_s": 120} | {"lifecycle": "Terminated"} | {"rebalance": true}
                          gcp: {"preempted": true} | {"maintenance": "TERMINATE_ON_HOST_MAINTENANCE"}
                          azure: {"event_type": "Preempt", "in_s": 30, "resources": ["vm-name"]}
  POST /_admin/fault      {"status": 500} | {"garbage": true} | {} (healthy again)
  POST /_admin/revoke     AWS: every session token stops working
  GET  /_admin/requests   every request received
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import secrets
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from functools import partial
from typing import Any, Final
from urllib.parse import parse_qs

import msgspec
import trio

from fake_controller.controller import (
    Receive,
    RecordedRequest,
    Scope,
    Send,
    _lifespan,
    _respond_raw,
    read_request,
    serving_unavailable,
)

PROVIDERS: Final = ("aws", "gcp", "azure")
GARBAGE: Final = b'{"Events": [{"EventId": 7, "Resources": "nope"'
# GCP holds a wait_for_change request at most this long (its own bound), unless timeout_sec says less.
GCP_MAX_WAIT_S: Final = 60.0


class FakeMetadata:
    """One cloud's metadata service; `provider` is aws, gcp or azure."""

    def __init__(self, provider: str, *, vm_name: str = "vm-123") -> None:
        if provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}")
        self.provider = provider
        self.vm_name = vm_name
        self.requests: list[RecordedRequest] = []
        # A fault for every data request: an HTTP status, or garbage (200 with a body that is not what it should be).
        self.status: int | None = None
        self.garbage = False
        # AWS
        self.tokens: dict[str, float] = {}  # token -> when it expires (trio time)
        self.spot_action: dict[str, str] | None = None
        self.lifecycle_state: str | None = None
        self.rebalance: dict[str, str] | None = None
        # GCP: each watched value, and its version (the ETag)
        self.values: dict[str, str] = {"instance/preempted": "FALSE", "instance/maintenance-event": "NONE"}
        self._versions: dict[str, int] = dict.fromkeys(self.values, 1)
        self._changed = trio.Event()
        # Azure
        self.events: list[dict[str, Any]] = []
        self.approvals: list[str] = []
        self.approved = trio.Event()  # set at the first approval
        self.approval_delay_s = 0.0  # how long an approval takes to be answered
        self.ignore_wait = False  # GCP: answer at once, whatever wait_for_change asks
        self._incarnation = 1
        self._event_ids = itertools.count(1)

    # --- scripting -------------------------------------------------------------------------------------------

    def notice(self, **what: Any) -> None:
        """Give a notice, as the admin API's `POST /_admin/notice` does (see the module's docstring)."""
        now = datetime.now(UTC)
        if self.provider == "aws":
            if "action" in what:
                when = now + timedelta(seconds=float(what.get("in_s", 120)))
                self.spot_action = {"action": str(what["action"]), "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")}
            if "lifecycle" in what:
                self.lifecycle_state = str(what["lifecycle"])
            if what.get("rebalance"):
                self.rebalance = {"noticeTime": now.strftime("%Y-%m-%dT%H:%M:%SZ")}
        elif self.provider == "gcp":
            if "preempted" in what:
                self._set("instance/preempted", "TRUE" if what["preempted"] else "FALSE")
            if "maintenance" in what:
                self._set("instance/maintenance-event", str(what["maintenance"]))
        else:
            when = now + timedelta(seconds=float(what.get("in_s", 30)))
            self.events.append(
                {
                    "EventId": str(what.get("event_id", f"event-{next(self._event_ids)}")),
                    "EventType": str(what.get("event_type", "Preempt")),
                    "ResourceType": "VirtualMachine",
                    "Resources": list(what.get("resources", [self.vm_name])),
                    "EventStatus": "Scheduled",
                    "NotBefore": format_datetime(when, usegmt=True),
                    "Description": "",
                    "EventSource": "Platform",
                    "DurationInSeconds": -1,
                }
            )
            self._incarnation += 1

    def revoke_tokens(self) -> None:
        self.tokens.clear()

    def _set(self, key: str, value: str) -> None:
        if self.values[key] != value:
            self.values[key] = value
            self._versions[key] += 1
            self._changed.set()
            self._changed = trio.Event()

    def requests_to(self, path: str) -> list[RecordedRequest]:
        return [request for request in self.requests if request.path == path]

    # --- ASGI ------------------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        request = await read_request(scope, receive)
        self.requests.append(request)
        method, path, query, headers, body = request.method, request.path, request.query, request.headers, request.body
        if path.startswith("/_admin/"):
            status, answer, content_type = self._admin(method, path, body)
        else:
            status, answer, content_type, extra = await self._serve(method, path, parse_qs(query), headers, body)
            await _respond_raw(send, status, answer, content_type, extra)
            return
        await _respond_raw(send, status, answer, content_type)

    def _admin(self, method: str, path: str, body: bytes) -> tuple[int, bytes, bytes]:
        json = b"application/json"
        try:
            what = msgspec.json.decode(body) if body else {}
        except msgspec.DecodeError:
            return 400, b'{"error": "not JSON"}', json
        if method == "POST" and path == "/_admin/notice" and isinstance(what, dict):
            self.notice(**what)
        elif method == "POST" and path == "/_admin/fault" and isinstance(what, dict):
            self.status = what.get("status")
            self.garbage = bool(what.get("garbage"))
        elif method == "POST" and path == "/_admin/revoke":
            self.revoke_tokens()
        elif method == "GET" and path == "/_admin/requests":
            return 200, msgspec.json.encode(self.requests), json
        else:
            return 404, b'{"error": "no such admin call"}', json
        return 200, b'{"ok": true}', json

    async def _serve(
        self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str], body: bytes
    ) -> tuple[int, bytes, bytes, dict[str, str]]:
        text = b"text/plain"
        if self.provider == "aws" and method == "PUT" and path == "/latest/api/token":
            ttl = headers.get("x-aws-ec2-metadata-token-ttl-seconds", "")
            if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                return 400, b"", text, {}
            token = secrets.token_urlsafe(24)
            self.tokens[token] = trio.current_time() + int(ttl)
            return 200, token.encode(), text, {}
        if self.status is not None:
            return self.status, b"unavailable", text, {}
        if self.garbage:
            return 200, GARBAGE, b"application/json", {}
        match self.provider:
            case "aws":
                return self._aws(method, path, headers)
            case "gcp":
                return await self._gcp(method, path, query, headers)
        if method == "POST" and self.approval_delay_s:
            await trio.sleep(self.approval_delay_s)
        return self._azure(method, path, query, headers, body)

    def _aws(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, bytes, bytes, dict[str, str]]:
        text = b"text/plain"
        token = headers.get("x-aws-ec2-metadata-token")
        if method != "GET" or token is None or self.tokens.get(token, -1.0) <= trio.current_time():
            return 401, b"", text, {}
        found: dict[str, Any] | str | None = {
            "/latest/meta-data/spot/instance-action": self.spot_action,
            "/latest/meta-data/autoscaling/target-lifecycle-state": self.lifecycle_state,
            "/latest/meta-data/events/recommendations/rebalance": self.rebalance,
        }.get(path)
        if found is None:
            return 404, b"Not Found", text, {}
        if isinstance(found, str):
            return 200, found.encode(), text, {}
        return 200, msgspec.json.encode(found), b"application/json", {}

    async def _gcp(
        self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str]
    ) -> tuple[int, bytes, bytes, dict[str, str]]:
        text = b"application/text"
        if headers.get("metadata-flavor") != "Google":
            return 403, b"Missing Metadata-Flavor:Google header.", text, {}
        key = path.removeprefix("/computeMetadata/v1/")
        if method != "GET" or key not in self.values:
            return 404, b"Not Found", text, {}
        if query.get("wait_for_change") == ["true"] and not self.ignore_wait:
            last = query.get("last_etag", [None])[0]
            limit = min(GCP_MAX_WAIT_S, float(query.get("timeout_sec", [GCP_MAX_WAIT_S])[0]))
            with trio.move_on_after(limit):
                while last is None or last == self._etag(key):
                    await self._changed.wait()
                    last = last or "changed"
        return 200, self.values[key].encode(), text, {"ETag": self._etag(key)}

    def _etag(self, key: str) -> str:
        return f"etag-{key.replace('/', '-')}-{self._versions[key]}"

    def _azure(
        self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str], body: bytes
    ) -> tuple[int, bytes, bytes, dict[str, str]]:
        json = b"application/json"
        if headers.get("metadata") != "true":
            return 400, b'{"error": "Bad request. Required metadata header not specified"}', json, {}
        if path == "/metadata/instance/compute/name" and query.get("format") == ["text"]:
            return 200, self.vm_name.encode(), b"text/plain", {}
        if path != "/metadata/scheduledevents":
            return 404, b'{"error": "Not found"}', json, {}
        if method == "POST":
            try:
                requests = msgspec.json.decode(body)["StartRequests"]
                self.approvals += [str(request["EventId"]) for request in requests]
                self.approved.set()
            except (msgspec.DecodeError, KeyError, TypeError):
                return 400, b'{"error": "Bad request"}', json, {}
            started = set(self.approvals)
            self.events = [event for event in self.events if event["EventId"] not in started]
            return 200, b"", json, {}
        document = {"DocumentIncarnation": self._incarnation, "Events": self.events}
        return 200, msgspec.json.encode(document), json, {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fake_controller.metadata",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n", 2)[2] if __doc__ else None,
    )
    parser.add_argument("--provider", choices=PROVIDERS, required=True, help="which cloud to pretend to be")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on [%(default)s]")
    parser.add_argument("--port", type=int, default=8081, help="port to listen on, 0 for any [%(default)s]")
    parser.add_argument("--vm-name", default="vm-123", help="the VM's name (Azure) [%(default)s]")
    parser.add_argument("--notice-after", type=float, metavar="SECONDS", help="give a notice this long after starting")
    parser.add_argument(
        "--notice-in", type=float, default=120.0, metavar="SECONDS", help="the notice's deadline [%(default)s]"
    )
    return parser


async def _main(args: argparse.Namespace) -> None:
    from fake_controller.server import serve

    metadata = FakeMetadata(args.provider, vm_name=args.vm_name)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(partial(serve, metadata, args.host, args.port))
        print(f"fake {args.provider} metadata service on {url}", flush=True)
        if args.notice_after is not None:
            await trio.sleep(args.notice_after)
            metadata.notice(
                action="terminate", preempted=True, event_type="Preempt", in_s=args.notice_in, resources=[args.vm_name]
            )
            print(f"gave a notice: the VM goes in {args.notice_in:g} s", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if serving_unavailable("fake metadata"):
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(_main, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
