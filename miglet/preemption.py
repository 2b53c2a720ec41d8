"""Watching the cloud's metadata service for notices that it takes the VM back (MIGLET_PREEMPTION).

One watcher per cloud, each from the cloud's own documentation:

- **aws** (IMDSv2 only): a session token from `PUT /latest/api/token`, renewed before it expires and whenever it
  is refused; every POLL_S seconds `spot/instance-action` (404: no notice) and `autoscaling/target-lifecycle-state`
  (`Terminated`: the group removes the VM, with no deadline). A rebalance recommendation is logged, once.
- **gcp**: `instance/preempted` and `instance/maintenance-event`, each held open with `wait_for_change` and the
  last ETag; `TRUE` or `TERMINATE_ON_HOST_MAINTENANCE` gives GCP_NOTICE_S seconds.
- **azure**: Scheduled Events every POLL_S seconds, only those naming this VM; `Preempt` and `Terminate` have a
  deadline (`NotBefore`), `Reboot` and `Redeploy` stop the agent as a `shutdown` would. Once the runner has
  stopped, the event is approved, so that Azure need not wait out its deadline.

A notice is handed to the machine (`machine.PreemptionNoticed`), which decides what it means. A metadata service
that does not answer, or answers garbage, is logged at most once a minute and asked again: it never stops the
agent nor touches the runner. Requests never go through a proxy, follow no redirect, and are bounded in time and
size.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Final

import httpx
import msgspec
import trio
from trio_util import AsyncValue

from miglet import protocol
from miglet.secret import redact

log = logging.getLogger(__name__)

POLL_S: Final = 2.0
# AWS: how long a session token is asked for, and how long before its end it is renewed.
AWS_TOKEN_TTL_S: Final = 21600
AWS_TOKEN_RENEW_S: Final = 60.0
# GCP: how long a request may be held waiting for a change (the server's own bound is longer).
GCP_WAIT_S: Final = 60
GCP_NOTICE_S: Final = 30.0
REQUEST_DEADLINE_S: Final = 5.0
MAX_ANSWER_BYTES: Final = 64 * 1024
COMPLAIN_EVERY_S: Final = 60.0
# A notice's deadline is minutes away: one further than this from now is garbage.
PLAUSIBLE: Final = timedelta(days=1)
# A GCP value is asked for at most this often, whatever the server does with wait_for_change.
GCP_MIN_INTERVAL_S: Final = 1.0
QUOTED_CHARS: Final = 200

AZURE_API: Final = {"api-version": "2020-07-01"}
MAX_EVENT_ID: Final = 128
# Scheduled events approved at most (a service inventing new ones on every look gets no more).
MAX_APPROVALS: Final = 8
AZURE_STOPS: Final = frozenset({"Reboot", "Redeploy"})
AZURE_DEADLINES: Final = frozenset({"Preempt", "Terminate"})
AWS_SPOT_ACTIONS: Final = frozenset({"terminate", "stop", "hibernate"})
GCP_TERMINATING_MAINTENANCE: Final = "TERMINATE_ON_HOST_MAINTENANCE"


class Notice(msgspec.Struct, frozen=True, kw_only=True):
    """What the cloud said: `deadline` None when it gave no time; `as_stop`: stop as a `shutdown` would."""

    provider: protocol.Provider
    action: str
    deadline: datetime | None
    as_stop: bool = False


# Told of each notice as it is seen (the same notice may be told again; the machine reports it once).
NoticeSink = Callable[[Notice], object]
# Returns once the runner has stopped (Azure's events are then approved).
RunnerStopped = Callable[[], Awaitable[None]]


class MetadataUnavailable(Exception):
    """The metadata service did not answer, or answered something unusable."""


class _Answer(msgspec.Struct, frozen=True):
    status: int
    body: bytes
    etag: str | None


class MetadataClient:
    """Bounded requests to one metadata service: no proxy, no redirect, a deadline, a size cap."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self._http = http

    async def request(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        content: bytes | None = None,
        deadline: float = REQUEST_DEADLINE_S,
    ) -> _Answer:
        what = f"{method} {path}"
        answer: _Answer | None = None
        with trio.move_on_after(deadline):
            answer = await self._exchange(method, path, headers, params, content, what)
        if answer is None:
            raise MetadataUnavailable(f"{what}: no answer within {deadline:g} s")
        return answer

    async def _exchange(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None,
        params: dict[str, str] | None,
        content: bytes | None,
        what: str,
    ) -> _Answer:
        try:
            request = self._http.build_request(method, path, headers=headers, params=params, content=content)
            response = await self._http.send(request, stream=True)
            try:
                body = b""
                encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
                if encoding not in ("", "identity"):
                    # Asked for identity: a compressed answer could grow far past the cap before it is counted.
                    raise MetadataUnavailable(f"{what}: answer sent with Content-Encoding {encoding[:40]!r}")
                async for chunk in response.aiter_raw():
                    body += chunk
                    if len(body) > MAX_ANSWER_BYTES:
                        raise MetadataUnavailable(f"{what}: answer larger than {MAX_ANSWER_BYTES} bytes")
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                    await response.aclose()
        except httpx.HTTPError as exc:
            raise MetadataUnavailable(f"{what}: {type(exc).__name__}: {redact(str(exc))[:QUOTED_CHARS]}") from None
        return _Answer(response.status_code, body, response.headers.get("ETag"))


