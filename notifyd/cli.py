"""``notifyd``: serve, publish, mint a dev token, check a config, run a dev broker."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import Any

from . import __version__
from .config import Settings, hs_secret_problem, load, require_token_keys
from .errors import ConfigError


def _settings(
    args: argparse.Namespace, overrides: dict[str, dict[str, Any]] | None = None
) -> Settings:
    return load(getattr(args, "config", None), overrides=overrides)


def _serve(args: argparse.Namespace) -> int:
    overrides: dict[str, dict[str, Any]] = {}
    for section, key, value in (
        ("server", "host", args.host),
        ("server", "port", args.port),
        ("server", "workers", args.workers),
        ("amqp", "url", args.amqp_url),
        ("demo", "enabled", True if args.demo else None),
    ):
        if value is not None:
            overrides.setdefault(section, {})[key] = value
    if args.amqp_url is not None:
        # The flag names one broker: it replaces a cluster's node list too.
        overrides["amqp"]["urls"] = []
    settings = _settings(args, overrides)
    require_token_keys(settings)
    from .app import run
    from .errors import ServeError

    try:
        run(settings)
    except ServeError as exc:
        print(f"notifyd: {exc}", file=sys.stderr)
        return 1
    return 0


def _publish(args: argparse.Namespace) -> int:
    from .publisher import Publisher

    try:
        data = json.loads(args.data)
    except json.JSONDecodeError as exc:
        print(f"notifyd publish: --data is not JSON: {exc}", file=sys.stderr)
        return 2
    url = args.amqp_url or _settings(args).amqp.node_urls[0]

    async def main() -> str:
        async with Publisher(url) as publisher:
            return await publisher.publish(
                data,
                user=args.user,
                topic=args.topic,
                broadcast=args.broadcast,
                event=args.event,
                message_id=args.id,
                ttl=args.ttl,
                receipt=args.receipt,
            )

    try:
        print(asyncio.run(main()))
    except ValueError as exc:
        print(f"notifyd publish: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"notifyd publish: cannot reach RabbitMQ: {exc}", file=sys.stderr)
        return 1
    return 0


def _token(args: argparse.Namespace) -> int:
    from .auth import mint_token
    from .protocol import valid_name

    secret = args.secret
    algorithm = "HS256"
    if secret is None:
        auth = _settings(args).auth
        secret, algorithm = auth.secret, auth.algorithms[0]
    if not secret or not algorithm.startswith("HS"):
        print("notifyd token: needs an HS* secret (--secret or [auth] secret)", file=sys.stderr)
        return 2
    # A token signed with a key `serve` would refuse is of no use to anyone.
    problem = hs_secret_problem(secret, [algorithm])
    if problem:
        print(f"notifyd token: secret: {problem}", file=sys.stderr)
        return 2
    if not valid_name(args.user):
        print(f"notifyd token: invalid user id {args.user!r}", file=sys.stderr)
        return 2

    def split(text: str | None) -> list[str]:
        return [t for t in (text or "").split(",") if t]

    extra = {"jti": args.jti} if args.jti else {}
    print(
        mint_token(
            secret, args.user, args.ttl, split(args.topics), split(args.publish), algorithm, **extra
        )
    )
    return 0


def _check_config(args: argparse.Namespace) -> int:
    from .config import redacted

    settings = _settings(args)
    # Credentials are masked: this output ends up in terminals, tickets and CI logs.
    print(json.dumps(redacted(settings), indent=2, default=list))
    try:
        require_token_keys(settings)
    except ConfigError as exc:
        print(f"config OK for publish/upstream; `notifyd serve` also needs: {exc}", file=sys.stderr)
    else:
        print("config OK", file=sys.stderr)
    return 0


def _upstream(args: argparse.Namespace) -> int:
    """Print what clients ``send`` as JSON lines: the example backend consumer."""
    import aio_pika

    from .amqp import UPSTREAM_EXCHANGE
    from .protocol import Channel

    url = args.amqp_url or _settings(args).amqp.node_urls[0]

    async def main() -> None:
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.declare_exchange(
                UPSTREAM_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
            )
            queue = await channel.declare_queue(exclusive=True)
            key = Channel.user(args.user).routing_key if args.user else "user.*"
            await queue.bind(exchange, key)
            print(f"listening on {UPSTREAM_EXCHANGE} (Ctrl-C to stop)", file=sys.stderr)
            async with queue.iterator() as messages:
                async for message in messages:
                    async with message.process():
                        print(message.body.decode(errors="replace"), flush=True)

    try:
        asyncio.run(main())
    except OSError as exc:
        print(f"notifyd upstream: cannot reach RabbitMQ: {exc}", file=sys.stderr)
        return 1
    return 0


def _webpush(args: argparse.Namespace) -> int:
    """Deliver notifications for offline users as Web Push (or make a VAPID key)."""
    from .vapid import b64url_encode, generate_private_key, private_key_pem, public_key_bytes

    if args.generate_vapid_key:
        key = generate_private_key()
        print(private_key_pem(key), end="")
        print(
            f"applicationServerKey (public): {b64url_encode(public_key_bytes(key))}\n"
            "set [webpush] vapid_private_key to the PEM above (a file path or its text)",
            file=sys.stderr,
        )
        return 0
    overrides: dict[str, dict[str, Any]] = {}
    if args.amqp_url is not None:
        overrides["amqp"] = {"url": args.amqp_url, "urls": []}
    if args.database_url is not None:
        overrides["webpush"] = {"database_url": args.database_url}
    settings = _settings(args, overrides)
    from .webpush import serve_worker

    try:
        asyncio.run(serve_worker(settings))
    except OSError as exc:
        print(f"notifyd webpush: {exc}", file=sys.stderr)
        return 1
    return 0


def _listen(args: argparse.Namespace) -> int:
    """Print a user's notifications as JSON lines (notifyd.client)."""
    from .listen import run

    return run(args)


