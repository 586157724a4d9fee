"""``notifyd listen``: print a user's notifications as JSON lines, with :mod:`notifyd.client`.

A development and debugging tool: it mints a token for ``--user`` with the HS* secret
(as ``notifyd token`` does; a new one for each connection and each
``refresh_required``), or takes ``--token``; connects; and prints each notification
to stdout as one JSON line (the wire form without ``type``). What happens to the
connection goes to stderr. Ctrl-C or SIGTERM closes the socket and exits 0; a close
that reconnecting cannot help (``4001`` with ``--token``, ``4003``) exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Callable

from .client import Client, ConnectionClosed, Notification, State, StateEvent

DEFAULT_URL = "ws://127.0.0.1:8080/ws"


def _token_factory(args: argparse.Namespace, topics: list[str]) -> Callable[[], str] | str:
    """A function minting dev tokens for ``--user``, or an error message (str)."""
    from .auth import mint_token
    from .config import hs_secret_problem, load
    from .protocol import valid_name

    secret, algorithm = args.secret, "HS256"
    if secret is None:
        auth = load(getattr(args, "config", None)).auth
        secret, algorithm = auth.secret, auth.algorithms[0]
    if not secret or not algorithm.startswith("HS"):
        return "needs --token, or an HS* secret to mint one (--secret or [auth] secret)"
    problem = hs_secret_problem(secret, [algorithm])
    if problem:
        return f"secret: {problem}"
    if not args.user or not valid_name(args.user):
        return f"invalid or missing --user {args.user!r}"
    user, ttl = args.user, args.ttl

    def mint() -> str:
        return mint_token(secret, user, ttl, topics, (), algorithm)

    return mint


def _show(event: StateEvent) -> None:
    if event.state is State.OPEN:
        resumed = "" if event.resumed is None else f", resumed: {str(event.resumed).lower()}"
        print(f"notifyd listen: listening on {event.url}{resumed}", file=sys.stderr, flush=True)
    elif event.state is State.RECONNECTING:
        print(
            f"notifyd listen: connection ended ({event.code} {event.reason}), "
            f"reconnecting in {event.delay or 0:.1f} s",
            file=sys.stderr,
            flush=True,
        )


def _line(notification: Notification) -> str:
    return json.dumps(notification.to_dict(), ensure_ascii=False, separators=(",", ":"))


def run(args: argparse.Namespace) -> int:
    """The ``listen`` subcommand; returns the exit status."""
    topics = [t.removeprefix("topic:") for t in args.topic or []]
    factory: Callable[[], str] | None = None
    if args.token is None:
        made = _token_factory(args, topics)
        if isinstance(made, str):
            print(f"notifyd listen: {made}", file=sys.stderr)
            return 2
        factory = made

    async def main() -> int:
        client = Client(
            args.url,
            token=args.token,
            token_factory=factory,
            # A minted token lists the topics (joined at connect); a given one may only
            # allow them, so they are subscribed.
            topics=topics if args.token is not None else (),
            on_state=_show,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):  # Windows
                loop.add_signal_handler(sig, stop.set)

        async def pump() -> None:
            await client.connect()
            async for notification in client:
                print(_line(notification), flush=True)

        pumping = asyncio.create_task(pump())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({pumping, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        await client.close()
        try:
            await pumping
        except ConnectionClosed:
            pass  # why is asked below: a close() before welcome raises too
        except BrokenPipeError:  # `notifyd listen ... | head`
            return 0
        failure = await client.wait_closed()
        if failure is not None:
            print(f"notifyd listen: {failure}", file=sys.stderr)
            return 1
        return 0

    return asyncio.run(main())
