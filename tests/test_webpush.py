"""Web Push for offline users (issue 16, part 2): subscriptions over HTTP, the worker.

Real parts: RabbitMQ (the session node), a real PostgreSQL (a private cluster started
here) and SQLite, notifyd's HTTP server, and a local RFC 8030 push service that
decrypts what it receives (RFC 8291, implemented here from the RFC with
``cryptography``, independently of the code under test) and checks the VAPID token
(RFC 8292). The real push services are unreachable from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from notifyd.amqp import OFFLINE_EXCHANGE, OFFLINE_QUEUE, Delivery
from notifyd.config import WebPushSettings, load
from notifyd.errors import ConfigError
from notifyd.protocol import Channel, IdGenerator
from notifyd.push_api import endpoint_allowed
from notifyd.pushstore import PushStore, Subscription, open_store, sqlite_path
from notifyd.vapid import (
    MAX_PLAINTEXT,
    Vapid,
    b64url_decode,
    b64url_encode,
    generate_private_key,
    load_private_key,
    private_key_pem,
    public_key_bytes,
)
from notifyd.webpush import WebPushWorker, backoff, push_payload

from .conftest import (
    Server,
    ServerFactory,
    amqp_publisher,
    free_port,
    new_user,
    receive_until,
    settings_for,
    token,
)

VAPID_KEY = generate_private_key()
VAPID_PEM = private_key_pem(VAPID_KEY)
SUBJECT = "mailto:ops@example.com"


# --- a real PostgreSQL -----------------------------------------------------------------


class Postgres:
    """A private PostgreSQL cluster in a temporary directory, on a free port."""

    def __init__(self) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not found:
            pytest.skip("PostgreSQL is not installed (make setup-test installs it)")
        self.bin = Path(found[-1]).parent
        # Its own directory: pytest's are not searchable by the postgres user.
        self.dir = Path(tempfile.mkdtemp(prefix="notifyd-pg-"))
        self.dir.chmod(0o755)
        self.data = self.dir / "data"
        self.port = free_port()
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            # PostgreSQL refuses to run as root; the Debian package made this user.
            user = "postgres" if _user_exists("postgres") else "nobody"
            shutil.chown(self.dir, user)
            self.prefix = ["runuser", "-u", user, "--"]

    @property
    def url(self) -> str:
        return f"postgresql://notifyd@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            [*self.prefix, *args], capture_output=True, text=True, timeout=60, check=False
        )
        if result.returncode != 0:
            log = self.dir / "postgres.log"
            raise RuntimeError(
                f"{args[0]} failed: {result.stdout}{result.stderr}\n"
                f"{log.read_text() if log.exists() else ''}"
            )

    def start(self) -> None:
        self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "-U", "notifyd",
            "--auth=trust", "-E", "UTF8", "--no-sync",
        )  # fmt: skip
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c full_page_writes=off -c synchronous_commit=off"
        )
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "postgres.log"),
            "-w", "-t", "60", "-o", options, "start",
        )  # fmt: skip

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    node = Postgres()
    try:
        node.start()
        yield node
    finally:
        node.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/push.sqlite3"
    node: Postgres = request.getfixturevalue("postgres")
    return node.url


# --- a browser's subscription and a push service that decrypts --------------------------


@dataclass
class Browser:
    """What a browser keeps for one push subscription (RFC 8291 §2)."""

    endpoint: str
    key: ec.EllipticCurvePrivateKey = field(default_factory=generate_private_key)
    auth: bytes = field(default_factory=lambda: os.urandom(16))

    def subscription(self) -> dict[str, Any]:
        """``PushSubscription.toJSON()``."""
        return {
            "endpoint": self.endpoint,
            "expirationTime": None,
            "keys": {
                "p256dh": b64url_encode(public_key_bytes(self.key)),
                "auth": b64url_encode(self.auth),
            },
        }

    def decrypt(self, body: bytes) -> bytes:
        """RFC 8291 §3.4 key derivation over an RFC 8188 aes128gcm body, one record."""
        salt, rs, idlen = body[:16], int.from_bytes(body[16:20], "big"), body[20]
        sender_public = body[21 : 21 + idlen]
        ciphertext = body[21 + idlen :]
        assert idlen == 65 and rs >= 18 and len(ciphertext) <= rs, (idlen, rs, len(ciphertext))
        sender = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), sender_public)
        ecdh_secret = self.key.exchange(ec.ECDH(), sender)
        key_info = b"WebPush: info\x00" + public_key_bytes(self.key) + sender_public
        ikm = HKDF(hashes.SHA256(), 32, salt=self.auth, info=key_info).derive(ecdh_secret)
        cek = HKDF(hashes.SHA256(), 16, salt=salt, info=b"Content-Encoding: aes128gcm\x00").derive(
            ikm
        )
        nonce = HKDF(hashes.SHA256(), 12, salt=salt, info=b"Content-Encoding: nonce\x00").derive(
            ikm
        )
        padded = AESGCM(cek).decrypt(nonce, ciphertext, None)
        unpadded = padded.rstrip(b"\x00")
        assert unpadded[-1:] == b"\x02", "last record must end with delimiter 0x02"
        return unpadded[:-1]


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    plaintext: bytes | None
    claims: dict[str, Any]


class PushService:
    """A local RFC 8030 push service: answers each endpoint as told, checks everything."""

    def __init__(self) -> None:
        self.browsers: dict[str, Browser] = {}
        self.statuses: dict[str, list[int]] = {}
        self.received: dict[str, list[Received]] = {}
        self.errors: list[str] = []
        self.changed = asyncio.Condition()
        self.server: TestServer | None = None

    @property
    def origin(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    def browser(self, *statuses: int) -> Browser:
        """A new subscription whose endpoint answers ``statuses`` in turn (the last repeats)."""
        name = uuid.uuid4().hex
        browser = Browser(f"{self.origin}/push/{name}")
        self.browsers[name] = browser
        self.statuses[name] = list(statuses or (201,))
        self.received[name] = []
        return browser

    def _check(self, request: web.Request, body: bytes) -> tuple[bytes | None, dict[str, Any]]:
        name = request.match_info["name"]
        browser = self.browsers[name]
        assert request.headers["Content-Encoding"] == "aes128gcm"
        assert int(request.headers["TTL"]) >= 0
        assert request.headers.get("Urgency") in {"very-low", "low", "normal", "high"}
        scheme, _, params = request.headers["Authorization"].partition(" ")
        assert scheme == "vapid", request.headers["Authorization"]
        fields = dict(part.strip().split("=", 1) for part in params.split(","))
        assert b64url_decode(fields["k"]) == public_key_bytes(VAPID_KEY)
        public = ec.EllipticCurvePublicKey.from_encoded_point(
            ec.SECP256R1(), b64url_decode(fields["k"])
        )
        assert jwt.get_unverified_header(fields["t"])["alg"] == "ES256"
        claims: dict[str, Any] = jwt.decode(
            fields["t"], public, algorithms=["ES256"], audience=self.origin
        )
        assert claims["sub"] == SUBJECT
        assert time.time() < claims["exp"] <= time.time() + 24 * 3600
        assert len(body) <= 4096, len(body)
        return browser.decrypt(body), claims

    async def handle(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.browsers:
            return web.Response(status=404)
        body = await request.read()
        try:
            plaintext, claims = self._check(request, body)
        except Exception as exc:  # shown by the test that waits for this request
            self.errors.append(f"{type(exc).__name__}: {exc}")
            plaintext, claims = None, {}
        statuses = self.statuses[name]
        status = statuses.pop(0) if len(statuses) > 1 else statuses[0]
        async with self.changed:
            self.received[name].append(Received(dict(request.headers), body, plaintext, claims))
            self.changed.notify_all()
        headers = {"Location": f"{self.origin}/message/{uuid.uuid4().hex}"} if status == 201 else {}
        return web.Response(status=status, headers=headers)

    async def wait_for(self, browser: Browser, count: int, timeout: float = 10) -> list[Received]:
        name = browser.endpoint.rsplit("/", 1)[1]
        async with asyncio.timeout(timeout), self.changed:
            await self.changed.wait_for(lambda: len(self.received[name]) >= count)
        assert not self.errors, self.errors
        return self.received[name]

    def requests(self, browser: Browser) -> list[Received]:
        return self.received[browser.endpoint.rsplit("/", 1)[1]]


@pytest.fixture
async def push_service() -> AsyncIterator[PushService]:
    service = PushService()
    app = web.Application()
    app.router.add_post("/push/{name}", service.handle)
    service.server = TestServer(app, host="127.0.0.1")
    await service.server.start_server()
    yield service
    await service.server.close()


# --- notifyd: the gateway and the worker ------------------------------------------------


def webpush_settings(database_url: str, **more: Any) -> dict[str, Any]:
    return {
        "database_url": database_url,
        "vapid_private_key": VAPID_PEM,
        "vapid_subject": SUBJECT,
        "allow_http": True,
        "endpoint_hosts": ["127.0.0.1"],
        "retry_min": 0.01,
        "retry_max": 0.05,
        "max_attempts": 3,
        **more,
    }


WorkerFactory = Callable[..., Awaitable[WebPushWorker]]


@pytest.fixture
async def start_worker(amqp_url: str) -> AsyncIterator[WorkerFactory]:
    started: list[tuple[WebPushWorker, asyncio.Task[None]]] = []

    async def factory(database_url: str, **more: Any) -> WebPushWorker:
        settings = settings_for(amqp_url, webpush=webpush_settings(database_url, **more))
        worker = WebPushWorker(settings)
        task = asyncio.create_task(worker.run())
        started.append((worker, task))
        ready = asyncio.create_task(worker.ready.wait())
        await asyncio.wait([ready, task], timeout=20, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # raises what stopped it
        assert ready.done(), "the worker did not start consuming"
        return worker

    yield factory
    for worker, task in started:
        worker.stop()
        await asyncio.wait_for(task, 30)


@contextlib.asynccontextmanager
async def offline_publisher(url: str) -> AsyncIterator[Any]:
    """What the gateway's offline hook publishes, as any AMQP client would."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(
            OFFLINE_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )

        async def publish(user: str, body: Any, **properties: Any) -> None:
            payload = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers = {"notifyd-offline": True, **properties.pop("headers", {})}
            message = aio_pika.Message(payload, headers=headers, **properties)
            await exchange.publish(message, f"user.{user}")

        yield publish
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def dead_letters(
    url: str,
) -> AsyncIterator[asyncio.Queue[aio_pika.abc.AbstractIncomingMessage]]:
    """Every message published to notifyd.dlx from now on (a queue of our own)."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            "notifyd.dlx", aio_pika.ExchangeType.FANOUT, durable=True
        )
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange)
        received: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.ack()
            received.put_nowait(message)

        await queue.consume(on_message)
        yield received
    finally:
        await connection.close()


async def next_dead_letter(
    received: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage],
    message_id: str,
    timeout: float = 10,
) -> aio_pika.abc.AbstractIncomingMessage:
    async with asyncio.timeout(timeout):
        while True:
            message = await received.get()
            if message.message_id == message_id:
                return message


async def subscribe(server: Server, user: str, browser: Browser) -> None:
    async with server.http.post(
        f"{server.base}/api/push/subscriptions",
        json=browser.subscription(),
        headers={"Authorization": f"Bearer {token(user)}"},
    ) as response:
        assert response.status == 201, await response.text()


async def wait_until(condition: Callable[[], Awaitable[bool]], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.05)


async def push_server(make_server: ServerFactory, database_url: str, **more: Any) -> Server:
    return await make_server(webpush=webpush_settings(database_url, **more))


# --- end to end -------------------------------------------------------------------------


async def test_offline_notification_arrives_encrypted_at_every_subscription(
    make_server: ServerFactory,
    start_worker: WorkerFactory,
    push_service: PushService,
    database_url: str,
    amqp_url: str,
) -> None:
    server = await push_server(make_server, database_url)
    alice, bob = new_user("alice"), new_user("bob")
    phone, laptop, other = push_service.browser(), push_service.browser(), push_service.browser()
    await subscribe(server, alice, phone)
    await subscribe(server, alice, laptop)
    await subscribe(server, bob, other)
    await start_worker(database_url)

    body = {"event": "order.shipped", "data": {"order": 7, "title": "Shipped", "note": "é ✓"}}
    async with offline_publisher(amqp_url) as publish:
        await publish(alice, body, message_id="wp-1", headers={"x-trace": "abc"})

    for browser in (phone, laptop):
        (received,) = await push_service.wait_for(browser, 1)
        assert received.plaintext is not None
        message = json.loads(received.plaintext)
        assert message == {
            "type": "notification",
            "id": "wp-1",
            "channel": f"user:{alice}",
            "event": "order.shipped",
            "data": body["data"],
            "ts": message["ts"],
        }
        assert abs(message["ts"] / 1000 - time.time()) < 10
        assert received.claims["aud"] == push_service.origin
        assert received.headers["TTL"] == "86400"
    await asyncio.sleep(0.3)
    assert push_service.requests(other) == []


async def test_a_user_offline_on_every_replica_gets_a_push_through_the_offline_hook(
    make_server: ServerFactory,
    start_worker: WorkerFactory,
    push_service: PushService,
    database_url: str,
    amqp_url: str,
) -> None:
    """End to end, nothing published to notifyd.offline by hand: two replicas, a
    notification published to ``notifyd`` for a user online on one of them reaches
    the socket and no push service; once the user left (and the grace is over) the
    next one goes through the offline hook to the worker and arrives decrypted."""
    settings = {"ws": {"binding_grace": 0.5}, "history": {"backend": "off"}}
    push = webpush_settings(database_url)
    replica_a = await make_server(webpush=push, **settings)
    replica_b = await make_server(webpush=push, **settings)
    user = new_user("roamer")
    browser = push_service.browser()
    await subscribe(replica_b, user, browser)
    await start_worker(database_url)
    async with amqp_publisher(amqp_url) as amqp:
        ws, _ = await replica_a.connect(user)
        await amqp.send(f"user.{user}", {"data": "live"}, message_id=f"{user}-live")
        assert (await receive_until(ws, "notification"))["data"] == "live"
        await ws.close()
        key = f"user.{user}"

        async def released_everywhere() -> bool:
            replicas = (replica_a, replica_b)
            return all(key not in r.gateway.broker.bindings.bound for r in replicas)

        await wait_until(released_everywhere)
        await amqp.send(f"user.{user}", {"data": "away"}, message_id=f"{user}-away")
        (received,) = await push_service.wait_for(browser, 1)
    assert received.plaintext is not None
    message = json.loads(received.plaintext)
    assert (message["id"], message["data"]) == (f"{user}-away", "away")
    await asyncio.sleep(0.3)
    assert len(push_service.requests(browser)) == 1, "the live one was pushed too"


async def test_expired_subscriptions_are_deleted(
    make_server: ServerFactory,
    start_worker: WorkerFactory,
    push_service: PushService,
    database_url: str,
    amqp_url: str,
) -> None:
    server = await push_server(make_server, database_url)
    user = new_user()
    gone, not_found, alive = (
        push_service.browser(410),
        push_service.browser(404),
        push_service.browser(201),
    )
    for browser in (gone, not_found, alive):
        await subscribe(server, user, browser)
    worker = await start_worker(database_url)
    assert worker.store is not None
    assert len(await worker.store.for_user(user)) == 3

    async with dead_letters(amqp_url) as dead, offline_publisher(amqp_url) as publish:
        await publish(user, {"data": "hello"}, message_id="wp-gone")
        for browser in (gone, not_found, alive):
            await push_service.wait_for(browser, 1)

        async def only_alive_left() -> bool:
            assert worker.store is not None
            left = await worker.store.for_user(user)
            return [s.endpoint for s in left] == [alive.endpoint]

        await wait_until(only_alive_left)
        # Gone is not a failure: nothing is dead-lettered, and they are never tried again.
        await publish(user, {"data": "again"}, message_id="wp-gone-2")
        await push_service.wait_for(alive, 2)
        await asyncio.sleep(0.3)
        assert dead.empty()
    assert len(push_service.requests(gone)) == len(push_service.requests(not_found)) == 1


async def test_failures_are_retried_then_dead_lettered(
    make_server: ServerFactory,
    start_worker: WorkerFactory,
    push_service: PushService,
    database_url: str,
    amqp_url: str,
) -> None:
    server = await push_server(make_server, database_url)
    user = new_user()
    broken, flaky, fine = (
        push_service.browser(500),
        push_service.browser(503, 429, 201),
        push_service.browser(201),
    )
    for browser in (broken, flaky, fine):
        await subscribe(server, user, browser)
    await start_worker(database_url, max_attempts=3)

    async with dead_letters(amqp_url) as dead, offline_publisher(amqp_url) as publish:
        await publish(
            user, {"event": "e", "data": [1, 2]}, message_id="wp-500", headers={"x-k": "v"}
        )
        letter = await next_dead_letter(dead, "wp-500")
    headers = dict(letter.headers or {})
    assert headers["notifyd-reason"] == "webpush_failed"
    assert "1 of 3 subscriptions failed: HTTP 500" in str(headers["notifyd-detail"])
    assert "after 3 attempts" in str(headers["notifyd-detail"])
    assert headers["notifyd-routing-key"] == f"user.{user}"
    assert str(headers["notifyd-replica"]).startswith("webpush-")
    assert headers["x-k"] == "v" and headers["notifyd-offline"] is True
    assert json.loads(letter.body) == {"event": "e", "data": [1, 2]}
    assert len(push_service.requests(broken)) == 3
    flaky_requests = push_service.requests(flaky)
    assert len(flaky_requests) == 3 and len(push_service.requests(fine)) == 1
    # The same message each time, freshly encrypted.
    assert len({r.body for r in flaky_requests}) == 3
    assert len({r.plaintext for r in flaky_requests}) == 1
    # A failing subscription is kept (it may recover); only 404/410 delete one.
    async with open_store(database_url) as store:
        assert len(await store.for_user(user)) == 3


async def test_bad_messages_are_dead_lettered_and_the_worker_goes_on(
    start_worker: WorkerFactory, push_service: PushService, tmp_path: Path, amqp_url: str
) -> None:
    database_url = f"sqlite:///{tmp_path}/push.sqlite3"
    user = new_user()
    browser = push_service.browser()
    worker = await start_worker(database_url)
    assert worker.store is not None
    await worker.store.add(Subscription(browser.endpoint, user, **browser.subscription()["keys"]))
    async with dead_letters(amqp_url) as dead, offline_publisher(amqp_url) as publish:
        await publish(user, b"not json", message_id="wp-bad")
        letter = await next_dead_letter(dead, "wp-bad")
        assert dict(letter.headers or {})["notifyd-reason"] == "not_json"
        await publish(user, {"data": "fine"}, message_id="wp-fine")
        (received,) = await push_service.wait_for(browser, 1)
    assert received.plaintext is not None and json.loads(received.plaintext)["data"] == "fine"


async def test_a_notification_too_big_for_a_push_message_goes_without_its_data(
    start_worker: WorkerFactory, push_service: PushService, tmp_path: Path, amqp_url: str
) -> None:
    database_url = f"sqlite:///{tmp_path}/push.sqlite3"
    user = new_user()
    browser = push_service.browser()
    worker = await start_worker(database_url)
    assert worker.store is not None
    await worker.store.add(Subscription(browser.endpoint, user, **browser.subscription()["keys"]))
    async with offline_publisher(amqp_url) as publish:
        await publish(user, {"event": "big", "data": "x" * 10_000}, message_id="wp-big")
        (received,) = await push_service.wait_for(browser, 1)
    assert received.plaintext is not None
    message = json.loads(received.plaintext)
    assert message["truncated"] is True and "data" not in message
    assert message["id"] == "wp-big" and message["event"] == "big"


async def test_expired_notifications_are_not_pushed_and_ttl_follows_expiration(
    start_worker: WorkerFactory, push_service: PushService, tmp_path: Path, amqp_url: str
) -> None:
    database_url = f"sqlite:///{tmp_path}/push.sqlite3"
    user = new_user()
    browser = push_service.browser()
    worker = await start_worker(database_url)
    assert worker.store is not None
    await worker.store.add(Subscription(browser.endpoint, user, **browser.subscription()["keys"]))
    async with offline_publisher(amqp_url) as publish:
        await publish(
            user, {"data": "old"}, message_id="wp-old", timestamp=time.time() - 600, expiration=60
        )
        await publish(user, {"data": "soon"}, message_id="wp-soon", expiration=120)
        (received,) = await push_service.wait_for(browser, 1)
    assert received.plaintext is not None and json.loads(received.plaintext)["id"] == "wp-soon"
    assert 100 <= int(received.headers["TTL"]) <= 120


# --- the HTTP API -----------------------------------------------------------------------


async def test_subscribe_and_unsubscribe_over_http(
    make_server: ServerFactory, push_service: PushService, database_url: str
) -> None:
    server = await push_server(make_server, database_url)
    user, other = new_user(), new_user()
    browser = push_service.browser()
    async with server.http.get(f"{server.base}/api/push/vapid-public-key") as response:
        assert response.status == 200
        assert (await response.json())["publicKey"] == b64url_encode(public_key_bytes(VAPID_KEY))
    await subscribe(server, user, browser)
    await subscribe(server, user, browser)  # again: replaced, not doubled
    async with open_store(database_url) as store:
        assert [s.endpoint for s in await store.for_user(user)] == [browser.endpoint]
        url = f"{server.base}/api/push/subscriptions"
        body = {"endpoint": browser.endpoint}
        # Another user cannot delete it.
        async with server.http.delete(url, json=body, headers=auth(other)) as response:
            assert response.status == 200 and await response.json() == {"deleted": False}
        assert len(await store.for_user(user)) == 1
        async with server.http.delete(url, json=body, headers=auth(user)) as response:
            assert response.status == 200 and await response.json() == {"deleted": True}
        assert await store.for_user(user) == []
        # The same browser, now used by another user: the endpoint moves with it.
        await subscribe(server, user, browser)
        await subscribe(server, other, browser)
        assert await store.for_user(user) == []
        assert len(await store.for_user(other)) == 1


async def test_a_user_keeps_their_newest_subscriptions(
    make_server: ServerFactory, push_service: PushService, database_url: str
) -> None:
    server = await push_server(make_server, database_url, max_subscriptions_per_user=2)
    user = new_user()
    browsers = [push_service.browser() for _ in range(3)]
    for browser in browsers:
        await subscribe(server, user, browser)
        await asyncio.sleep(0.01)
    async with open_store(database_url) as store:
        kept = [s.endpoint for s in await store.for_user(user)]
    assert kept == [browsers[2].endpoint, browsers[1].endpoint]


def auth(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(user)}"}


async def test_api_errors_are_json_and_clear(
    make_server: ServerFactory, push_service: PushService, tmp_path: Path
) -> None:
    server = await push_server(make_server, f"sqlite:///{tmp_path}/push.sqlite3")
    url = f"{server.base}/api/push/subscriptions"
    user = new_user()
    good = push_service.browser().subscription()

    def variant(**changes: Any) -> dict[str, Any]:
        keys = {**good["keys"], **changes.pop("keys", {})}
        return {**good, "keys": keys, **changes}

    cases: list[tuple[dict[str, str], Any, int, str, str]] = [
        ({}, good, 401, "unauthorized", "Bearer"),
        ({"Authorization": "Bearer not-a-jwt"}, good, 401, "unauthorized", "malformed"),
        ({"Authorization": f"Bearer {token(user, ttl=-60)}"}, good, 401, "unauthorized", "expired"),
        (auth(user), "[1, 2", 400, "bad_json", "JSON"),
        (auth(user), [1, 2], 400, "invalid_subscription", "object"),
        (auth(user), variant(endpoint=None), 400, "invalid_subscription", "endpoint"),
        (auth(user), variant(endpoint="ftp://127.0.0.1/x"), 400, "invalid_subscription", "https"),
        (
            auth(user),
            variant(endpoint="https://internal.example/x"),
            400,
            "invalid_subscription",
            "endpoint_hosts",
        ),
        (auth(user), variant(keys={"p256dh": "AAAA"}), 400, "invalid_subscription", "p256dh"),
        (
            auth(user),
            variant(keys={"p256dh": "BA" + "A" * 85}),
            400,
            "invalid_subscription",
            "p256dh",
        ),
        (auth(user), variant(keys={"auth": "c2hvcnQ"}), 400, "invalid_subscription", "auth"),
        (auth(user), variant(keys={"auth": 12}), 400, "invalid_subscription", "auth"),
        (auth(user), variant(endpoint=good["endpoint"] + "x" * 5000), 413, "too_big", "4096"),
    ]
    for headers, body, status, code, words in cases:
        data = body if isinstance(body, str) else json.dumps(body)
        async with server.http.post(url, data=data, headers=headers) as response:
            answer = await response.json()
            assert (response.status, answer["error"]) == (status, code), (body, answer)
            assert words in answer["message"], (words, answer)
            assert "Traceback" not in json.dumps(answer)
    async with server.http.delete(url, json={"nope": 1}, headers=auth(user)) as response:
        assert response.status == 400 and (await response.json())["error"] == "invalid_subscription"


async def test_push_routes_answer_cors_and_serve_the_service_worker(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    server = await push_server(make_server, f"sqlite:///{tmp_path}/push.sqlite3")
    headers = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    async with server.http.options(
        f"{server.base}/api/push/subscriptions", headers=headers
    ) as response:
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert "Authorization" in response.headers["Access-Control-Allow-Headers"]
    async with server.http.get(f"{server.base}/notifyd-sw.js") as response:
        assert response.status == 200
        assert response.content_type == "text/javascript"
        assert "showNotification" in await response.text()


async def test_without_a_vapid_key_there_are_no_push_routes(server: Server) -> None:
    async with server.http.get(f"{server.base}/api/push/vapid-public-key") as response:
        assert response.status == 404


def test_the_javascript_is_valid(tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    static = Path(__file__).parent.parent / "notifyd" / "static"
    module = tmp_path / "notifyd.mjs"
    module.write_text((static / "notifyd.js").read_text())
    for path in (module, static / "notifyd-sw.js"):
        checked = subprocess.run(
            [node, "--check", str(path)], capture_output=True, text=True, check=False
        )
        assert checked.returncode == 0, checked.stderr


# --- the pieces -------------------------------------------------------------------------


async def test_the_store_is_the_same_on_both_databases(database_url: str) -> None:
    user = new_user()
    browser = Browser("https://fcm.googleapis.com/fcm/send/" + uuid.uuid4().hex)
    keys = browser.subscription()["keys"]
    async with open_store(database_url, max_per_user=3) as store:
        subscription = Subscription(browser.endpoint, user, keys["p256dh"], keys["auth"])
        await store.add(subscription)
        await store.add(subscription)
        assert await store.for_user(user) == [subscription]
        other_keys = Subscription(browser.endpoint, user, keys["p256dh"][::-1], keys["auth"])
        assert not await store.expire(other_keys)  # re-registered since: kept
        assert await store.expire(subscription)
        assert await store.for_user(user) == []
        assert not await store.remove(user, browser.endpoint)
    # Opening it again (the table exists) is fine.
    async with open_store(database_url) as store:
        assert await store.count() >= 0


def test_endpoint_hosts() -> None:
    settings = WebPushSettings()
    allowed = [
        "https://fcm.googleapis.com/fcm/send/abc",
        "https://updates.push.services.mozilla.com/wpush/v2/abc",
        "https://wns2-par02p.notify.windows.com/w/?token=abc",
        "https://web.push.apple.com/QAbc",
    ]
    for url in allowed:
        assert endpoint_allowed(url, settings) is None, url
    refused = [
        "http://fcm.googleapis.com/fcm/send/abc",
        "https://fcm.googleapis.com.evil.example/x",
        "https://evilnotify.windows.com/x",
        "https://user:pw@fcm.googleapis.com/x",
        "https://169.254.169.254/latest/meta-data",
        "https://fcm.googleapis.com:99999/x",
        "not a url",
    ]
    for url in refused:
        assert endpoint_allowed(url, settings) is not None, url
    anything = WebPushSettings(endpoint_hosts=())
    assert endpoint_allowed("https://push.example/x", anything) is None


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    settings = WebPushSettings(retry_min=1.0, retry_max=8.0)
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (10, 8.0)]:
        delays = [backoff(attempt, settings) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), attempt
        assert len(set(delays)) > 100
    assert backoff(1, settings, retry_after=5) == 5
    assert backoff(1, settings, retry_after=3600) == 8.0


def test_push_payload_fits_a_push_message() -> None:
    def decoded(data: Any) -> Any:
        body = json.dumps({"event": "e", "data": data}).encode()
        delivery = Delivery("user.u1", body, message_id="m")
        return delivery.notification(ids=IdGenerator(), max_body_size=1 << 20, now=time.time())

    for size in (10, 200, 70_000):
        payload, truncated = push_payload(decoded("x" * size))
        message = json.loads(payload)
        assert message["channel"] == "user:u1" and message["id"] == "m"
        assert truncated == (size > MAX_PLAINTEXT) and len(payload) <= MAX_PLAINTEXT
        assert ("data" in message) != truncated
    assert decoded(1).channel == Channel("user", "u1")


def test_vapid_keys_load_from_pem_file_or_raw_and_tokens_are_reused(tmp_path: Path) -> None:
    path = tmp_path / "vapid.pem"
    path.write_text(VAPID_PEM)
    raw = b64url_encode(VAPID_KEY.private_numbers().private_value.to_bytes(32, "big"))
    for value in (VAPID_PEM, str(path), raw):
        assert public_key_bytes(load_private_key(value)) == public_key_bytes(VAPID_KEY)
    rsa = tmp_path / "rsa.pem"
    from cryptography.hazmat.primitives.asymmetric import rsa as rsa_keys

    rsa.write_bytes(
        rsa_keys.generate_private_key(65537, 2048).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    for bad, message in [
        (str(tmp_path / "missing.pem"), "cannot read"),
        (str(rsa), "must be a P-256"),
        ("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----", "not a PEM"),
    ]:
        with pytest.raises(ConfigError, match=r"\[webpush\] vapid_private_key: " + message):
            load_private_key(bad)
    vapid = Vapid(VAPID_KEY, SUBJECT)
    first = vapid.authorization("https://fcm.googleapis.com/fcm/send/a", now=1000)
    assert vapid.authorization("https://fcm.googleapis.com/fcm/send/b", now=2000) == first
    assert vapid.authorization("https://fcm.googleapis.com/x", now=1000 + 12 * 3600) != first
    assert vapid.authorization("https://web.push.apple.com/x", now=1000) != first


def test_webpush_settings_from_environment_and_their_checks() -> None:
    settings = load(
        environ={
            "NOTIFYD_WEBPUSH_DATABASE_URL": "postgresql://notifyd:pg-pass-77@db:5432/notifyd",
            "NOTIFYD_WEBPUSH_MAX_ATTEMPTS": "7",
            "NOTIFYD_WEBPUSH_ENDPOINT_HOSTS": "push.example,.push.example",
            "NOTIFYD_WEBPUSH_TTL": "60",
            "NOTIFYD_WEBPUSH_VAPID_SUBJECT": SUBJECT,
        }
    )
    assert settings.webpush.max_attempts == 7 and settings.webpush.ttl == 60
    assert settings.webpush.endpoint_hosts == ("push.example", ".push.example")
    from notifyd.config import redacted

    shown = redacted(settings)["webpush"]
    assert shown["database_url"] == "postgresql://notifyd:***@db:5432/notifyd"
    for key, value, message in [
        ("DATABASE_URL", "mysql://x", "database_url"),
        ("VAPID_SUBJECT", "ops@example.com", "vapid_subject"),
        ("MAX_ATTEMPTS", "0", "max_attempts"),
        ("RETRY_MIN", "100", "retry_min"),
        ("URGENCY", "urgent", "urgency"),
        ("ENDPOINT_HOSTS", "https://push.example/", "endpoint_hosts"),
    ]:
        with pytest.raises(ConfigError, match=rf"\[webpush\] {message}"):
            load(environ={f"NOTIFYD_WEBPUSH_{key}": value})
    assert sqlite_path("sqlite:///rel/push.db") == "rel/push.db"
    assert sqlite_path("sqlite:////abs/push.db") == "/abs/push.db"


def test_the_worker_needs_a_subject(amqp_url: str) -> None:
    settings = settings_for(amqp_url, webpush={"vapid_private_key": VAPID_PEM})
    with pytest.raises(ConfigError, match=r"\[webpush\] vapid_subject: required"):
        WebPushWorker(settings)


def test_generate_vapid_key_from_the_command_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "notifyd", "webpush", "--generate-vapid-key"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    key = load_private_key(done.stdout)
    assert b64url_encode(public_key_bytes(key)) in done.stderr


async def test_the_worker_uses_a_queue_declared_otherwise(
    amqp_url: str, start_worker: WorkerFactory, push_service: PushService, tmp_path: Path
) -> None:
    """The gateway's offline hook may declare notifyd.offline first, with arguments of
    its own (here: classic, bounded): the worker binds and consumes it as it is."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(OFFLINE_QUEUE)
        await channel.declare_queue(
            OFFLINE_QUEUE, durable=True, arguments={"x-max-length": 100_000}
        )
        try:
            user, browser = new_user(), push_service.browser()
            worker = await start_worker(f"sqlite:///{tmp_path}/push.sqlite3")
            assert worker.store is not None
            keys = browser.subscription()["keys"]
            await worker.store.add(Subscription(browser.endpoint, user, **keys))
            async with offline_publisher(amqp_url) as publish:
                await publish(user, {"data": "via a classic queue"}, message_id="wp-classic")
                (received,) = await push_service.wait_for(browser, 1)
            assert received.plaintext is not None
            assert json.loads(received.plaintext)["data"] == "via a classic queue"
        finally:
            channel = await connection.channel()
            await channel.queue_delete(OFFLINE_QUEUE)  # the next worker declares its own


