"""Shared fixtures: a real RabbitMQ node, notifyd servers in-process or as processes."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aio_pika
import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiohttp.web_runner import BaseRunner

from notifyd.app import GATEWAY, create_app, runner_options
from notifyd.auth import mint_token
from notifyd.config import Settings, from_mapping
from notifyd.metrics import Metrics

if TYPE_CHECKING:
    from notifyd.devbroker import RabbitNode

SECRET = "test-secret-that-is-long-enough-for-hs256!"
SERVICE_KEY = "service-key-for-tests"
_users = itertools.count()


@pytest.fixture(scope="session")
def rabbit(request: pytest.FixtureRequest) -> Iterator[RabbitNode]:
    """One private RabbitMQ node for the whole run (tests that restart it share it)."""
    from notifyd.devbroker import RabbitNode

    # Its own temporary directory: pytest's are not searchable by the rabbitmq user.
    node = RabbitNode()
    node.start()
    try:
        yield node
    finally:
        if request.session.testsfailed:
            # The node's directory goes with it: what it reported is kept in the
            # run's output, where a failure in CI can still be read.
            report_broker_crashes(node, request.config)
        node.cleanup()


#: Lines of a RabbitMQ log that begin a crash report (a process that terminated).
_CRASH_MARKERS = ("** Generic server", "crasher:", "Supervisor:", "Reason for termination")


def report_broker_crashes(
    node: RabbitNode, config: pytest.Config, reports: int = 8, lines_each: int = 40
) -> None:
    """Write the last ``reports`` crash reports in the node's log (channel and queue
    processes that terminated), ``lines_each`` lines of each, to the terminal."""
    lines = [line for line in node.log_lines() if "[error]" in line]
    starts: list[int] = []
    for index, line in enumerate(lines):
        if any(m in line for m in _CRASH_MARKERS) and (
            not starts or index >= starts[-1] + lines_each
        ):
            starts.append(index)
    terminal = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if not starts or terminal is None:
        return
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        shown = starts[-reports:]
        terminal.write_sep("=", f"RabbitMQ crash reports: {len(shown)} of {len(starts)}")
        for start in shown:
            for line in lines[start : start + lines_each]:
                terminal.write_line(line)


@pytest.fixture
def amqp_url(request: pytest.FixtureRequest) -> str:
    # NOTIFYD_TEST_AMQP_URL points the tests that do not restart RabbitMQ at an
    # existing broker (handy while developing); by default they use the private node.
    external = os.environ.get("NOTIFYD_TEST_AMQP_URL")
    if external:
        return external
    node: RabbitNode = request.getfixturevalue("rabbit")
    return node.amqp_url


def new_user(prefix: str = "u") -> str:
    """A user id no other test uses (the exchange is shared by the whole run)."""
    return f"{prefix}{next(_users)}-{uuid.uuid4().hex[:6]}"


def token(user: str, ttl: float = 3600, **kwargs: Any) -> str:
    return mint_token(SECRET, user, ttl, **kwargs)


def settings_for(amqp_url: str, **sections: dict[str, Any]) -> Settings:
    raw: dict[str, dict[str, Any]] = {
        "amqp": {
            "url": amqp_url,
            "replica_id": f"test-{uuid.uuid4().hex[:8]}",
            "queue_expires": 30,
        },
        "auth": {"secret": SECRET},
        "api": {"service_keys": [SERVICE_KEY]},
        "ws": {"heartbeat": 0},
        "server": {"drain_seconds": 0.2},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return from_mapping(raw, source="test")


class Server:
    """A notifyd app served in-process on a real port."""

    def __init__(self, test_server: TestServer, session: aiohttp.ClientSession) -> None:
        self.test_server = test_server
        self.http = session
        self.app: web.Application = test_server.app

    @property
    def gateway(self) -> Any:
        return self.app[GATEWAY]

    @property
    def metrics(self) -> Metrics:
        """This server's own metrics (no other test counts in them)."""
        metrics: Metrics = self.gateway.metrics
        return metrics

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample of this server's registry (0 when the series does not exist yet)."""
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    @property
    def port(self) -> int:
        port = self.test_server.port
        assert port is not None, "the server is not started"
        return port

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.test_server.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.test_server.port}/ws"

    async def ws(
        self, auth_token: str | None = None, **kwargs: Any
    ) -> aiohttp.ClientWebSocketResponse:
        headers = dict(kwargs.pop("headers", {}))
        if auth_token is not None:
            headers["Authorization"] = f"Bearer {auth_token}"
        ws: aiohttp.ClientWebSocketResponse = await self.http.ws_connect(
            self.ws_url, headers=headers, protocols=("notifyd.v1",), **kwargs
        )
        return ws

    async def connect(
        self, user: str, since: str | None = None, since_ts: int | None = None, **claims: Any
    ) -> tuple[aiohttp.ClientWebSocketResponse, dict[str, Any]]:
        """An authenticated socket and its welcome message."""
        query = f"?since={since}" if since else ""
        if since_ts is not None:
            query += f"&since_ts={since_ts}"
        ws = await self.http.ws_connect(
            self.ws_url + query,
            headers={"Authorization": f"Bearer {token(user, **claims)}"},
            protocols=("notifyd.v1",),
        )
        welcome = await receive_json(ws)
        assert welcome["type"] == "welcome", welcome
        return ws, welcome

    async def wait_ready(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.gateway.ready:
                return
            await asyncio.sleep(0.05)
        raise AssertionError("server did not become ready")


ServerFactory = Callable[..., Awaitable[Server]]


class AsDeployedTestServer(TestServer):
    """aiohttp's test server cancels a request handler whose client went away;
    notifyd's runner keeps aiohttp's default (it does not). Tests run as deployed,
    or a stream that only ends by that cancellation would pass here and hang there."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        kwargs["handler_cancellation"] = False
        return await super()._make_runner(**kwargs)


@pytest.fixture
async def make_server(amqp_url: str) -> AsyncIterator[ServerFactory]:
    """Start in-process servers; ``await make_server(ws={...})`` overrides settings."""
    started: list[TestServer] = []
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def factory(
        wait_ready: bool = True, url: str | None = None, **sections: dict[str, Any]
    ) -> Server:
        settings = settings_for(url or amqp_url, **sections)
        app = create_app(settings)
        test_server = AsDeployedTestServer(app, host="127.0.0.1")
        await test_server.start_server(**runner_options(settings, app[GATEWAY].metrics))
        assert test_server.runner is not None and test_server.runner.server is not None
        app[GATEWAY].sockets.pace_requests(test_server.runner.server)
        started.append(test_server)
        server = Server(test_server, session)
        if wait_ready:
            await server.wait_ready()
        return server

    yield factory
    for test_server in reversed(started):
        await test_server.close()
    await session.close()


@pytest.fixture
async def server(make_server: ServerFactory) -> Server:
    return await make_server()


async def stream_replicas(make_server: ServerFactory) -> tuple[Server, Server]:
    """Two replicas sharing the stream history (a resume may land on either)."""
    history = {"backend": "stream"}
    return await make_server(history=history), await make_server(history=history)


async def receive_json(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5) -> Any:
    msg = await ws.receive(timeout=timeout)
    assert msg.type == aiohttp.WSMsgType.TEXT, (msg.type, msg.data, msg.extra)
    return json.loads(msg.data)


async def receive_until(
    ws: aiohttp.ClientWebSocketResponse, kind: str, timeout: float = 5
) -> dict[str, Any]:
    """The next message of ``kind``, skipping others (e.g. broadcasts of other tests)."""
    deadline = time.monotonic() + timeout
    while True:
        message = await receive_json(ws, max(0.01, deadline - time.monotonic()))
        if message["type"] == kind:
            return message  # type: ignore[no-any-return]


async def expect_close(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5) -> int:
    """Read until the server closes; returns the close code."""
    deadline = time.monotonic() + timeout
    while True:
        msg = await ws.receive(timeout=max(0.01, deadline - time.monotonic()))
        if msg.type in (
            aiohttp.WSMsgType.CLOSE,
            aiohttp.WSMsgType.CLOSED,
            aiohttp.WSMsgType.CLOSING,
        ):
            return ws.close_code if ws.close_code is not None else int(msg.data or 0)
        if msg.type == aiohttp.WSMsgType.ERROR:
            # Shown with a failing test: why the socket ended without a close frame.
            print(f"expect_close: {msg.data!r}, exception {ws.exception()!r}", file=sys.stderr)
            return ws.close_code or 1006


async def expect_silence(ws: aiohttp.ClientWebSocketResponse, seconds: float = 0.5) -> None:
    """Assert no notification arrives within ``seconds``."""
    try:
        msg = await ws.receive(timeout=seconds)
    except TimeoutError:
        return
    raise AssertionError(f"unexpected message: {msg.type} {msg.data!r}")


class AmqpPublisher:
    """A plain aio-pika publisher, as any backend would write it (not notifyd's helper)."""

    def __init__(self, connection: Any, channel: Any, exchange: Any) -> None:
        self.connection = connection
        self.channel = channel
        self.exchange = exchange

    async def send(self, routing_key: str, body: Any, **properties: Any) -> None:
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        await self.exchange.publish(aio_pika.Message(payload, **properties), routing_key)


@contextlib.asynccontextmanager
async def amqp_publisher(url: str) -> AsyncIterator[AmqpPublisher]:
    """An :class:`AmqpPublisher` with confirms on the ``notifyd`` exchange at ``url``."""
    connection = await aio_pika.connect(url)
    channel = await connection.channel(publisher_confirms=True)
    exchange = await channel.declare_exchange("notifyd", aio_pika.ExchangeType.TOPIC, durable=True)
    try:
        yield AmqpPublisher(connection, channel, exchange)
    finally:
        await connection.close()


@pytest.fixture
async def amqp(amqp_url: str) -> AsyncIterator[AmqpPublisher]:
    async with amqp_publisher(amqp_url) as publisher:
        yield publisher


async def raw_upgrade(
    port: int,
    auth_token: str | None,
    receive_buffer: int | None = None,
    headers: str = "",
    version: int = 13,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A hand-made WebSocket upgrade on a plain socket that reads only when told to.

    ``headers``: more header lines, each ending in CRLF; ``auth_token`` None sends
    no Authorization header.
    """
    sock = socket.socket()
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect(("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(upgrade_request(auth_token, headers, version))
    await writer.drain()
    return reader, writer


def upgrade_request(auth_token: str | None = None, headers: str = "", version: int = 13) -> bytes:
    """A WebSocket upgrade request for ``/ws``, written by hand.

    ``headers``: more header lines, each ending in CRLF; ``auth_token`` None sends
    no Authorization header.
    """
    if auth_token is not None:
        headers = f"Authorization: Bearer {auth_token}\r\n{headers}"
    return (
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: {version}\r\n"
        f"{headers}\r\n"
    ).encode()


async def collect_ids(ws: aiohttp.ClientWebSocketResponse, count: int, timeout: float) -> list[str]:
    """The ids of the next ``count`` notifications (fewer if ``timeout`` passes first)."""
    received: list[str] = []
    deadline = time.monotonic() + timeout
    while len(received) < count and time.monotonic() < deadline:
        try:
            message = await receive_json(ws, timeout=max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            break
        if message["type"] == "notification":
            received.append(message["id"])
    return received


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``python -m notifyd serve`` as a real process, for signals and replicas."""

    def __init__(self, amqp_url: str, port: int | None = None, **env: str) -> None:
        self.port = port or free_port()
        self.env = {
            **os.environ,
            "NOTIFYD_AMQP_URL": amqp_url,
            "NOTIFYD_AUTH_SECRET": SECRET,
            "NOTIFYD_API_SERVICE_KEYS": SERVICE_KEY,
            "NOTIFYD_SERVER_HOST": "127.0.0.1",
            "NOTIFYD_SERVER_PORT": str(self.port),
            "NOTIFYD_AMQP_REPLICA_ID": f"proc-{uuid.uuid4().hex[:8]}",
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, log_dir: Path) -> ServerProcess:
        self.log_path = log_dir / f"notifyd-{self.port}-{uuid.uuid4().hex[:4]}.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "notifyd", "serve"],
            env=self.env,
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
        )
        return self

    async def wait(self, path: str = "/readyz", timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                assert self.process is not None and self.process.poll() is None, self.log()
                try:
                    async with http.get(self.base + path) as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError(f"{path} never answered 200\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> tuple[int, float]:
        """Send ``sig``; returns (exit code, seconds to exit)."""
        assert self.process is not None
        started = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout=timeout)
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def processes(tmp_path: Path, amqp_url: str) -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def factory(port: int | None = None, url: str | None = None, **env: str) -> ServerProcess:
        process = ServerProcess(url or amqp_url, port, **env).start(tmp_path)
        started.append(process)
        return process

    yield factory
    for process in started:
        process.kill()


def signal_name(code: int) -> str:
    return signal.Signals(-code).name if code < 0 else str(code)
