"""Heartbeat: one task pings every socket, cuts off the silent, answers client pings."""

from __future__ import annotations

import asyncio
import contextlib
import json

import websockets

from notifyd.heartbeat import TICK, Heartbeat

from .conftest import ServerFactory, new_user, raw_upgrade, token


def test_a_round_spreads_the_sockets_over_the_interval() -> None:
    heartbeat = Heartbeat(25.0, list)
    ticks = round(25.0 / TICK)
    assert heartbeat.slices(10_000) * ticks >= 10_000
    assert heartbeat.slices(10_000) == 40  # 40 sockets per 0.1 s tick, not 10k at once
    assert heartbeat.slices(3) == 1
    assert Heartbeat(0.05, list).slices(7) == 7  # shorter than a tick: all at once


async def _read_until_eof(reader: asyncio.StreamReader) -> bytes:
    data = b""
    while chunk := await reader.read(65536):
        data += chunk
    return data


async def test_a_peer_that_never_answers_is_cut_off_and_others_stay(
    make_server: ServerFactory,
) -> None:
    server = await make_server(ws={"heartbeat": 0.5})
    async with websockets.connect(server.ws_url, subprotocols=["notifyd.v1"]) as alive:  # type: ignore[list-item]
        await alive.send(json.dumps({"type": "auth", "token": token(new_user())}))
        assert json.loads(await alive.recv())["type"] == "welcome"
        # Reads everything, answers nothing: a peer whose network went away.
        reader, writer = await raw_upgrade(server.port, token(new_user()))
        data = await asyncio.wait_for(_read_until_eof(reader), 5)
        assert b"101 Switching Protocols" in data and b'"type":"welcome"' in data
        assert b"\x89\x00" in data  # it was pinged before it was cut off
        assert server.sample("notifyd_heartbeat_timeouts_total") == 1
        writer.close()
        await asyncio.sleep(1.2)  # more heartbeat rounds: the answering socket stays
        await alive.send(json.dumps({"type": "ping"}))
        assert json.loads(await alive.recv()) == {"type": "pong"}
        assert len(server.gateway.hub) == 1


async def test_client_pings_are_answered_before_and_after_auth(
    make_server: ServerFactory,
) -> None:
    server = await make_server(ws={"heartbeat": 0})
    async with websockets.connect(server.ws_url, subprotocols=["notifyd.v1"]) as ws:  # type: ignore[list-item]
        await asyncio.wait_for(await ws.ping(), 2)  # before the auth message
        await ws.send(json.dumps({"type": "auth", "token": token(new_user())}))
        assert json.loads(await ws.recv())["type"] == "welcome"
        await asyncio.wait_for(await ws.ping(), 2)


class _Broken:
    def heartbeat(self) -> None:
        raise RuntimeError("boom")


class _Counted:
    def __init__(self) -> None:
        self.pings = 0

    def heartbeat(self) -> None:
        self.pings += 1


async def test_one_failing_socket_does_not_stop_the_others() -> None:
    counted = _Counted()
    heartbeat = Heartbeat(0.2, lambda: [_Broken(), counted])
    task = asyncio.create_task(heartbeat.run())
    await asyncio.sleep(0.55)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert counted.pings >= 2  # every round reached it, past the broken one