def open_metadata_client(base_url: str, transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url,
        trust_env=False,  # a proxy must never see, or answer for, the VM's own metadata
        follow_redirects=False,
        timeout=httpx.Timeout(GCP_WAIT_S + 15.0, connect=2.0),
        headers={"User-Agent": "miglet", "Accept-Encoding": "identity"},
        limits=httpx.Limits(max_connections=4, max_keepalive_connections=4),
        transport=transport,
    )


class _Complaints:
    """Logs what went wrong at most once a minute per watcher."""

    def __init__(self, provider: str) -> None:
        self._provider = provider
        self._last = -float("inf")
        self._quiet = 0

    def complain(self, error: str) -> None:
        now = trio.current_time()
        if now - self._last < COMPLAIN_EVERY_S:
            self._quiet += 1
            return
        log.warning(
            "Cannot read the metadata service; will retry",
            extra={"provider": self._provider, "error": error, "failures_not_logged": self._quiet},
        )
        self._last = now
        self._quiet = 0


def _problem(what: str, answer: _Answer) -> MetadataUnavailable:
    text = redact(answer.body[:QUOTED_CHARS].decode("utf-8", "replace")).strip()
    return MetadataUnavailable(f"{what}: HTTP {answer.status}" + (f": {text!r}" if text else ""))


def _utc(text: str) -> datetime:
    """An RFC 3339 time with its offset, within a day of now; raises MetadataUnavailable."""
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise MetadataUnavailable(f"unusable time {text[:QUOTED_CHARS]!r}") from None
    if when.tzinfo is None:
        raise MetadataUnavailable(f"no offset in the time {text[:QUOTED_CHARS]!r}")
    return _plausible(when, text)


def _plausible(when: datetime, text: str) -> datetime:
    """`when` in UTC, if it is within a day of now (a notice's deadline is minutes away); else unusable."""
    now = datetime.now(UTC)
    try:
        utc = when.astimezone(UTC)
        plausible = now - PLAUSIBLE <= utc <= now + PLAUSIBLE
    except (OverflowError, ArithmeticError, ValueError):  # a year 1 or 9999 moved across midnight
        plausible = False
    if not plausible:
        raise MetadataUnavailable(f"the time {text[:QUOTED_CHARS]!r} is not within a day of now")
    return utc


# --- AWS -------------------------------------------------------------------------------------------------------


class _SpotAction(msgspec.Struct, frozen=True):
    action: str
    time: str


def _spot_notice(body: bytes) -> Notice:
    try:
        action = msgspec.json.decode(body, type=_SpotAction)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise MetadataUnavailable(f"spot/instance-action: unusable notice: {str(exc)[:QUOTED_CHARS]}") from None
    deadline = _utc(action.time)
    if action.action not in AWS_SPOT_ACTIONS:
        raise MetadataUnavailable(f"spot/instance-action: unknown action {action.action[:QUOTED_CHARS]!r}")
    return Notice(provider="aws", action=action.action, deadline=deadline)


