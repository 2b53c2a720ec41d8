"""The controller's HTTP API: one request per call, failures sorted into retryable and final.

Retrying is the caller's business (each task knows whether to keep trying); this module only makes the request,
bounds it in time (one deadline for the whole exchange, so that a controller trickling its answer cannot hold a
task) and in size, re-reads a rotated controller token when the controller refuses the one it has, and says what
went wrong in words that name no secret.
"""

from __future__ import annotations

import functools
import logging
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from typing import Final, cast
from urllib.parse import quote

import httpx
import trio

from miglet import __version__, protocol
from miglet.config import Config
from miglet.retry import is_retryable_status, parse_retry_after
from miglet.secret import Secret, redact, redact_partial

log = logging.getLogger(__name__)

MAX_BODY_BYTES: Final = 1 << 20
ERROR_BODY_BYTES: Final = 4096
# How much of an error answer, or of a redirect's target, is quoted in a log line or an error.
QUOTED_CHARS: Final = 200
CONNECT_TIMEOUT: Final = 5.0
READ_TIMEOUT: Final = 10.0
# Every request, from connecting to the last byte of the answer, must be over within this.
REQUEST_DEADLINE: Final = 20.0
# A long poll may be held for `wait` seconds; its deadline (and read timeout) allows that plus this margin.
LONG_POLL_MARGIN: Final = 10.0
# Releasing a connection after an answer.
CLOSE_TIMEOUT: Final = 1.0
# Answers that mean "these credentials are not accepted": the token file is read again, in case it was rotated.
_AUTH_REFUSED: Final = frozenset({401, 403})

# Reads the controller token anew (from MIGLET_CONTROLLER_TOKEN_FILE); None when it cannot be had.
TokenSource = Callable[[], Secret | None]


class ControllerError(Exception):
    """A controller call that did not succeed."""

    # How long the controller asked to be left alone (`Retry-After`), when it did.
    retry_after: float | None = None


class ControllerUnavailable(ControllerError):
    """Worth trying again: a network failure, a timeout, 408, 429 or 5xx."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def retry_after_of(exc: Exception) -> float | None:
    """The wait the controller asked for with a failed call, if any (an unusable answer asks for none)."""
    return exc.retry_after if isinstance(exc, ControllerError) else None


class ControllerRejected(ControllerError):
    """The controller refused the request (4xx other than 408/429); the same request will fail again."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class ControllerClient:
    """Calls the controller's two endpoints for one VM."""

    def __init__(self, http: httpx.AsyncClient, vm_id: str, token_source: TokenSource | None = None) -> None:
        self._http = http
        self._token_source = token_source
        base = f"/api/v1/vms/{quote(vm_id, safe='')}"
        self._events_path = f"{base}/events"
        self._commands_path = f"{base}/commands"

    async def post_event(self, event: protocol.AnyEvent, *, read_answer: bool = False) -> bytes:
        """POST one event; any 2xx means delivered. Returns the answer's body when asked to read it."""
        return await self._request(
            "POST",
            self._events_path,
            content=protocol.encode_event(event),
            headers={"Content-Type": "application/json"},
            read_body=read_answer,
        )

    async def get_commands(self, wait: int = 0) -> protocol.CommandBatch:
        """GET the pending commands, asking the controller to hold the request up to `wait` seconds."""
        params = {"wait": str(wait)} if wait > 0 else None
        timeout = httpx.Timeout(READ_TIMEOUT + wait, connect=CONNECT_TIMEOUT)
        body = await self._request(
            "GET",
            self._commands_path,
            params=params,
            http_timeout=timeout,
            deadline=max(REQUEST_DEADLINE, wait + LONG_POLL_MARGIN),
        )
        return protocol.decode_commands(body)

    async def _request(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        http_timeout: httpx.Timeout | None = None,
        read_body: bool = True,
        deadline: float = REQUEST_DEADLINE,
    ) -> bytes:
        what = f"{method} {path}"
        extensions = {"timeout": http_timeout.as_dict()} if http_timeout is not None else None
        request = self._http.build_request(
            method, path, content=content, headers=headers, params=params, extensions=extensions
        )
        answer: tuple[httpx.Response, bytes] | None = None
        with trio.move_on_after(deadline):
            answer = await self._exchange(request, what, read_body)
        if answer is None:
            log.warning("Controller request cut short by its deadline", extra={"request": what, "deadline_s": deadline})
            raise ControllerUnavailable(f"{what}: no complete answer within {deadline:g} s")
        response, body = answer
        status = response.status_code
        if 200 <= status < 300:
            return body
        summary = _summarise(body)
        if 300 <= status < 400:
            # Most likely a wrong MIGLET_CONTROLLER_ENDPOINT (http:// answered with a redirect to https://): the
            # events stay queued and are retried, so that they are delivered once the endpoint is put right.
            location = redact(response.headers.get("Location", ""))[:QUOTED_CHARS]
            raise ControllerUnavailable(
                f"{what}: HTTP {status} redirect to {location!r}, which MIGlet does not follow;"
                " check MIGLET_CONTROLLER_ENDPOINT"
            )
        if is_retryable_status(status):
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            raise ControllerUnavailable(f"{what}: HTTP {status}{summary}", retry_after)
        if status in _AUTH_REFUSED:
            self._reread_token()
        raise ControllerRejected(f"{what}: HTTP {status}{summary}", status)

    async def _exchange(self, request: httpx.Request, what: str, read_body: bool) -> tuple[httpx.Response, bytes]:
        """Send `request` and read as much of the answer as is needed; transport failures become retryable."""
        try:
            response = await self._http.send(request, stream=True)
            try:
                if not 200 <= response.status_code < 300:
                    body = await _read_prefix(response, ERROR_BODY_BYTES)
                elif read_body:
                    body = await _read_capped(response, what)
                else:
                    body = b""  # a 2xx answer to an event is all that counts
            finally:
                # Shielded (and bounded): the connection is released (or closed, for an answer read in part) even
                # when the deadline has just passed.
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                    await response.aclose()
        except httpx.TimeoutException as exc:
            raise ControllerUnavailable(f"{what}: timed out ({type(exc).__name__})") from None
        except httpx.HTTPError as exc:
            # Transport failures, and answers httpx cannot decode (a body that claims gzip but is not).
            raise ControllerUnavailable(f"{what}: {type(exc).__name__}: {_describe(exc)}") from None
        return response, body

    def _reread_token(self) -> None:
        """The controller refused our credentials: take the token file's current token, if it has a new one."""
        if self._token_source is None:
            return
        token = self._token_source()
        if token is None:
            return
        header = f"Bearer {token.reveal()}"
        if self._http.headers.get("Authorization") != header:
            self._http.headers["Authorization"] = header
            log.info("The controller refused the token; using the new one from MIGLET_CONTROLLER_TOKEN_FILE")


