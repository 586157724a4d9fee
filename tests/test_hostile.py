"""Hostile input is refused cleanly: no token in any log, no 1011, no 500, nothing unbounded.

Issue 13 items 1 (malformed requests log tokens), 7 (input that parses but cannot be
written again; hostile JWT headers and time claims), 8 (/api/publish answered 202
for what is then dead-lettered) and 9 (``notifyd.dead`` bounded).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import aiormq
import pytest

from notifyd.amqp import Delivery, decode_notification
from notifyd.auth import TokenVerifier, decode_identity
from notifyd.config import AuthSettings
from notifyd.devbroker import RabbitNode
from notifyd.errors import AuthError, InvalidMessage, ProtocolError
from notifyd.protocol import IdGenerator, parse_client_message
from notifyd.publisher import Publisher

from .conftest import (
    SECRET,
    SERVICE_KEY,
    AmqpPublisher,
    Server,
    ServerFactory,
    ServerProcess,
    amqp_publisher,
    expect_close,
    new_user,
    receive_json,
    receive_until,
    token,
)


def nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def signed(header: dict[str, Any] | str, payload: str, secret: str = SECRET) -> str:
    """An HS256 token with a header and payload as given (PyJWT refuses to make some)."""
    header_text = header if isinstance(header, str) else json.dumps(header)
    signing_input = f"{_b64(header_text.encode())}.{_b64(payload.encode())}"
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def counter_total(server: Server, name: str) -> float:
    """A counter's total over all its labels in ``server``'s registry (0 if none)."""
    return sum(
        sample.value
        for metric in server.metrics.registry.collect()
        for sample in metric.samples
        if sample.name == f"{name}_total"
    )


# --- item 1: malformed requests never log a token ----------------------------------------


def malformed_requests(tok: str) -> dict[str, bytes]:
    """Requests aiohttp cannot parse, each carrying ``tok`` where a client would put it."""
    requests = {
        "space in the query": f"GET /ws?token={tok} x HTTP/1.1\r\nHost: x\r\n\r\n",
        "control byte in the query": f"GET /ws?token={tok}\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
        "LF-only line endings": (
            f"GET /ws?token={tok} HTTP/1.1\nHost: x\nAuthorization: Bearer {tok}\n\n"
        ),
        "HTTP/1.l": f"GET /ws?token={tok} HTTP/1.l\r\nHost: x\r\n\r\n",
        "NUL after the bearer token": (
            f"GET /ws HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\x00\r\n\r\n"
        ),
        "over-long request line": (
            f"GET /ws?token={tok}&pad={'a' * 9000} HTTP/1.1\r\nHost: x\r\n\r\n"
        ),
        "over-long header": (
            f"GET /ws HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}{'a' * 9000}\r\n\r\n"
        ),
        "header without a colon": f"GET /ws HTTP/1.1\r\nHost: x\r\nBearer {tok}\r\n\r\n",
        "bad method": f"G(T /ws?token={tok} HTTP/1.1\r\nHost: x\r\n\r\n",
        "bad Content-Length": (
            f"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: {tok}\r\n\r\n"
        ),
        "bad chunk size": (
            "POST /api/publish HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            f"Authorization: Bearer {SERVICE_KEY}\r\n\r\n{tok}\r\n"
        ),
    }
    return {name: text.encode("latin-1") for name, text in requests.items()}


def secret_parts(tok: str, user: str) -> list[str]:
    """What must not be logged: the token, its claims (encoded and the user id), its signature."""
    _, claims, signature = tok.split(".")
    return [tok, claims, claims[:24], signature, user]


async def send_raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(4096), 5)
    finally:
        writer.close()


@pytest.mark.parametrize("query_token", [False, True], ids=["query_token off", "query_token on"])
async def test_malformed_requests_never_log_a_token(
    make_server: ServerFactory, caplog: pytest.LogCaptureFixture, query_token: bool
) -> None:
    caplog.set_level(logging.DEBUG)
    server = await make_server(auth={"query_token": query_token})
    user = new_user("secret")
    tok = token(user)
    requests = malformed_requests(tok)
    assert counter_total(server, "notifyd_malformed_requests") == 0
    repeats = 3
    for _ in range(repeats):
        for name, data in requests.items():
            response = await send_raw(server.port, data)
            assert response.startswith(b"HTTP/1.") and b" 400 " in response[:20], (name, response)
    # A client offering its token as a subprotocol: a valid request that aiohttp logs.
    with contextlib.suppress(aiohttp.ClientError):
        ws = await server.http.ws_connect(server.ws_url, protocols=(tok,))
        await ws.close()
    await asyncio.sleep(0.2)

    logged = caplog.text + "".join(
        f"{r.getMessage()}{r.exc_text or ''}{r.args!r}" for r in caplog.records
    )
    for part in secret_parts(tok, user):
        assert part not in logged
    # Every malformed request is counted, whatever the log level (a bad method is
    # DEBUG in aiohttp); each kind is logged at most once.
    assert counter_total(server, "notifyd_malformed_requests") == repeats * len(requests)
    lines = [r.getMessage() for r in caplog.records if "malformed HTTP request" in r.getMessage()]
    assert len(lines) == len(set(lines)) <= len(requests)
    assert not [r for r in caplog.records if r.name == "aiohttp.server" and r.exc_info]


class DebugServerProcess(ServerProcess):
    """``notifyd --log-level debug serve``: everything aiohttp logs reaches stderr."""

    def start(self, log_dir: Path) -> DebugServerProcess:
        self.log_path = log_dir / f"notifyd-{self.port}-{uuid.uuid4().hex[:4]}.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "notifyd", "--log-level", "debug", "serve"],
            env=self.env,
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
        )
        return self


async def test_malformed_requests_never_log_a_token_from_notifyd_serve(
    amqp_url: str, tmp_path: Path
) -> None:
    process = DebugServerProcess(amqp_url, NOTIFYD_AUTH_QUERY_TOKEN="true").start(tmp_path)
    try:
        await process.wait()
        user = new_user("secret")
        tok = token(user)
        for data in malformed_requests(tok).values():
            assert b" 400 " in (await send_raw(process.port, data))[:20]
        async with (
            aiohttp.ClientSession() as http,
            http.get(process.base + "/metrics") as response,
        ):
            text = await response.text()
        assert "notifyd_malformed_requests_total{" in text
        assert process.stop()[0] == 0
    finally:
        process.kill()
    log = process.log()
    assert "malformed HTTP request" in log
    for part in secret_parts(tok, user):
        assert part not in log


# --- item 7: data that parses but cannot be written again ---------------------------------


def test_client_data_nested_too_deep_is_an_error_with_a_code() -> None:
    for kind in ("publish", "send"):
        text = (
            f'{{"type":"{kind}","channel":"topic:t","event":"e","ref":7,"data":{deep_json(300)}}}'
        )
        with pytest.raises(ProtocolError) as refused:
            parse_client_message(text)
        assert (refused.value.code, refused.value.ref) == ("too_deep", 7)
    # As deep as notifyd can write is fine.
    ok = parse_client_message(f'{{"type":"send","event":"e","data":{deep_json(200)}}}')
    assert ok.data == nested(200)  # type: ignore[union-attr]


def test_amqp_data_nested_too_deep_is_invalid() -> None:
    body = f'{{"data":{deep_json(1000)}}}'.encode()
    with pytest.raises(InvalidMessage) as refused:
        decode_notification(
            # A published time out of range: ignored, not fatal.
            Delivery("user.42", body, headers={"notifyd-published-ms": 10**30}),
            ids=IdGenerator(),
            max_body_size=1 << 20,
            now=time.time(),
        )
    assert refused.value.reason == "too_deep"


async def test_deep_data_from_a_client_is_an_error_and_the_socket_stays(server: Server) -> None:
    ws, _ = await server.connect(new_user(), publish=["room"])
    for message in (
        f'{{"type":"publish","channel":"topic:room","ref":1,"data":{deep_json(600)}}}',
        f'{{"type":"send","event":"e","ref":2,"data":{deep_json(1000)}}}',
    ):
        await ws.send_str(message)
        refused = await receive_json(ws)
        assert (refused["type"], refused["code"]) == ("error", "too_deep"), refused
    await ws.send_json({"type": "ping"})
    assert await receive_json(ws) == {"type": "pong"}


async def publish_http(server: Server, body: bytes) -> tuple[int, dict[str, Any]]:
    async with server.http.post(
        server.base + "/api/publish",
        data=body,
        headers={"Authorization": f"Bearer {SERVICE_KEY}", "Content-Type": "application/json"},
    ) as response:
        return response.status, await response.json()


async def test_deep_data_on_api_publish_is_400(server: Server) -> None:
    body = f'{{"channel":"user:{new_user()}","data":{deep_json(1000)}}}'.encode()
    status, answer = await publish_http(server, body)
    assert (status, answer["error"]) == (400, "too_deep")


async def test_deep_amqp_data_is_dead_lettered_and_logged_once(
    server: Server, amqp: AmqpPublisher, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    user = new_user()
    ws, _ = await server.connect(user)
    deep = f'{{"data":{deep_json(500)}}}'.encode()
    await send_then_settle(amqp, ws, user, [deep])
    assert [r for r in caplog.records if "(too_deep)" in r.getMessage()]
    caplog.clear()
    await send_then_settle(amqp, ws, user, [deep] * 5)
    assert await dead_reasons(amqp.connection, user) == ["too_deep"] * 6
    # Counted, not logged again within the minute, and never with a traceback.
    assert not [r for r in caplog.records if "too_deep" in r.getMessage() or r.exc_info]


async def send_then_settle(
    amqp: AmqpPublisher, ws: aiohttp.ClientWebSocketResponse, user: str, bodies: list[bytes]
) -> None:
    """Publish ``bodies``, then a good message: once it arrives, notifyd has handled
    them all (one consumer, in order), and its dead-letter publishes are under way."""
    for body in bodies:
        await amqp.send(f"user.{user}", body)
    marker = uuid.uuid4().hex
    await amqp.send(f"user.{user}", {"data": marker})
    assert (await receive_until(ws, "notification"))["data"] == marker
    await asyncio.sleep(0.3)


async def dead_reasons(connection: Any, user: str) -> list[str]:
    """The reasons of the dead letters for ``user`` in notifyd.dead (taken out of it)."""
    channel = await connection.channel()
    queue = await channel.declare_queue("notifyd.dead", passive=True)
    reasons, others = [], []
    while (message := await queue.get(fail=False)) is not None:
        if message.headers.get("notifyd-routing-key") == f"user.{user}":
            reasons.append(message.headers["notifyd-reason"])
            await message.ack()
        else:
            others.append(message)  # another test's: left in the queue
    for message in others:
        await message.reject(requeue=True)
    await channel.close()
    return reasons


# --- item 7: hostile tokens are refused with 4001, never an internal error ---------------

HOSTILE_TIME_CLAIMS = {
    "exp 1e20": '{"sub":"alice","exp":1e20}',
    "exp Infinity": '{"sub":"alice","exp":Infinity}',
    "exp NaN": '{"sub":"alice","exp":NaN}',
    "exp negative": '{"sub":"alice","exp":-1}',
    "nbf NaN": '{"sub":"alice","exp":9999999999,"nbf":NaN}',
    "iat Infinity": '{"sub":"alice","exp":9999999999,"iat":Infinity}',
}


@pytest.mark.parametrize("payload", HOSTILE_TIME_CLAIMS.values(), ids=HOSTILE_TIME_CLAIMS.keys())
def test_time_claims_out_of_range_are_refused(payload: str) -> None:
    settings = AuthSettings(secret=SECRET)
    with pytest.raises(AuthError) as refused:
        decode_identity(signed({"alg": "HS256"}, payload), SECRET, settings)
    assert refused.value.reason == "malformed"


HOSTILE_HEADERS: dict[str, dict[str, Any] | str] = {
    "kid not a string": {"alg": "RS256", "kid": 5},
    "kid NaN": '{"alg":"RS256","kid":NaN}',
    "unknown crit": {"alg": "RS256", "kid": "k", "crit": ["x-evil"], "x-evil": 1},
    "crit forging a log line": {"alg": "RS256", "crit": ["x\nINFO notifyd: forged"]},
    "crit not a list": {"alg": "RS256", "crit": "x"},
}


@pytest.mark.parametrize("jwks", [False, True], ids=["HS secret", "JWKS"])
@pytest.mark.parametrize("header", HOSTILE_HEADERS.values(), ids=HOSTILE_HEADERS.keys())
async def test_hostile_headers_raise_only_auth_errors_without_their_text(
    header: dict[str, Any] | str, jwks: bool
) -> None:
    settings = (
        AuthSettings(algorithms=("RS256",), jwks_url="http://127.0.0.1:9/jwks")
        if jwks
        else AuthSettings(secret=SECRET)
    )
    verifier = TokenVerifier(settings)
    try:
        with pytest.raises(AuthError) as refused:
            await verifier.verify(signed(header, '{"sub":"alice","exp":9999999999}'))
    finally:
        await verifier.close()
    message = str(refused.value)
    assert message.isprintable() and "forged" not in message and "evil" not in message


def test_auth_error_messages_are_printable() -> None:
    assert str(AuthError("claims", "a\nb\x00c")) == "a\\nb\\x00c"


async def test_hostile_tokens_close_4001_on_the_socket(
    make_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    server = await make_server()
    tokens = [signed({"alg": "HS256"}, p) for p in HOSTILE_TIME_CLAIMS.values()]
    tokens.append(signed({"alg": "HS256", "crit": ["x\nINFO notifyd: forged"]}, "{}"))
    for tok in tokens:
        ws = await server.ws(tok)
        assert await expect_close(ws) == 4001, tok
        ws = await server.ws()
        await ws.send_json({"type": "auth", "token": tok})
        assert await expect_close(ws) == 4001, tok
    for record in caplog.records:
        assert "\n" not in record.getMessage() and "forged" not in record.getMessage()
        assert not record.exc_info, record.getMessage()


async def test_hostile_jwks_tokens_close_4001_not_1006(make_server: ServerFactory) -> None:
    # No JWKS is reachable: every token here is refused before a key is needed.
    server = await make_server(auth={"algorithms": ["RS256"], "jwks_url": "http://127.0.0.1:9/"})
    for header in HOSTILE_HEADERS.values():
        ws = await server.ws(signed(header, '{"sub":"alice","exp":9999999999}'))
        assert await expect_close(ws) == 4001, header


# --- item 8: what /api/publish accepts is what the replicas accept -----------------------


async def test_api_publish_refuses_what_grows_past_the_amqp_limit(
    make_server: ServerFactory,
) -> None:
    server = await make_server(amqp={"max_body_size": 10_000}, api={"max_body_size": 50_000})
    # 5 bytes each as sent, 19 as published ("1000000000000000.0,").
    body = json.dumps({"channel": f"user:{new_user()}", "data": [1e15] * 1000}).replace(
        "1000000000000000.0", "1e15"
    )
    assert len(body) < 10_000
    status, answer = await publish_http(server, body.encode())
    assert (status, answer["error"]) == (413, "too_big"), answer
    assert "max_body_size" in answer["message"]
    status, answer = await publish_http(
        server, json.dumps({"channel": f"user:{new_user()}", "data": [1] * 100}).encode()
    )
    assert status == 202, answer


async def test_client_publish_refuses_what_grows_past_the_amqp_limit(
    make_server: ServerFactory,
) -> None:
    server = await make_server(amqp={"max_body_size": 10_000})
    ws, _ = await server.connect(new_user(), publish=["room"])
    data = ",".join(["1e15"] * 1000)
    await ws.send_str(f'{{"type":"publish","channel":"topic:room","ref":3,"data":[{data}]}}')
    refused = await receive_json(ws)
    assert (refused["type"], refused["code"], refused["ref"]) == ("error", "too_big", 3)


# --- item 9: notifyd.dead is bounded ------------------------------------------------------


@pytest.fixture
def vhost(rabbit: RabbitNode) -> str:
    """An AMQP URL to a fresh vhost of the test node: a notifyd.dead of its own."""
    name = f"v-{uuid.uuid4().hex[:8]}"
    rabbit.ctl("add_vhost", name)
    rabbit.ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    return rabbit.amqp_url + name


async def dead_ids(url: str) -> list[str]:
    """The message ids in notifyd.dead, oldest first (the queue is emptied)."""
    connection = await aio_pika.connect(url)
    channel = await connection.channel()
    queue = await channel.declare_queue("notifyd.dead", passive=True)
    ids: list[str] = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        assert message.message_id is not None
        ids.append(message.message_id)
    await connection.close()
    return ids


@pytest.fixture
async def vhost_amqp(vhost: str) -> AsyncIterator[AmqpPublisher]:
    async with amqp_publisher(vhost) as publisher:
        yield publisher


async def poison(
    amqp: AmqpPublisher, ws: aiohttp.ClientWebSocketResponse, user: str, n: int
) -> None:
    for index in range(n):
        await amqp.send(f"user.{user}", b"not json", message_id=f"p{index}")
    await send_then_settle(amqp, ws, user, [])


async def test_dead_letter_queue_drops_its_oldest_past_the_bound(
    make_server: ServerFactory, vhost: str, vhost_amqp: AmqpPublisher
) -> None:
    server = await make_server(url=vhost, amqp={"dead_letter_max_length": 3})
    user = new_user()
    ws, _ = await server.connect(user)
    await poison(vhost_amqp, ws, user, 6)
    # The newest three are kept: RabbitMQ dropped p0..p2 from the head.
    assert await dead_ids(vhost) == ["p3", "p4", "p5"]
    await ws.close()


async def test_an_unbounded_dead_letter_queue_from_an_older_notifyd_is_kept(
    make_server: ServerFactory,
    vhost: str,
    vhost_amqp: AmqpPublisher,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # What notifyd before the bound declared: no arguments.
    connection = await aio_pika.connect(vhost)
    channel = await connection.channel()
    await channel.declare_queue("notifyd.dead", durable=True)
    await connection.close()

    caplog.set_level(logging.WARNING)
    server = await make_server(url=vhost)  # becomes ready: the old queue is used as is
    user = new_user()
    ws, _ = await server.connect(user)
    await poison(vhost_amqp, ws, user, 2)
    assert await dead_ids(vhost) == ["p0", "p1"]
    advice = [r.getMessage() for r in caplog.records if "notifyd.dead exists" in r.getMessage()]
    assert len(advice) == 1 and "set_policy" in advice[0] and "delete_queue" in advice[0]
    await ws.close()


async def test_publishers_work_whatever_the_dead_letter_queue_arguments(
    make_server: ServerFactory, vhost: str
) -> None:
    server = await make_server(url=vhost, amqp={"dead_letter_max_length": 7})
    user = new_user()
    ws, _ = await server.connect(user)
    # notifyd's Publisher declared notifyd.dead without arguments: refused by RabbitMQ.
    async with Publisher(vhost) as publisher:
        await publisher.publish({"n": 1}, user=user)
    assert (await receive_until(ws, "notification"))["data"] == {"n": 1}
    await ws.close()


async def test_rabbitmq_refuses_other_dead_letter_arguments(vhost: str) -> None:
    """Why notifyd declares its queues on a channel of their own (and what it guards)."""
    connection = await aio_pika.connect(vhost)
    channel = await connection.channel()
    await channel.declare_queue("notifyd.dead", durable=True, arguments={"x-max-length": 5})
    with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
        await channel.declare_queue("notifyd.dead", durable=True)
    await connection.close()
