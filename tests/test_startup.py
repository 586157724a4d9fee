"""Starting up as an operator sees it: clear one-line errors, readable reconnect logs,
and the open-files limit raised (issue 13 items 17 and 20)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import resource
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

import notifyd.broker

from .conftest import ServerFactory, ServerProcess, free_port

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
