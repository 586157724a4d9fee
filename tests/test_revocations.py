"""Revocations reach every replica, also one started later, and survive restarts (issue 13.12).

They are control messages kept by RabbitMQ in the stream ``notifyd.revocations``,
which each replica reads on connect; no other store is involved.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import aiohttp
import pytest

from notifyd import auth
from notifyd.auth import TokenVerifier, mint_token
from notifyd.config import AuthSettings
from notifyd.errors import AuthError

from .conftest import (
    SECRET,
    AmqpPublisher,
    ServerFactory,
    ServerProcess,
    expect_close,
    new_user,
    receive_json,
    receive_until,
    token,
)


async def refused(ws_url: str, auth_token: str) -> int | None:
    """The close code a socket with ``auth_token`` gets, or None when it is welcomed."""
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(ws_url, headers={"Authorization": f"Bearer {auth_token}"})
        message = await ws.receive(timeout=10)
        if message.type is aiohttp.WSMsgType.TEXT and '"welcome"' in message.data:
            await ws.close()
            return None
        code = ws.close_code or (await expect_close(ws))
        await ws.close()
        return code


async def test_a_revocation_reaches_a_replica_started_after_it(
    make_server: ServerFactory, amqp: AmqpPublisher
) -> None:
    first = await make_server()
    user = new_user()
    jti, other, expired = (f"jti-{uuid.uuid4().hex}" for _ in range(3))
    ws, _ = await first.connect(user, jti=jti)
    await amqp.send("control", {"action": "revoke", "jti": [jti], "until": time.time() + 600})
    assert await expect_close(ws) == 4001
    # Already over: ignored, here and by every replica that reads it later.
    await amqp.send("control", {"action": "revoke", "jti": [expired], "until": time.time() - 1})

    second = await make_server()  # a new replica, with nothing in memory
    assert await refused(second.ws_url, token(user, jti=jti)) == 4001
    assert await refused(second.ws_url, token(user, jti=other)) is None
    assert await refused(second.ws_url, token(user, jti=expired)) is None
    assert await refused(first.ws_url, token(user, jti=expired)) is None


async def test_a_revocation_survives_a_restart(
    processes: Callable[..., ServerProcess], amqp: AmqpPublisher
) -> None:
    user = new_user()
    jti = f"jti-{uuid.uuid4().hex}"
    first = processes()
    await first.wait()
    assert await refused(first.ws_url, token(user, jti=jti)) is None
    await amqp.send("control", {"action": "revoke", "jti": jti})  # until: a day from now
    deadline = time.monotonic() + 10
    while await refused(first.ws_url, token(user, jti=jti)) != 4001:
        assert time.monotonic() < deadline, "the revocation never reached the replica"
        await asyncio.sleep(0.1)
    code, _ = first.stop()
    assert code == 0

    again = processes(port=first.port, NOTIFYD_AMQP_REPLICA_ID=first.env["NOTIFYD_AMQP_REPLICA_ID"])
    await again.wait()
    assert await refused(again.ws_url, token(user, jti=jti)) == 4001
    assert await refused(again.ws_url, token(user, jti=f"{jti}-new")) is None
    assert "revocations: " in again.log()


async def test_a_revoked_socket_on_a_replica_that_was_cut_off_is_closed_on_reconnect(
    make_server: ServerFactory, amqp: AmqpPublisher
) -> None:
    server = await make_server()
    user = new_user()
    jti = f"jti-{uuid.uuid4().hex}"
    ws, _ = await server.connect(user, jti=jti)
    # As if the revocation had been published while this replica was away: it is only
    # in the stream, not in this replica's queue.
    gateway = server.gateway
    await gateway.broker.close()
    await amqp.send("control", {"action": "revoke", "jti": [jti], "until": time.time() + 600})
    await gateway.revocations.on_connected(amqp.connection)
    assert await expect_close(ws) == 4001


# --- the verifier's side, without I/O ------------------------------------------------------


async def test_tokens_with_a_jti_wait_for_the_shared_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "REVOCATIONS_WAIT", 0.1)
    verifier = TokenVerifier(AuthSettings(secret=SECRET))
    verifier.expect_shared_revocations()
    with pytest.raises(AuthError) as not_yet:
        await verifier.verify(mint_token(SECRET, "dora", 60, jti="j-1"))
    assert not_yet.value.reason == "revocations_unavailable"
    # A token without a jti cannot be revoked: nothing to wait for.
    assert (await verifier.verify(mint_token(SECRET, "dora", 60))).user == "dora"
    waiting = asyncio.create_task(verifier.verify(mint_token(SECRET, "dora", 60, jti="j-1")))
    await asyncio.sleep(0.02)
    verifier.revocations_read()
    assert (await waiting).token_id == "j-1"
    await verifier.close()


def test_revocations_expire_and_many_stay_cheap() -> None:
    verifier = TokenVerifier(AuthSettings(secret=SECRET))
    now = 1_000.0
    assert not verifier.revoke(["gone"], until=now - 1, now=now)
    assert not verifier.is_revoked("gone", now)
    assert verifier.revoke(["a"], until=now + 10, now=now)
    assert verifier.revoke(["a"], until=now + 5, now=now)  # the later until is kept
    assert verifier.is_revoked("a", now + 9) and not verifier.is_revoked("a", now + 10)
    started = time.perf_counter()
    for n in range(50_000):
        verifier.revoke([f"t{n}"], until=now + (1 if n % 2 else 100), now=now + (n % 3))
    assert time.perf_counter() - started < 2.0  # linear: expired entries swept in bulk
    assert verifier.revoked_count < 50_000


async def test_an_expired_revocation_does_not_close_sockets(
    make_server: ServerFactory, amqp: AmqpPublisher
) -> None:
    server = await make_server()
    user = new_user()
    jti = f"jti-{uuid.uuid4().hex}"
    ws, _ = await server.connect(user, jti=jti)
    await amqp.send("control", {"action": "revoke", "jti": [jti], "until": time.time() - 5})
    # Through the same queue, after the revocation: once it arrives, that was handled.
    await amqp.send(f"user.{user}", {"data": "after"})
    assert (await receive_until(ws, "notification"))["data"] == "after"
    await ws.send_json({"type": "ping"})
    assert await receive_json(ws) == {"type": "pong"}