def _dev_broker(args: argparse.Namespace) -> int:
    from .devbroker import run

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return run(args.dir, args.port, command)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="notifyd", description=__doc__)
    root.add_argument("--version", action="version", version=f"notifyd {__version__}")
    root.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    commands = root.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", "-c", help="TOML file (see config.example.toml)")
        return p

    serve = with_config(commands.add_parser("serve", help="run the gateway"))
    serve.add_argument("--host", help="[server] host")
    serve.add_argument("--port", type=int, help="[server] port")
    serve.add_argument("--workers", type=int, help="[server] workers (processes sharing the port)")
    serve.add_argument("--amqp-url", help="[amqp] url")
    serve.add_argument("--demo", action="store_true", help="serve the demo page ([demo] enabled)")
    serve.set_defaults(func=_serve)

    publish = with_config(commands.add_parser("publish", help="publish one notification"))
    target = publish.add_mutually_exclusive_group(required=True)
    target.add_argument("--user", help="user id (routing key user.<id>)")
    target.add_argument("--topic", help="topic name (routing key topic.<name>)")
    target.add_argument("--broadcast", action="store_true", help="everyone")
    publish.add_argument("--event", help="event name")
    publish.add_argument("--data", required=True, help="JSON payload")
    publish.add_argument("--id", help="message_id (default: generated, time-ordered)")
    publish.add_argument("--ttl", type=float, help="seconds after which it is not delivered")
    publish.add_argument("--receipt", action="store_true", help="ask for a delivery receipt")
    publish.add_argument("--amqp-url", help="[amqp] url")
    publish.set_defaults(func=_publish)

    token = with_config(commands.add_parser("token", help="mint a development token (HS*)"))
    token.add_argument("--user", required=True)
    token.add_argument("--topics", help="comma-separated topics the token may read")
    token.add_argument("--publish", help="comma-separated topics the token may publish to")
    token.add_argument("--ttl", type=int, default=3600, help="seconds (default 3600)")
    token.add_argument("--jti", help="token id (for revocation)")
    token.add_argument("--secret", help="HS secret (default: [auth] secret)")
    token.set_defaults(func=_token)

    upstream = with_config(
        commands.add_parser("upstream", help="print what clients send (JSON lines)")
    )
    upstream.add_argument("--user", help="only this user (default: everyone)")
    upstream.add_argument("--amqp-url", help="[amqp] url")
    upstream.set_defaults(func=_upstream)

    check = with_config(commands.add_parser("check-config", help="validate and print the settings"))
    check.set_defaults(func=_check_config)

    webpush = with_config(
        commands.add_parser(
            "webpush", help="deliver notifications for offline users as Web Push ([webpush])"
        )
    )
    webpush.add_argument(
        "--generate-vapid-key",
        action="store_true",
        help="print a new VAPID private key (PEM) and exit; its public key goes to stderr",
    )
    webpush.add_argument("--amqp-url", help="[amqp] url")
    webpush.add_argument("--database-url", help="[webpush] database_url")
    webpush.set_defaults(func=_webpush)

    listen = with_config(
        commands.add_parser("listen", help="print a user's notifications (JSON lines)")
    )
    listen.add_argument("--user", help="user id to mint a dev token for (HS*)")
    listen.add_argument(
        "--topic", action="append", help="a topic to read (repeat for more); 'news' or 'topic:news'"
    )
    listen.add_argument("--url", default="ws://127.0.0.1:8080/ws", help="notifyd's WebSocket URL")
    listen.add_argument("--token", help="use this JWT instead of minting one")
    listen.add_argument("--secret", help="HS secret to mint with (default: [auth] secret)")
    listen.add_argument("--ttl", type=int, default=3600, help="minted token lifetime, s")
    listen.set_defaults(func=_listen)

    dev = commands.add_parser(
        "dev-broker", help="run a private local RabbitMQ node for development"
    )
    dev.add_argument("--dir", help="data directory (default: a temporary one, removed at exit)")
    dev.add_argument("--port", type=int, default=5672, help="AMQP port (default 5672)")
    dev.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        help="-- COMMAND: run it once RabbitMQ is up (NOTIFYD_AMQP_URL set), stop both together",
    )
    dev.set_defaults(func=_dev_broker)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("aiormq").setLevel(logging.WARNING)
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
    try:
        code: int = args.func(args)
        return code
    except ConfigError as exc:
        print(f"notifyd: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
