"""The controller client: authentication, TLS verification with a private CA, no redirects, bounded answers.

Rules: TLS tests serve the fake controller over HTTPS (hypercorn, `trustme` certificates) on 127.0.0.1 port 0
with a hard timeout; the rest use `httpx.MockTransport`.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import httpx
import msgspec
import pytest
import trio
import trustme

from fake_controller import FakeController
from fake_controller.server import serve
from miglet import protocol
from miglet.controller import ControllerRejected, ControllerUnavailable, open_controller_client
from miglet.secret import Secret
from miglet.stamp import Stamper
from tests.agents import ConfigFactory

TIMEOUT = 15


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    directory = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    ca_file, cert_file, key_file = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    server.private_key_pem.write_to_path(str(key_file))
    return ca_file, cert_file, key_file


async def test_tls_with_a_private_ca(make_config: ConfigFactory, tls_files: tuple[Path, Path, Path]) -> None:
    ca_file, cert_file, key_file = tls_files
    controller = FakeController()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(partial(serve, controller, certfile=str(cert_file), keyfile=str(key_file)))
            assert url.startswith("https://")
            token = Secret("controller-bearer-token-1")
            trusted = make_config(controller_endpoint=url, ca_bundle=ca_file, controller_token=token)
            async with open_controller_client(trusted) as client:
                started = Stamper("vm-123", "pool-001", None).stamp(protocol.VmStarted())
                body = await client.post_event(started, read_answer=True)
                assert protocol.decode_acknowledgment(body).is_acknowledged
                await client.get_commands()
            async with open_controller_client(make_config(controller_endpoint=url)) as untrusting:
                with pytest.raises(ControllerUnavailable, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
                    await untrusting.get_commands()
            nursery.cancel_scope.cancel()
    assert all(r.headers["authorization"] == "Bearer controller-bearer-token-1" for r in controller.requests)
    assert len(controller.requests) == 2


async def test_redirects_are_not_followed(make_config: ConfigFactory) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(307, headers={"Location": "https://elsewhere.example/steal"})

    async with open_controller_client(make_config(), httpx.MockTransport(handler)) as client:
        # Retryable, so that an event owed is kept (and delivered once the endpoint is corrected), not dropped.
        with pytest.raises(ControllerUnavailable, match=r"HTTP 307 redirect to 'https://elsewhere\.example/steal'"):
            await client.get_commands()
    assert seen == ["http://controller.test/api/v1/vms/vm-123/commands"]


async def test_oversized_answers_are_refused_and_error_bodies_summarised(make_config: ConfigFactory) -> None:
    answers = iter(
        [
            httpx.Response(200, content=b"[" + b"1," * (1 << 20) + b"1]"),
            httpx.Response(500, content=b"x" * (1 << 21)),
        ]
    )

    async with open_controller_client(make_config(), httpx.MockTransport(lambda request: next(answers))) as client:
        with pytest.raises(protocol.ProtocolError, match="exceeds 1048576"):
            await client.get_commands()
        with pytest.raises(ControllerUnavailable) as caught:
            await client.get_commands()
    assert len(str(caught.value)) < 400


async def test_long_poll_asks_for_wait_and_allows_for_it(make_config: ConfigFactory) -> None:
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200, json={"commands": []})

    async with open_controller_client(make_config(), httpx.MockTransport(handler)) as client:
        await client.get_commands(wait=20)
        await client.get_commands(wait=0)
    assert requests[0].url.params["wait"] == "20"
    assert requests[0].extensions["timeout"]["read"] >= 30
    assert "wait" not in requests[1].url.params


async def test_an_undecodable_answer_is_retryable_not_fatal(make_config: ConfigFactory) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"not gzip at all", headers={"Content-Encoding": "gzip"})

    async with open_controller_client(make_config(), httpx.MockTransport(handler)) as client:
        with pytest.raises(ControllerUnavailable, match="DecodingError"):
            await client.get_commands()
        with pytest.raises(ControllerUnavailable, match="DecodingError"):
            await client.post_event(protocol.VmStarted(), read_answer=True)


@pytest.mark.parametrize("offset", [0, 100, 3000, 4090, 4096])
async def test_an_error_body_read_in_part_never_quotes_part_of_a_secret(
    make_config: ConfigFactory, offset: int
) -> None:
    jit = Secret("eyJ" + "Q" * 5000 + "=")
    body = b" " * offset + jit.reveal().encode() + b" and more"

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, content=body)

    async with open_controller_client(make_config(), httpx.MockTransport(handler)) as client:
        with pytest.raises(ControllerRejected) as caught:
            await client.get_commands()
    assert "QQQQQQQQQQQQ" not in str(caught.value)


async def test_an_unknown_command_type_is_masked_before_it_is_quoted() -> None:
    token = Secret("AHT\\BACKSLASH\\TOKEN01")
    body = msgspec.json.encode({"commands": [{"id": "c", "type": token.reveal()}]})
    [rejected] = protocol.decode_commands(body).rejected
    assert rejected.error == "unknown command type '***'"


@pytest.mark.parametrize(
    ("length", "refused"), [("9" * 5000, True), (" 0" + "0" * 5000 + "2 ", False), ("2.0", False), ("-5", False)]
)
async def test_any_content_length_header_is_judged_without_failing(
    make_config: ConfigFactory, length: str, refused: bool
) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Length": length}, stream=httpx.ByteStream(b"{}"))

    async with open_controller_client(make_config(), httpx.MockTransport(handler)) as client:
        if refused:
            with pytest.raises(protocol.ProtocolError, match="exceeds"):
                await client.get_commands()
        else:
            assert (await client.get_commands()).commands == []
