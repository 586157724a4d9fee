"""Starting up as an operator sees it: clear one-line errors, readable reconnect logs,
and the open-files limit raised (issue 13 items 17 and 20); and the lifecycle: what
starts is undone in reverse order on every path, every task awaited (issue 15.3)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import resource
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import aiormq
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

import notifyd.app
import notifyd.broker
from notifyd.app import GATEWAY, STOP_SIGNALS, Gateway, create_app, serve
from notifyd.auth import _Jwks
from notifyd.config import Settings
from notifyd.errors import ServeError

from .conftest import (
    ServerFactory,
    ServerProcess,
    expect_close,
    free_port,
    new_user,
    receive_json,
    settings_for,
    token,
)

Processes = Callable[..., ServerProcess]


def test_a_busy_port_is_one_line_and_a_failed_exit(processes: Processes) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = processes(port=port)
        assert server.process is not None
        code = server.process.wait(timeout=30)
    log = server.log()
    assert code == 1, log
    assert "Traceback" not in log, log
    assert f"notifyd: cannot listen on 127.0.0.1:{port}: Address already in use\n" in log


@contextlib.contextmanager
def soft_open_files_limit(limit: int) -> Iterator[int]:
    """Processes started inside inherit this soft limit; yields the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_the_soft_open_files_limit_is_raised_to_the_hard_one(processes: Processes) -> None:
    with soft_open_files_limit(256) as hard:
        server = processes()
    assert hard > 256, "this test needs a hard limit above 256"
    await server.wait()
    assert server.process is not None
    limits = await asyncio.to_thread(Path(f"/proc/{server.process.pid}/limits").read_text)
    row = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    assert row.split()[3:5] == [str(hard), str(hard)], row
    assert f"open files limit: {hard} (raised from 256)" in server.log()


@pytest.fixture
def broker_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.INFO)
    yield caplog


def attempts(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "notifyd.broker"]


async def wait_for_lines(
    caplog: pytest.LogCaptureFixture, count: int, timeout: float = 20
) -> list[str]:
    deadline = time.monotonic() + timeout
    while len(attempts(caplog)) < count:
        assert time.monotonic() < deadline, attempts(caplog)
        await asyncio.sleep(0.05)
    return attempts(caplog)


