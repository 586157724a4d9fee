"""Baselines (a) and (c): aiohttp WebSocket servers fed from the same RabbitMQ exchange.

``--mode naive`` awaits ``send_str`` for every socket in turn, as most hand-written
gateways do. ``--mode raw`` is the limit: the notification framed once and written
straight to every transport. Both verify the same HS256 JWT and answer with a welcome
frame, like notifyd, answer ``{"type":"ping"}`` with ``{"type":"pong"}`` (and its
``ref``), and consume ``user.*`` and ``broadcast`` from exchange ``notifyd``.
"""

from __future__ import annotations

import contextlib
import json

import aio_pika
import jwt
from aiohttp import WSMsgType, web

from benchmarks.baselines import arguments, serve
from notifyd.websocket import text_frame


def pong(text: str) -> str | None:
    """notifyd's answer to a client ``ping``, echoing its ``ref``; None for anything else."""
    try:
        message = json.loads(text)
    except ValueError:
        return None
    if not isinstance(message, dict) or message.get("type") != "ping":
        return None
    ref = message.get("ref")
    return json.dumps({"type": "pong"} if ref is None else {"type": "pong", "ref": ref})


def main() -> None:
    args = arguments(("--mode", {"choices": ["naive", "raw"], "required": True}))
    users: dict[str, set[web.WebSocketResponse]] = {}
    everyone: set[web.WebSocketResponse] = set()

    async def handle(request: web.Request) -> web.WebSocketResponse:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        try:
            user = jwt.decode(token, args.secret, algorithms=["HS256"])["sub"]
        except jwt.InvalidTokenError:
            raise web.HTTPUnauthorized() from None
        ws = web.WebSocketResponse(compress=False)
        await ws.prepare(request)
        await ws.send_str(json.dumps({"type": "welcome", "user": user}))
        users.setdefault(user, set()).add(ws)
        everyone.add(ws)
        try:
            async for msg in ws:
                answer = pong(msg.data) if msg.type is WSMsgType.TEXT else None
                if answer is not None:
                    await ws.send_str(answer)
        finally:
            everyone.discard(ws)
            users[user].discard(ws)
        return ws

    async def consume(app: web.Application):  # type: ignore[no-untyped-def]
        connection = await aio_pika.connect(args.amqp_url)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000)
        exchange = await channel.declare_exchange(
            "notifyd", aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, "broadcast")
        await queue.bind(exchange, "user.*")

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            body = json.loads(message.body)
            key = message.routing_key or ""
            targets = everyone if key == "broadcast" else users.get(key.partition(".")[2], set())
            text = json.dumps({"type": "notification", "channel": key, "data": body.get("data")})
            if args.mode == "naive":
                for ws in list(targets):
                    with contextlib.suppress(ConnectionError):
                        await ws.send_str(text)
            else:
                frame = text_frame(text.encode())
                for ws in targets:
                    transport = ws._req.transport if ws._req is not None else None
                    if transport is not None and not transport.is_closing():
                        transport.write(frame)
            await message.ack()

        await queue.consume(on_message)
        yield
        await connection.close()

    app = web.Application()
    app.router.add_get("/ws", handle)
    app.cleanup_ctx.append(consume)
    serve(app, args.port)


if __name__ == "__main__":
    main()
