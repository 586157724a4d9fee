"""Bursts spread over passes of the event loop: :class:`notifyd.lifecycle.Turns`, and
new connections' first bytes parsed a batch per pass (``SocketServer.pace_requests``)."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import pytest
from aiohttp.web_protocol import RequestHandler

from notifyd.connection import MAX_REQUEST_HEAD, PARSE_BATCH
from notifyd.lifecycle import Turns

from .conftest import ServerFactory, new_user, token, upgrade_request

T = TypeVar("T")


class Passes:
    """Counts passes of the event loop: a callback that schedules itself again runs
    once in each."""

    def __init__(self) -> None:
        self.count = 0
        self._running = True
        asyncio.get_running_loop().call_soon(self._tick)

    def _tick(self) -> None:
        if self._running:
            self.count += 1
            asyncio.get_running_loop().call_soon(self._tick)

    def stop(self) -> None:
        self._running = False


def recording(ran: list[tuple[T, int]], key: T, ticking: Passes) -> Callable[[], bool]:
    """An asker that notes ``key`` and the pass it ran in, and uses its turn."""

    def go() -> bool:
        ran.append((key, ticking.count))
        return True

    return go


async def passes(count: int) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


@pytest.fixture
async def ticking() -> AsyncIterator[Passes]:
    ticker = Passes()
    yield ticker
    ticker.stop()


async def test_turns_are_taken_at_once_until_the_pass_has_none_left() -> None:
    turns = Turns(3)
    assert [turns.now() for _ in range(5)] == [True, True, True, False, False]
    await passes(2)
    assert turns.now()


async def test_waiting_askers_get_a_batch_per_pass_in_order(ticking: Passes) -> None:
    turns = Turns(3)
    ran: list[tuple[int, int]] = []

    for index in range(8):
        turns.later(recording(ran, index, ticking))
    assert len(turns) == 8
    assert not turns.now(), "nobody jumps the queue"
    await passes(6)
    assert [index for index, _ in ran] == list(range(8))
    per_pass = Counter(at for _, at in ran)
    assert sorted(per_pass.values()) == [2, 3, 3]
    assert len(turns) == 0


async def test_an_asker_that_no_longer_needs_its_turn_gives_it_to_the_next(
    ticking: Passes,
) -> None:
    turns = Turns(2)
    ran: list[tuple[str, int]] = []

    turns.later(lambda: False)  # closed meanwhile
    for name in "abc":
        turns.later(recording(ran, name, ticking))
    await passes(4)
    assert [name for name, _ in ran] == ["a", "b", "c"]
    assert ran[0][1] == ran[1][1] != ran[2][1]


async def test_an_asker_that_raises_does_not_hold_up_the_others(ticking: Passes) -> None:
    turns = Turns(2)
    ran: list[tuple[str, int]] = []

    def fails() -> bool:
        raise RuntimeError("a bug in one asker")

    turns.later(fails)
    for name in "abc":
        turns.later(recording(ran, name, ticking))
    errors: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
    try:
        await passes(4)
    finally:
        asyncio.get_running_loop().set_exception_handler(None)
    assert [name for name, _ in ran] == ["a", "b", "c"]
    assert len(errors) == 1 and isinstance(errors[0]["exception"], RuntimeError)


async def test_waiters_resume_a_batch_per_pass_and_close_cancels_the_rest(
    ticking: Passes,
) -> None:
    turns = Turns(2)
    resumed: list[int] = []

    async def waiter(index: int) -> None:
        await turns.wait()
        resumed.append(ticking.count)

    first = [asyncio.create_task(waiter(i)) for i in range(5)]
    await passes(1)  # each took a turn or queued
    late = [asyncio.create_task(waiter(i)) for i in range(4)]
    await passes(1)
    turns.close()
    done = await asyncio.gather(*first, *late, return_exceptions=True)
    cancelled = [r for r in done if isinstance(r, asyncio.CancelledError)]
    assert len(resumed) + len(cancelled) == 9
    assert cancelled, "close() cancels the coroutines still waiting"
    assert max(Counter(resumed).values()) <= 2


async def burst(
    make_server: ServerFactory,
    ticking: Passes,
    monkeypatch: pytest.MonkeyPatch,
    requests: list[bytes],
) -> tuple[list[bytes], list[tuple[int, int]]]:
    """Connect a client per request, then send every request in one pass of the event
    loop; returns each client's status code and, for each read aiohttp parsed, its
    size and the pass it was parsed in."""
    server = await make_server()
    parsed: list[tuple[int, int]] = []
    parse = RequestHandler.data_received

    def data_received(handler: RequestHandler, data: bytes) -> None:
        parsed.append((len(data), ticking.count))
        parse(handler, data)

    monkeypatch.setattr(RequestHandler, "data_received", data_received)
    clients = []
    for _ in requests:
        sock = socket.create_connection(("127.0.0.1", server.port))
        clients.append(await asyncio.open_connection(sock=sock))
    # Accepted, and nothing sent yet.
    runner = server.test_server.runner
    assert runner is not None and runner.server is not None
    http_server = runner.server
    deadline = asyncio.get_running_loop().time() + 5
    while len(http_server.connections) < len(requests):
        assert asyncio.get_running_loop().time() < deadline, "not all accepted"
        await asyncio.sleep(0.01)
    for (_, writer), request in zip(clients, requests, strict=True):
        writer.write(request)  # all in this one pass
    heads = await asyncio.gather(
        *(asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10) for reader, _ in clients)
    )
    for _, writer in clients:
        writer.close()
    return [head.split(b" ", 2)[1] for head in heads], parsed


async def test_a_burst_of_upgrade_requests_is_parsed_a_batch_per_pass(
    make_server: ServerFactory, ticking: Passes, monkeypatch: pytest.MonkeyPatch
) -> None:
    count = 3 * PARSE_BATCH + 5
    requests = [upgrade_request(token(new_user())) for _ in range(count)]
    statuses, parsed = await burst(make_server, ticking, monkeypatch, requests)
    assert statuses == [b"101"] * count
    assert len(parsed) == count
    per_pass = Counter(at for _, at in parsed)
    assert max(per_pass.values()) <= PARSE_BATCH, per_pass
    assert len(per_pass) >= count // PARSE_BATCH


async def test_a_first_read_larger_than_a_request_head_is_refused_without_waiting(
    make_server: ServerFactory, ticking: Passes, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Held, it would only keep its bytes in memory: aiohttp answers it at once.
    oversized = upgrade_request(token(new_user()), f"X-Padding: {'p' * (2 * MAX_REQUEST_HEAD)}\r\n")
    requests = [upgrade_request(token(new_user())) for _ in range(2 * PARSE_BATCH)]
    requests.append(oversized)
    statuses, parsed = await burst(make_server, ticking, monkeypatch, requests)
    # aiohttp's limit on a header line answers before notifyd's on the whole head.
    assert statuses == [b"101"] * (2 * PARSE_BATCH) + [b"400"]
    first_pass = min(at for _, at in parsed)
    assert (len(oversized), first_pass) in parsed
    assert Counter(at for _, at in parsed)[first_pass] == PARSE_BATCH + 1


async def test_new_sockets_are_counted_as_they_ask_to_be_admitted_and_plain_requests_are_not(
    make_server: ServerFactory,
) -> None:
    # The collector policy's measure of a connect storm (notifyd.gcpolicy): a wave's
    # sockets count while they wait for their turn; /api and /metrics never do.
    server = await make_server()
    sockets = server.gateway.sockets
    before = sockets.admissions
    for _ in range(5):
        async with server.http.get(f"{server.base}/metrics") as response:
            assert response.status == 200
    assert sockets.admissions == before
    for _ in range(3):
        ws, _welcome = await server.connect(new_user())
        await ws.close()
    assert sockets.admissions == before + 2 * 3  # each upgrade, then its welcome