async def test_the_worker_declares_everything_again_when_its_queue_goes(
    amqp_url: str, start_worker: WorkerFactory, push_service: PushService, tmp_path: Path
) -> None:
    user, browser = new_user(), push_service.browser()
    worker = await start_worker(f"sqlite:///{tmp_path}/push.sqlite3")
    assert worker.store is not None
    await worker.store.add(Subscription(browser.endpoint, user, **browser.subscription()["keys"]))
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(OFFLINE_QUEUE)  # RabbitMQ cancels the worker's consumer

    async def consuming_again() -> bool:
        return worker.ready.is_set() and await queue_has_consumer(amqp_url)

    await wait_until(consuming_again, timeout=20)
    async with offline_publisher(amqp_url) as publish:
        await publish(user, {"data": "after"}, message_id="wp-after")
        (received,) = await push_service.wait_for(browser, 1)
    assert received.plaintext is not None and json.loads(received.plaintext)["data"] == "after"


async def queue_has_consumer(amqp_url: str) -> bool:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(OFFLINE_QUEUE, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return False
        return bool(queue.declaration_result.consumer_count)


async def test_the_gateway_serves_while_the_database_is_unreachable(
    make_server: ServerFactory, push_service: PushService, monkeypatch: pytest.MonkeyPatch
) -> None:
    from notifyd import push_api

    monkeypatch.setattr(push_api, "STORE_WAIT", 0.2)
    server = await push_server(make_server, f"postgresql://nobody@127.0.0.1:{free_port()}/none")
    ws, welcome = await server.connect(new_user())
    assert welcome["type"] == "welcome"
    await ws.close()
    async with server.http.post(
        f"{server.base}/api/push/subscriptions",
        json=push_service.browser().subscription(),
        headers=auth(new_user()),
    ) as response:
        assert response.status == 503
        assert (await response.json())["error"] == "unavailable"


async def test_notifyd_webpush_runs_as_a_process_and_stops_on_sigterm(
    amqp_url: str, push_service: PushService, tmp_path: Path
) -> None:
    """The command an operator runs: settings from the environment, metrics on
    [server] metrics_port, a clean exit on SIGTERM."""
    database_url = f"sqlite:///{tmp_path}/push.sqlite3"
    user, browser = new_user(), push_service.browser()
    async with open_store(database_url) as store:
        await store.add(Subscription(browser.endpoint, user, **browser.subscription()["keys"]))
    metrics_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFYD_")}
    env.update({
        "NOTIFYD_AMQP_URL": amqp_url,
        "NOTIFYD_SERVER_METRICS_PORT": str(metrics_port),
        "NOTIFYD_WEBPUSH_DATABASE_URL": database_url,
        "NOTIFYD_WEBPUSH_VAPID_PRIVATE_KEY": VAPID_PEM,
        "NOTIFYD_WEBPUSH_VAPID_SUBJECT": SUBJECT,
        "NOTIFYD_WEBPUSH_ALLOW_HTTP": "true",
        "NOTIFYD_WEBPUSH_ENDPOINT_HOSTS": "127.0.0.1",
    })  # fmt: skip
    log = (tmp_path / "webpush.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "notifyd", "webpush", env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        async with aiohttp.ClientSession() as http:

            async def consuming() -> bool:
                assert process.returncode is None, (tmp_path / "webpush.log").read_text()
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(metrics_url) as response:
                        return "notifyd_webpush_in_flight" in await response.text() and (
                            "consuming notifyd.offline" in (tmp_path / "webpush.log").read_text()
                        )
                return False

            await wait_until(consuming, timeout=30)
            async with offline_publisher(amqp_url) as publish:
                await publish(user, {"data": "from the process"}, message_id="wp-process")
                (received,) = await push_service.wait_for(browser, 1)
            assert received.plaintext is not None
            async with http.get(metrics_url) as response:
                assert 'notifyd_webpush_sent_total{outcome="ok"}' in await response.text()
            async with http.get(f"http://127.0.0.1:{metrics_port}/healthz") as response:
                assert response.status == 200
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0
        assert time.monotonic() - started < 15
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        log.close()


async def test_a_second_store_sees_what_the_first_wrote(database_url: str) -> None:
    """The gateway and the worker are separate processes sharing the database."""
    user = new_user()
    keys = Browser("https://fcm.googleapis.com/x").subscription()["keys"]
    first = await PushStore(database_url).open()
    second = await PushStore(database_url).open()
    try:
        await first.add(Subscription("https://fcm.googleapis.com/x/" + user, user, **keys))
        assert len(await second.for_user(user)) == 1
        assert await second.expire(
            Subscription("https://fcm.googleapis.com/x/" + user, user, **keys)
        )
        assert await first.for_user(user) == []
    finally:
        await first.close()
        await second.close()