class AwsWatcher:
    def __init__(
        self, client: MetadataClient, notify: NoticeSink, *, poll_s: float = POLL_S, token_ttl_s: int = AWS_TOKEN_TTL_S
    ) -> None:
        self._client = client
        self._notify = notify
        self._poll_s = poll_s
        self._ttl = token_ttl_s
        self._token: str | None = None
        self._renew_at = 0.0
        self._rebalance_logged = False
        self._complaints = _Complaints("aws")

    async def run(self) -> None:
        while True:
            try:
                await self._look()
            except MetadataUnavailable as exc:
                self._complaints.complain(str(exc))
            await trio.sleep(self._poll_s)

    async def _look(self) -> None:
        spot = await self._get("/latest/meta-data/spot/instance-action")
        if spot.status == 200:
            self._notify(_spot_notice(spot.body))
        elif spot.status != 404:
            raise _problem("spot/instance-action", spot)
        lifecycle = await self._get("/latest/meta-data/autoscaling/target-lifecycle-state")
        if lifecycle.status == 200 and lifecycle.body.strip() == b"Terminated":
            self._notify(Notice(provider="aws", action="autoscaling-terminated", deadline=None, as_stop=True))
        elif lifecycle.status not in (200, 404):
            raise _problem("autoscaling/target-lifecycle-state", lifecycle)
        rebalance = await self._get("/latest/meta-data/events/recommendations/rebalance")
        if rebalance.status == 200 and not self._rebalance_logged:
            # Only a recommendation: nothing changes, but whoever reads the log learns the VM is at risk.
            self._rebalance_logged = True
            log.warning("AWS recommends rebalancing this instance away; it may be taken back soon")

    async def _get(self, path: str) -> _Answer:
        for _ in range(2):
            token = await self._session_token()
            answer = await self._client.request("GET", path, headers={"X-aws-ec2-metadata-token": token})
            if answer.status != 401:
                return answer
            self._token = None  # expired or revoked: a new one, then once more
        raise _problem(path, answer)

    async def _session_token(self) -> str:
        if self._token is None or trio.current_time() >= self._renew_at:
            answer = await self._client.request(
                "PUT", "/latest/api/token", headers={"X-aws-ec2-metadata-token-ttl-seconds": str(self._ttl)}
            )
            token = answer.body.decode("ascii", "replace").strip()
            if answer.status != 200 or not token or len(token) > 512 or not token.isprintable():
                raise _problem("PUT /latest/api/token", answer)
            self._token = token
            self._renew_at = trio.current_time() + max(1.0, self._ttl - AWS_TOKEN_RENEW_S)
        return self._token


# --- GCP -------------------------------------------------------------------------------------------------------


class GcpWatcher:
    def __init__(self, client: MetadataClient, notify: NoticeSink) -> None:
        self._client = client
        self._notify = notify
        self._complaints = _Complaints("gcp")

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch, "instance/preempted", b"TRUE", "preempted")
            nursery.start_soon(self._watch, "instance/maintenance-event", GCP_TERMINATING_MAINTENANCE.encode(), None)

    async def _watch(self, key: str, alarming: bytes, action: str | None) -> None:
        path = f"/computeMetadata/v1/{key}"
        etag: str | None = None
        alarmed = False
        while True:
            started = trio.current_time()
            params = {"wait_for_change": "true", "timeout_sec": str(GCP_WAIT_S)}
            if etag is not None:
                params["last_etag"] = etag
            try:
                answer = await self._client.request(
                    "GET",
                    path,
                    headers={"Metadata-Flavor": "Google"},
                    # The first look answers at once (no ETag to wait on): a notice already given is not missed.
                    params=params if etag is not None else None,
                    deadline=GCP_WAIT_S + 10.0 if etag is not None else REQUEST_DEADLINE_S,
                )
                if answer.status != 200:
                    raise _problem(key, answer)
            except MetadataUnavailable as exc:
                self._complaints.complain(str(exc))
                etag = None
                await trio.sleep(POLL_S)
                continue
            value = answer.body.strip()
            if value == alarming and not alarmed:
                deadline = datetime.now(UTC) + timedelta(seconds=GCP_NOTICE_S)
                self._notify(Notice(provider="gcp", action=action or value.decode(), deadline=deadline))
            alarmed = value == alarming
            if answer.etag is None or len(answer.etag) > 256:
                # Without an ETag there is nothing to wait on: a plain poll instead.
                await trio.sleep(POLL_S)
            else:
                # A server that answers at once, whatever wait_for_change says, is not asked in a tight loop.
                await trio.sleep_until(started + GCP_MIN_INTERVAL_S)
            etag = None if answer.etag is None or len(answer.etag) > 256 else answer.etag


# --- Azure -----------------------------------------------------------------------------------------------------


class _AzureEvent(msgspec.Struct, frozen=True, rename="pascal"):
    event_id: str
    event_type: str
    resources: list[str] = []
    not_before: str = ""


class _ScheduledEvents(msgspec.Struct, frozen=True, rename="pascal"):
    events: list[_AzureEvent] = []