async def test_reconnect_logs_one_line_per_attempt_with_the_pause_taken(
    make_server: ServerFactory,
    broker_log: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Full jitter picks uniform(min, ceiling); three quarters of the way makes it visible.
    monkeypatch.setattr(
        "notifyd.broker.random.uniform", lambda low, high: low + (high - low) * 0.75
    )
    port = free_port()  # nothing listens there
    await make_server(
        wait_ready=False,
        url=f"amqp://guest:guest@127.0.0.1:{port}/",
        amqp={"reconnect_min": 0.04, "reconnect_max": 0.32},
    )
    lines = await wait_for_lines(broker_log, 5)
    pauses = [float(m) for line in lines for m in re.findall(r"reconnecting in ([0-9.]+)s", line)]
    # Ceilings 0.04, 0.08, 0.16, 0.32, 0.32: the pauses taken, not the ceilings.
    assert pauses[:5] == [0.04, 0.07, 0.13, 0.25, 0.25], lines
    assert len(pauses) == len(lines), lines
    expected = f"broker amqp://guest:***@127.0.0.1:{port}/ unavailable ([Errno 111] Connect"
    assert all(line.startswith(expected) for line in lines), lines
    others = [r for r in broker_log.records if r.name.startswith(("aiormq", "aio_pika"))]
    assert not [r for r in others if r.levelno >= logging.WARNING], others


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def listener(handler: Handler) -> AsyncIterator[int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def http_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(8)
    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    await writer.drain()
    writer.close()


async def silence(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()


@pytest.mark.parametrize(
    ("handler", "reason"),
    [
        (http_answer, "the peer broke off the AMQP handshake: is it an AMQP 0-9-1 broker?"),
        (silence, "no AMQP handshake within 0.5s: is it an AMQP 0-9-1 broker?"),
    ],
    ids=["answers-http", "silent"],
)
async def test_a_listener_that_is_not_amqp_gets_a_meaningful_reason(
    make_server: ServerFactory,
    broker_log: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    handler: Handler,
    reason: str,
) -> None:
    monkeypatch.setattr(notifyd.broker, "CONNECT_TIMEOUT", 0.5)
    async with listener(handler) as port:
        await make_server(
            wait_ready=False,
            url=f"amqp://guest:guest@127.0.0.1:{port}/",
            amqp={"reconnect_min": 0.5, "reconnect_max": 0.5},
        )
        (line,) = (await wait_for_lines(broker_log, 1))[:1]
    assert f"unavailable ({reason}); reconnecting in" in line, line


def unclosed_connections() -> set[int]:
    return {
        id(o) for o in gc.get_objects() if isinstance(o, aio_pika.Connection) and not o.is_closed
    }


@pytest.mark.parametrize("handler", [http_answer, silence], ids=["answers-http", "silent"])
async def test_a_connection_that_could_not_be_opened_is_closed_not_left_to_the_collector(
    monkeypatch: pytest.MonkeyPatch, handler: Handler
) -> None:
    # Left to the collector, aio-pika's __del__ schedules a close() that is never
    # awaited when the collection runs outside the event loop's thread.
    monkeypatch.setattr(notifyd.broker, "CONNECT_TIMEOUT", 0.3)
    enabled = gc.isenabled()
    gc.disable()  # what is left unclosed stays where the scan below finds it
    try:
        before = unclosed_connections()
        async with listener(handler) as port:
            with pytest.raises((TimeoutError, ConnectionError, aiormq.AMQPError)):
                await notifyd.broker.open_connection(f"amqp://guest:guest@127.0.0.1:{port}/")
        assert unclosed_connections() - before == set()
    finally:
        if enabled:
            gc.enable()


# --- the lifecycle: everything started is undone, in reverse, on every path (issue 15.3) ---


@contextlib.contextmanager
def process_state() -> Iterator[None]:
    """Asserts that signal handlers and the cycle collector are as they were."""
    handlers = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    thresholds = gc.get_threshold()
    yield
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == handlers
    assert gc.get_threshold() == thresholds
    assert gc.get_freeze_count() == 0


async def tasks_left(before: set[asyncio.Task[Any]]) -> set[asyncio.Task[Any]]:
    await asyncio.sleep(0)  # done callbacks run
    return asyncio.all_tasks() - before - {asyncio.current_task()}


@pytest.fixture
def gateways(monkeypatch: pytest.MonkeyPatch) -> list[Gateway]:
    """The gateways serve() creates, as they are created."""
    created: list[Gateway] = []

    def capture(settings: Settings, replica_id: str | None = None) -> web.Application:
        app = create_app(settings, replica_id)
        created.append(app[GATEWAY])
        return app

    monkeypatch.setattr(notifyd.app, "create_app", capture)
    return created


async def test_a_port_taken_midway_through_start_up_undoes_what_started(
    gateways: list[Gateway],
) -> None:
    before = asyncio.all_tasks()
    metrics_port = free_port()
    nowhere = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    with process_state(), socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = settings_for(
            nowhere, server={"host": "127.0.0.1", "port": port, "metrics_port": metrics_port}
        )
        # The metrics listener, the gateway (broker task and all) start; then the port.
        with pytest.raises(ServeError, match=f"cannot listen on 127.0.0.1:{port}"):
            await serve(settings)
    (gateway,) = gateways
    assert gateway.broker.closed
    assert await tasks_left(before) == set()
    with socket.socket() as again:  # the metrics listener is closed
        again.bind(("127.0.0.1", metrics_port))


async def test_sigterm_undoes_start_up_in_reverse_and_leaves_nothing_running(
    amqp_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    steps: list[str] = []
    gateways: list[Gateway] = []

    def recorded(name: str, method: Callable[..., Awaitable[None]]) -> Any:
        async def record(*args: Any) -> None:
            steps.append(name)
            await method(*args)

        return record

    def create(settings: Settings, replica_id: str | None = None) -> web.Application:
        app = create_app(settings, replica_id)
        gateway = app[GATEWAY]
        gateway.sockets.drain = recorded("drain", gateway.sockets.drain)  # type: ignore[method-assign]
        gateway.sockets.close = recorded("close sockets", gateway.sockets.close)  # type: ignore[method-assign]
        gateway.broker.close = recorded("close broker", gateway.broker.close)  # type: ignore[method-assign]
        gateway.verifier.close = recorded("close verifier", gateway.verifier.close)  # type: ignore[method-assign]
        gateways.append(gateway)
        return app

    monkeypatch.setattr(notifyd.app, "create_app", create)
    port = free_port()
    settings = settings_for(
        amqp_url,
        server={"host": "127.0.0.1", "port": port, "drain_seconds": 0.3},
        ws={"heartbeat": 5},
        amqp={"close_sockets_after": 5},
    )
    before = asyncio.all_tasks()
    with process_state():
        serving = asyncio.create_task(serve(settings))
        while not gateways or not gateways[0].ready:
            assert not serving.done(), serving
            await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(
                f"ws://127.0.0.1:{port}/ws",
                headers={"Authorization": f"Bearer {token(new_user())}"},
            )
            assert (await receive_json(ws))["type"] == "welcome"
            # serve()'s own handler is in place, not the default one that would end pytest.
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
            os.kill(os.getpid(), signal.SIGTERM)
            assert await expect_close(ws) == 1001
        await asyncio.wait_for(serving, 20)
    # Drained once (serve() first, while listening; Gateway.stop finds it done).
    assert steps == ["drain", "close sockets", "close broker", "close verifier"]
    assert await tasks_left(before) == set()
    messages = [r.getMessage() for r in caplog.records]
    assert "SIGTERM: shutting down" in messages
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and not r.getMessage().startswith("open files limit")
    ]
    assert warnings == []


async def test_a_second_signal_closes_the_remaining_sockets_at_once(
    gateways: list[Gateway], amqp_url: str
) -> None:
    port = free_port()
    settings = settings_for(
        amqp_url, server={"host": "127.0.0.1", "port": port, "drain_seconds": 20}
    )
    serving = asyncio.create_task(serve(settings))
    while not gateways or not gateways[0].ready:
        assert not serving.done(), serving
        await asyncio.sleep(0.05)
    async with aiohttp.ClientSession() as http:
        sockets = []
        for _ in range(3):
            ws = await http.ws_connect(
                f"ws://127.0.0.1:{port}/ws",
                headers={"Authorization": f"Bearer {token(new_user())}"},
            )
            assert (await receive_json(ws))["type"] == "welcome"
            sockets.append(ws)
        assert signal.getsignal(signal.SIGINT) not in (signal.SIG_DFL, None)
        os.kill(os.getpid(), signal.SIGINT)
        await asyncio.sleep(0.5)  # the first socket closes now, the next ~8 s later
        started = time.monotonic()
        os.kill(os.getpid(), signal.SIGINT)
        codes = await asyncio.gather(*(expect_close(ws) for ws in sockets))
        assert codes == [1001, 1001, 1001]
        await asyncio.wait_for(serving, 10)
    assert time.monotonic() - started < 5


class HangingJwks:
    """A JWKS endpoint that answers nothing until released."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()
        self.release = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.asked.set()
        await self.release.wait()
        return web.json_response({"keys": []})


async def test_closing_the_jwks_cache_awaits_the_fetch_it_cancels() -> None:
    endpoint = HangingJwks()
    app = web.Application()
    app.router.add_get("/jwks", endpoint.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        jwks = _Jwks(str(server.make_url("/jwks")), cooldown=0, ttl=60)
        asking = asyncio.create_task(jwks.key_for("k1"))
        await asyncio.wait_for(endpoint.asked.wait(), 5)
        fetch = jwks._inflight
        assert fetch is not None and not fetch.done()
        await jwks.close()
        assert fetch.done() and fetch.cancelled()
        with pytest.raises(asyncio.CancelledError):
            await asking
    finally:
        endpoint.release.set()
        await server.close()