def _describe(exc: BaseException) -> str:
    """The most specific message in an exception's chain (httpx often wraps a TLS or socket error silently)."""
    messages: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if str(current):
            messages.append(str(current))
        current = current.__cause__ or current.__context__
    return messages[-1] if messages else "connection failed"


def _declares_too_much(content_length: str | None) -> bool:
    """Whether a Content-Length header announces more than MAX_BODY_BYTES (any text is accepted)."""
    if content_length is None:
        return False
    value = content_length.strip()
    if not (value.isascii() and value.isdigit()):
        return False  # not a length: the transport decides what to make of it
    # Compared as text first: int() refuses numbers of more than a few thousand digits (leading zeros included).
    digits = value.lstrip("0") or "0"
    return len(digits) > len(str(MAX_BODY_BYTES)) or int(digits) > MAX_BODY_BYTES


async def _read_capped(response: httpx.Response, what: str) -> bytes:
    if _declares_too_much(response.headers.get("Content-Length")):
        raise protocol.ProtocolError(f"{what}: response body exceeds {MAX_BODY_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    # Read to the end (not only to the length announced), so that the connection is released for the next request.
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise protocol.ProtocolError(f"{what}: response body exceeds {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_prefix(response: httpx.Response, limit: int) -> bytes:
    """The body's first `limit` bytes, and one more when there are more: enough to say what an error answer was
    about, and whether it was cut."""
    prefix = b""
    async with aclosing(cast(AsyncGenerator[bytes, None], response.aiter_bytes())) as chunks:
        async for chunk in chunks:
            prefix += chunk
            if len(prefix) > limit:
                break
    return prefix[: limit + 1]


def _summarise(body: bytes) -> str:
    # Masked before it is cut (a secret across the cut would leak its first part) and before repr() (escaping
    # could hide a secret from the log formatter's masking). Of a body read only in part, what may be the start
    # of a secret cut off at its end is left out.
    text = body[:ERROR_BODY_BYTES].decode("utf-8", "replace")
    masked = redact_partial(text)[0] if len(body) > ERROR_BODY_BYTES else redact(text)
    text = masked.strip()[:QUOTED_CHARS]
    return f": {text!r}" if text else ""


@asynccontextmanager
async def open_controller_client(
    config: Config, transport: httpx.AsyncBaseTransport | None = None, token_source: TokenSource | None = None
) -> AsyncIterator[ControllerClient]:
    """An HTTP client for the controller: authenticated, verified TLS, no redirects, bounded timeouts.

    `token_source` re-reads the controller token when the controller answers 401 or 403.
    """
    # identity: a compressed answer could grow far past the size cap within a single chunk before it is counted.
    headers = {"User-Agent": f"miglet/{__version__}", "Accept": "application/json", "Accept-Encoding": "identity"}
    if config.controller_token is not None:
        headers["Authorization"] = f"Bearer {config.controller_token.reveal()}"
    if config.controller_endpoint.startswith("https://"):
        verify = _tls_context(str(config.ca_bundle) if config.ca_bundle is not None else None)
    else:
        # Plain http:// (loopback, or explicitly allowed) never does TLS: verification stays on, trusting
        # no one, rather than loading a trust store (tens of milliseconds) for nothing.
        verify = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    async with httpx.AsyncClient(
        base_url=config.controller_endpoint,
        headers=headers,
        verify=verify,
        follow_redirects=False,
        timeout=httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT),
        limits=httpx.Limits(max_connections=4, max_keepalive_connections=2),
        transport=transport,
    ) as http:
        yield ControllerClient(http, config.vm_id, token_source)


@functools.cache
def _tls_context(cafile: str | None) -> ssl.SSLContext:
    """The system's trust store (where operators install their CAs), or only the configured bundle.

    Built once per process and shared: loading a trust store costs milliseconds and memory, and one process
    may run many agents.
    """
    return ssl.create_default_context(cafile=cafile)