class AzureWatcher:
    def __init__(
        self,
        client: MetadataClient,
        notify: NoticeSink,
        runner_stopped: RunnerStopped,
        *,
        poll_s: float = POLL_S,
        approving: AsyncValue[int] | None = None,
    ) -> None:
        self._client = client
        self._notify = notify
        self._runner_stopped = runner_stopped
        # How many approvals are owed and not yet given: the agent lets them finish before it exits.
        self.approving = approving or AsyncValue(0)
        self._poll_s = poll_s
        self._name: str | None = None
        self._approving: set[str] = set()  # at most MAX_APPROVALS
        self._complaints = _Complaints("azure")

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    for event, deadline in await self._look():
                        action = event.event_type
                        as_stop = action in AZURE_STOPS
                        self._notify(Notice(provider="azure", action=action, deadline=deadline, as_stop=as_stop))
                        if event.event_id not in self._approving and len(self._approving) < MAX_APPROVALS:
                            self._approving.add(event.event_id)
                            self.approving.value += 1
                            nursery.start_soon(self._approve, event.event_id)
                except MetadataUnavailable as exc:
                    self._complaints.complain(str(exc))
                await trio.sleep(self._poll_s)

    async def _look(self) -> list[tuple[_AzureEvent, datetime | None]]:
        headers = {"Metadata": "true"}
        if self._name is None:
            answer = await self._client.request(
                "GET",
                "/metadata/instance/compute/name",
                headers=headers,
                params={"api-version": "2021-02-01", "format": "text"},
            )
            name = answer.body.decode("utf-8", "replace").strip()
            if answer.status != 200 or not name or len(name) > 256:
                raise _problem("instance/compute/name", answer)
            self._name = name
        answer = await self._client.request("GET", "/metadata/scheduledevents", headers=headers, params=AZURE_API)
        if answer.status != 200:
            raise _problem("scheduledevents", answer)
        try:
            document = msgspec.json.decode(answer.body, type=_ScheduledEvents)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise MetadataUnavailable(f"scheduledevents: unusable answer: {exc}") from None
        found: list[tuple[_AzureEvent, datetime | None]] = []
        for event in document.events:
            if self._name not in event.resources or event.event_type not in AZURE_DEADLINES | AZURE_STOPS:
                continue
            if not 0 < len(event.event_id) <= MAX_EVENT_ID or not event.event_id.isprintable():
                raise MetadataUnavailable(f"scheduledevents: unusable EventId {event.event_id[:QUOTED_CHARS]!r}")
            found.append((event, _not_before(event.not_before)))
        return found

    async def _approve(self, event_id: str) -> None:
        """Once the runner has stopped, tell Azure it may go ahead (tried a few times; Azure goes ahead anyway
        at its deadline)."""
        try:
            await self._approve_once_stopped(event_id)
        finally:
            self.approving.value -= 1

    async def _approve_once_stopped(self, event_id: str) -> None:
        await self._runner_stopped()
        body = msgspec.json.encode({"StartRequests": [{"EventId": event_id}]})
        for attempt in range(5):
            try:
                answer = await self._client.request(
                    "POST",
                    "/metadata/scheduledevents",
                    headers={"Metadata": "true", "Content-Type": "application/json"},
                    params=AZURE_API,
                    content=body,
                )
                if 200 <= answer.status < 300:
                    log.info("Approved the scheduled event", extra={"event_id": event_id})
                    return
                raise _problem("approving a scheduled event", answer)
            except MetadataUnavailable as exc:
                self._complaints.complain(str(exc))
            await trio.sleep(min(2**attempt, 10))


def _not_before(text: str) -> datetime:
    """Azure's `NotBefore` (RFC 1123); empty once the event has started: now."""
    if not text.strip():
        return datetime.now(UTC)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        raise MetadataUnavailable(f"scheduledevents: unusable NotBefore {text[:QUOTED_CHARS]!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return _plausible(when, text)


async def watch(
    provider: protocol.Provider,
    client: MetadataClient,
    notify: NoticeSink,
    runner_stopped: RunnerStopped,
    approving: AsyncValue[int] | None = None,
) -> None:
    """Watch `provider`'s metadata service until cancelled."""
    match provider:
        case "aws":
            await AwsWatcher(client, notify).run()
        case "gcp":
            await GcpWatcher(client, notify).run()
        case "azure":
            await AzureWatcher(client, notify, runner_stopped, approving=approving).run()
