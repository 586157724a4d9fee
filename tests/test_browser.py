"""The browser client and the demo page in headless Chromium (Debian's), against real servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest
from aiohttp import web
from playwright.async_api import Browser, Page, async_playwright, expect

from notifyd.vapid import generate_private_key, private_key_pem

from .conftest import ServerProcess, free_port

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DEMO_ENV = {"NOTIFYD_DEMO_ENABLED": "true", "NOTIFYD_HISTORY_BACKEND": "stream"}


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        await browser.close()


@pytest.fixture
async def demo(processes: Callable[..., ServerProcess]) -> ServerProcess:
    server = processes(**DEMO_ENV)
    await server.wait()
    return server


async def open_demo(browser: Browser, server: ServerProcess, user: str, watch: str = "") -> Page:
    page = await browser.new_page(viewport={"width": 1400, "height": 900})
    page.on("console", lambda message: print("console:", message.text))
    await page.goto(server.base + "/demo")
    await page.get_by_test_id("user").fill(user)
    await page.get_by_test_id("watch").fill(watch)
    await page.get_by_test_id("connect").click()
    await expect(page.get_by_test_id("state")).to_have_text("open", timeout=15_000)
    return page


async def publish(url: str, routing_key: str, body: dict[str, Any], message_id: str) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange("notifyd")
        message = aio_pika.Message(
            json.dumps(body).encode(), message_id=message_id, delivery_mode=2
        )
        await exchange.publish(message, routing_key)


async def test_demo_shows_notifications_from_rabbitmq_and_http(
    browser: Browser, demo: ServerProcess, amqp_url: str
) -> None:
    page = await open_demo(browser, demo, "ada")
    await publish(
        amqp_url, "user.ada", {"event": "order.shipped", "data": {"order": 1234}}, "amqp-1"
    )
    feed = page.get_by_test_id("feed")
    await expect(feed.locator("li[data-id='amqp-1']")).to_contain_text("order.shipped")
    await expect(feed.locator("li[data-id='amqp-1']")).to_contain_text("1234")
    # The same message_id published again is shown once.
    await publish(
        amqp_url, "user.ada", {"event": "order.shipped", "data": {"order": 1234}}, "amqp-1"
    )
    await page.get_by_test_id("publish").click()  # through POST /demo/publish
    await expect(page.get_by_test_id("received")).to_have_text("2")
    await expect(feed.locator("li[data-id='amqp-1']")).to_have_count(1)
    # Ids are per channel: the same id on another channel is another notification.
    await publish(amqp_url, "broadcast", {"event": "maintenance", "data": {}}, "amqp-1")
    await expect(page.get_by_test_id("received")).to_have_text("3")
    await expect(feed.locator("li[data-id='amqp-1']")).to_have_count(2)
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)
    assert (ARTIFACTS / "demo.png").stat().st_size > 10_000


async def test_client_reconnects_and_resumes_after_a_server_restart(
    browser: Browser, processes: Callable[..., ServerProcess], amqp_url: str
) -> None:
    port = free_port()
    server = processes(port=port, **DEMO_ENV)
    await server.wait()
    page = await open_demo(browser, server, "grace")
    await publish(amqp_url, "user.grace", {"data": {"n": 1}}, "before-restart")
    await expect(page.locator("li[data-id='before-restart']")).to_have_count(1)

    await asyncio.to_thread(server.stop)
    await expect(page.get_by_test_id("state")).not_to_have_text("open", timeout=10_000)
    # Published while no notifyd was running: kept in the shared stream.
    await publish(amqp_url, "user.grace", {"data": {"n": 2}}, "while-down")
    restarted = processes(port=port, **DEMO_ENV)
    await restarted.wait()

    await expect(page.get_by_test_id("state")).to_have_text("open (resumed)", timeout=20_000)
    # A gateway that was down is no reason to fall back to SSE ("auto" probes HTTP first).
    await expect(page.get_by_test_id("transport")).to_have_text("websocket")
    await expect(page.locator("li[data-id='while-down']")).to_have_count(1)
    assert int(await page.get_by_test_id("reconnects").inner_text()) >= 1
    await publish(amqp_url, "user.grace", {"data": {"n": 3}}, "after-restart")
    await expect(page.locator("li[data-id='after-restart']")).to_have_count(1)
    await expect(page.locator("li[data-id='before-restart']")).to_have_count(1)


async def test_two_tabs_chat_through_a_topic(browser: Browser, demo: ServerProcess) -> None:
    alice = await open_demo(browser, demo, "alice")
    bob = await open_demo(browser, demo, "bob")
    await alice.get_by_test_id("chat-text").fill("hello bob")
    await alice.get_by_test_id("chat-send").click()
    await expect(bob.get_by_test_id("chat-log")).to_contain_text("alice: hello bob")
    await bob.get_by_test_id("chat-text").fill("hi alice")
    await bob.get_by_test_id("chat-text").press("Enter")
    await expect(alice.get_by_test_id("chat-log")).to_contain_text("bob: hi alice")


async def test_tracker_positions_reach_a_backend_consumer(
    browser: Browser, demo: ServerProcess, amqp_url: str
) -> None:
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    upstream = await channel.declare_exchange(
        "notifyd.upstream", aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(upstream, "user.tracker-1")
    page = await open_demo(browser, demo, "tracker-1")
    await page.get_by_test_id("tracking").check()
    await expect(page.get_by_test_id("positions")).to_have_text("1", timeout=10_000)
    message = await queue.get(timeout=10)
    body = json.loads(message.body)
    assert body["user"] == "tracker-1" and body["event"] == "position"
    assert {"lat", "lng"} <= set(body["data"])
    await page.get_by_test_id("tracking").uncheck()
    await connection.close()


async def test_client_module_logic_in_the_browser(browser: Browser, demo: ServerProcess) -> None:
    page = await browser.new_page()
    await page.goto(demo.base + "/demo")
    result = await page.evaluate(
        """async () => {
          const m = await import('/client/notifyd.js');
          const top = () => 0.999;
          const delays = [0, 1, 2, 3, 10, 20].map((a) => m.backoffDelay(a, 500, 30000, top));
          const low = m.backoffDelay(5, 500, 30000, () => 0);
          const ids = new m.RecentIds(2);
          const seen = [ids.seen('a'), ids.seen('a'), ids.seen('b'), ids.seen('c'), ids.seen('a')];
          let threw = false;
          try { new m.NotifydClient({}); } catch (e) { threw = e instanceof TypeError; }
          return { delays, low, seen, threw, isDefault: m.default === m.NotifydClient };
        }"""
    )
    assert result["delays"] == [499, 999, 1998, 3996, 29970, 29970]  # doubling, capped
    assert result["low"] == 250  # never below min/2
    assert result["seen"] == [False, True, False, False, False]  # 'a' forgotten after 2 more
    assert result["threw"] and result["isDefault"]


async def test_demo_shows_the_presence_of_watched_users_live(
    browser: Browser, processes: Callable[..., ServerProcess]
) -> None:
    server = processes(**DEMO_ENV, NOTIFYD_WS_BINDING_GRACE="0.5")
    await server.wait()
    watcher = await open_demo(browser, server, "watcher", watch="bob, carol")
    bob_badge = watcher.locator("[data-testid=presence] li[data-user='bob'] .badge")
    carol_badge = watcher.locator("[data-testid=presence] li[data-user='carol'] .badge")
    # Neither has a socket: the page asked /demo/presence once it watched them.
    await expect(bob_badge).to_have_text("offline")
    await expect(carol_badge).to_have_text("offline")

    bob = await open_demo(browser, server, "bob")
    await expect(bob_badge).to_have_text("online", timeout=10_000)
    await expect(bob_badge).to_have_class("badge online")
    await expect(watcher.locator("li[data-id] .chan").first).to_have_text("presence:bob")
    await bob.close()  # bob's last socket: offline once binding_grace has passed
    await expect(bob_badge).to_have_text("offline", timeout=10_000)
    await expect(carol_badge).to_have_text("offline")

    # A token for a presence list that is not user ids is refused.
    async with aiohttp.ClientSession() as http:
        body = {"user": "watcher", "presence": ["not a user id"]}
        async with http.post(server.base + "/demo/token", json=body) as response:
            assert response.status == 400
            assert "presence" in (await response.json())["message"]


async def test_push_toggle_explains_a_server_without_vapid_key(
    browser: Browser, demo: ServerProcess
) -> None:
    page = await open_demo(browser, demo, "nopush")
    state = page.get_by_test_id("push-state")
    await expect(state).to_contain_text("not available: the server has no VAPID key")
    await page.get_by_test_id("push").click()
    await expect(page.get_by_test_id("push")).not_to_be_checked()
    await expect(page.get_by_test_id("push")).to_be_enabled()
    await expect(state).to_contain_text("not available: the server has no VAPID key")


async def test_push_toggle_says_why_headless_chromium_cannot_subscribe(
    browser: Browser, processes: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = processes(
        **DEMO_ENV,
        NOTIFYD_WEBPUSH_VAPID_PRIVATE_KEY=private_key_pem(generate_private_key()),
        NOTIFYD_WEBPUSH_DATABASE_URL=f"sqlite:///{tmp_path / 'push.sqlite3'}",
    )
    await server.wait()
    page = await open_demo(browser, server, "pushy")
    state = page.get_by_test_id("push-state")
    await expect(state).to_contain_text("off: tick the box")
    await page.get_by_test_id("push").click()
    # Headless Chromium grants no notification permission (nor reaches a push
    # service): the page says so, and leaves the box unticked, rather than hang.
    await expect(page.get_by_test_id("push")).to_be_enabled(timeout=30_000)
    await expect(state).to_contain_text(re.compile(r"^not available: .*permission denied"))
    await expect(page.get_by_test_id("push")).not_to_be_checked()


# --- one connection per browser (shareAcrossTabs) -----------------------------------


async def metric(server: ServerProcess, sample: str) -> float:
    """One sample of the server's /metrics, e.g. 'notifyd_connections' (0 when absent)."""
    async with aiohttp.ClientSession() as http, http.get(server.base + "/metrics") as response:
        for line in (await response.text()).splitlines():
            if line.startswith(sample + " "):
                return float(line.split()[-1])
    return 0.0


async def wait_for(check: Callable[[], Any], what: str, timeout: float = 15) -> None:
    """Poll an async check until it returns true (a deadline, not a fixed sleep)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


RECORD_IDS = """() => {
  window.ids = [];
  window.notes = [];
  window.notifydClient.on('notification', (n) => { window.ids.push(n.id); window.notes.push(n); });
}"""
#: Connections opened, by transport: sockets accepted, SSE tickets issued.
OPENED = {
    "websocket": 'notifyd_connection_attempts_total{outcome="accepted"}',
    "sse": 'notifyd_sse_tickets_total{outcome="issued"}',
}


async def received_ids(page: Page) -> list[str]:
    ids: list[str] = await page.evaluate("window.ids")
    return ids


async def unexpected(pages: list[Page], expected: list[str]) -> list[Any]:
    """The notifications each page got beyond ``expected`` (for a failure's message)."""
    notes: list[list[Any]] = [await page.evaluate("window.notes") for page in pages]
    return [[n for n in got if n["id"] not in expected] for got in notes]


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_tabs_share_one_connection_and_hand_over_without_loss_or_duplicates(
    browser: Browser, demo: ServerProcess, amqp_url: str, transport: str
) -> None:
    user = f"tabs-{uuid.uuid4().hex[:6]}"
    context = await browser.new_context()
    tabs = []
    for _ in range(3):
        page = await context.new_page()
        page.on("console", lambda message: print("console:", message.text))
        await page.goto(demo.base + f"/demo?share=1&transport={transport}")
        await page.get_by_test_id("user").fill(user)
        await page.get_by_test_id("connect").click()
        await expect(page.get_by_test_id("state")).to_have_text("open", timeout=15_000)
        await page.evaluate(RECORD_IDS)
        tabs.append(page)
    roles = [await tab.evaluate("window.notifydClient.role") for tab in tabs]
    assert roles == ["leader", "follower", "follower"]
    # The followers joined an open connection: they got its welcome (its session) too.
    sessions = {await tab.evaluate("window.notifydClient.session") for tab in tabs}
    assert len(sessions) == 1 and None not in sessions
    await expect(tabs[2].get_by_test_id("role")).to_have_text("follower")
    await expect(tabs[2].get_by_test_id("transport")).to_have_text(transport)
    # One connection reached the server, ever: the followers never opened one.
    assert await metric(demo, "notifyd_connections") == 1
    assert await metric(demo, OPENED[transport]) == 1

    sent = [f"share-{n}" for n in range(40)]
    for message_id in sent[:5]:
        await publish(amqp_url, f"user.{user}", {"data": {"id": message_id}}, message_id)

    async def everyone_has(pages: list[Page], ids: list[str]) -> bool:
        counts = [len(await received_ids(page)) for page in pages]
        return min(counts) >= len(ids)

    await wait_for(lambda: everyone_has(tabs, sent[:5]), "the first five in every tab")
    assert [await received_ids(tab) for tab in tabs] == [sent[:5]] * 3

    # The leader tab closes while notifications keep coming: the next tab takes the
    # lock, resumes from the last id it saw, and the two left get each one once, in order.
    async def keep_publishing() -> None:
        for message_id in sent[5:]:
            await publish(amqp_url, f"user.{user}", {"data": {"id": message_id}}, message_id)

    publisher = asyncio.create_task(keep_publishing())
    await wait_for(lambda: everyone_has(tabs[1:], sent[:8]), "a few more before the close")
    await tabs[0].close()
    await publisher
    await wait_for(lambda: everyone_has(tabs[1:], sent), "every notification after the handover")
    got = [await received_ids(tab) for tab in tabs[1:]]
    assert got == [sent] * 2, await unexpected(tabs[1:], sent)
    assert await tabs[1].evaluate("window.notifydClient.role") == "leader"
    await expect(tabs[1].get_by_test_id("state")).to_have_text("open (resumed)")

    async def one_connection() -> bool:
        return await metric(demo, "notifyd_connections") == 1

    await wait_for(one_connection, "the old leader's connection to be gone")
    assert await metric(demo, OPENED[transport]) == 2  # the first leader's, then the second's

    # A follower's publish goes through the leader and returns the server's answer;
    # the chat message reaches both tabs once.
    answer = await tabs[2].evaluate(
        "window.notifydClient.publish('topic:lobby', {text: 'via the leader'}, 'chat')"
    )
    assert answer["type"] == "published" and answer["channel"] == "topic:lobby"
    # A follower's history request, answered by the server through the leader.
    page_of = await tabs[2].evaluate(f"window.notifydClient.history('user:{user}', {{limit: 3}})")
    assert [n["id"] for n in page_of["notifications"]] == sent[:-4:-1]
    for tab in tabs[1:]:
        await expect(tab.get_by_test_id("chat-log")).to_contain_text(f"{user}: via the leader")
    await wait_for(lambda: everyone_has(tabs[1:], [*sent, answer["id"]]), "the chat message")
    assert [await received_ids(tab) for tab in tabs[1:]] == [[*sent, answer["id"]]] * 2
    await context.close()


async def test_tabs_without_broadcast_channel_keep_a_connection_each(
    browser: Browser, demo: ServerProcess
) -> None:
    user = f"noshare-{uuid.uuid4().hex[:6]}"
    context = await browser.new_context()
    await context.add_init_script("delete window.BroadcastChannel")
    for _ in range(2):
        page = await context.new_page()
        await page.goto(demo.base + "/demo?share=1")
        await page.get_by_test_id("user").fill(user)
        await page.get_by_test_id("connect").click()
        await expect(page.get_by_test_id("state")).to_have_text("open", timeout=15_000)
        assert await page.evaluate("window.notifydClient.role") is None
        await expect(page.get_by_test_id("role")).to_be_hidden()

    async def two_sockets() -> bool:
        return await metric(demo, "notifyd_connections") == 2

    await wait_for(two_sockets, "a socket per tab")
    await context.close()


# --- SSE: forced, and the fallback when WebSockets are blocked ----------------------


async def test_demo_over_sse_receives_publishes_and_subscribes_without_a_jwt_in_any_url(
    browser: Browser, demo: ServerProcess, amqp_url: str
) -> None:
    page = await browser.new_page()
    page.on("console", lambda message: print("console:", message.text))
    urls: list[str] = []
    page.on("request", lambda request: urls.append(request.url))
    await page.goto(demo.base + "/demo?transport=sse")
    user = f"sse-{uuid.uuid4().hex[:6]}"
    await page.get_by_test_id("user").fill(user)
    await page.get_by_test_id("watch").fill("nobody-here")  # a presence:<id> subscribe
    await page.get_by_test_id("connect").click()
    await expect(page.get_by_test_id("state")).to_have_text("open", timeout=15_000)
    await expect(page.get_by_test_id("transport")).to_have_text("sse")
    assert await page.evaluate("window.notifydClient.conn instanceof EventSource")
    # subscribe on SSE reopens the stream with the channel; the server's answer settles it.
    badge = page.locator("[data-testid=presence] li[data-user='nobody-here'] .badge")
    await expect(badge).to_have_text("offline")
    refused = await page.evaluate(
        "window.notifydClient.subscribe('topic:not-allowed')"
        ".then(() => 'ok', (e) => `${e.code} ${e.channel}`)"
    )
    assert refused == "forbidden topic:not-allowed"

    await publish(amqp_url, f"user.{user}", {"event": "over.sse", "data": {"n": 1}}, "sse-1")
    await expect(page.locator("li[data-id='sse-1']")).to_contain_text("over.sse")
    # publish over POST /api/messages: the chat message comes back on the stream.
    await page.get_by_test_id("chat-text").fill("hello over sse")
    await page.get_by_test_id("chat-send").click()
    await expect(page.get_by_test_id("chat-log")).to_contain_text(f"{user}: hello over sse")
    pong = await page.evaluate("window.notifydClient.ping()")
    assert pong["type"] == "pong"
    # history over POST /api/messages: the page of the user's channel, newest first.
    page_of = await page.evaluate(f"window.notifydClient.history('user:{user}', {{limit: 5}})")
    assert page_of["type"] == "history" and page_of["channel"] == f"user:{user}"
    assert [n["id"] for n in page_of["notifications"]] == ["sse-1"]
    streams = [url for url in urls if "/sse?" in url]
    assert streams and all("ticket=" in url for url in streams)
    assert not [url for url in urls if "eyJ" in url]  # no JWT (base64url JSON) in a URL


async def test_sse_stream_refreshes_its_token_and_resumes_without_duplicates(
    browser: Browser, processes: Callable[..., ServerProcess], amqp_url: str
) -> None:
    # Tokens of 12 s, refresh_required 10 s before expiry: the stream is replaced
    # (new ticket, lastEventId) every ~2 s while notifications keep coming.
    server = processes(**DEMO_ENV, NOTIFYD_WS_REFRESH_BEFORE="10")
    await server.wait()
    page = await browser.new_page()
    page.on("console", lambda message: print("console:", message.text))
    await page.goto(server.base + "/demo")
    user = f"refresh-{uuid.uuid4().hex[:6]}"
    result = await page.evaluate(
        """async (user) => {
          const { NotifydClient } = await import('/client/notifyd.js');
          let tokens = 0;
          const getToken = async () => {
            tokens += 1;
            const response = await fetch('/demo/token', {method: 'POST',
              headers: {'Content-Type': 'application/json'}, body: JSON.stringify({user, ttl: 12})});
            return (await response.json()).token;
          };
          const client = new NotifydClient({ getToken, transport: 'sse' });
          window.client = client;
          window.ids = [];
          window.tokens = () => tokens;
          client.on('notification', (n) => window.ids.push(n.id));
          await new Promise((resolve) => { client.on('welcome', resolve); client.connect(); });
          return client.transport;
        }""",
        user,
    )
    assert result == "sse"
    sent = [f"refresh-{n}" for n in range(30)]
    for message_id in sent:
        await publish(amqp_url, f"user.{user}", {"data": {"id": message_id}}, message_id)
        await asyncio.sleep(0.2)  # spread over a few refreshes (pacing, not waiting)

    async def all_in() -> bool:
        return len(await received_ids(page)) >= len(sent)

    await wait_for(all_in, "every notification across the refreshes")
    assert await received_ids(page) == sent
    assert await page.evaluate("window.tokens()") >= 3  # it did refresh, more than once
    assert await page.evaluate("window.client.state") == "open"
    assert await page.evaluate("window.client.reconnects") == 0  # replaced, never dropped


@contextlib.asynccontextmanager
async def blocking_proxy(target: str) -> AsyncIterator[str]:
    """An HTTP reverse proxy that answers every WebSocket upgrade with 403, like the
    corporate proxies the SSE fallback is for; everything else (SSE streams too) passes."""
    http = aiohttp.ClientSession(auto_decompress=False)
    hop = {"host", "connection", "upgrade", "transfer-encoding", "content-length", "keep-alive"}

    async def forward(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return web.Response(status=403, text="WebSockets are not allowed here")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in hop}
        async with http.request(
            request.method, target + request.path_qs, headers=headers, data=await request.read()
        ) as upstream:
            response = web.StreamResponse(
                status=upstream.status,
                headers={k: v for k, v in upstream.headers.items() if k.lower() not in hop},
            )
            await response.prepare(request)
            with contextlib.suppress(aiohttp.ClientError, ConnectionResetError):
                # An SSE stream ends when either side goes (the test's end): pass that on.
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
            return response

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", forward)
    runner = web.AppRunner(app, shutdown_timeout=1)  # open streams need not end first
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
        await http.close()


async def test_client_falls_back_to_sse_when_a_proxy_refuses_websockets(
    browser: Browser, demo: ServerProcess, amqp_url: str
) -> None:
    async with blocking_proxy(demo.base) as proxy:
        page = await browser.new_page()
        page.on("console", lambda message: print("console:", message.text))
        await page.goto(proxy + "/demo")
        user = f"fallback-{uuid.uuid4().hex[:6]}"
        await page.get_by_test_id("user").fill(user)
        await page.get_by_test_id("connect").click()
        await expect(page.get_by_test_id("state")).to_have_text("open", timeout=20_000)
        await expect(page.get_by_test_id("transport")).to_have_text("sse (fallback)")
        await expect(page.get_by_test_id("log")).to_contain_text("falling back to SSE")
        await publish(amqp_url, f"user.{user}", {"data": {"via": "proxy"}}, f"{user}-1")
        await expect(page.locator(f"li[data-id='{user}-1']")).to_have_count(1)
        await page.get_by_test_id("chat-text").fill("through the proxy")
        await page.get_by_test_id("chat-send").click()
        await expect(page.get_by_test_id("chat-log")).to_contain_text(f"{user}: through the proxy")
        await page.close()


async def test_auto_falls_back_only_after_two_unexplained_websocket_failures(
    browser: Browser, demo: ServerProcess
) -> None:
    page = await browser.new_page()
    await page.goto(demo.base + "/demo")
    result = await page.evaluate(
        """async () => {
          const { NotifydClient } = await import('/client/notifyd.js');
          // A WebSocket that ends the way the browser reports it: `code` before `open`
          // (1006: refused upgrade, no close frame), or after it (notifyd's own close code).
          const fake = (code, opens, log) => class {
            constructor() {
              log.push('ws');
              setTimeout(() => { if (opens) this.onopen(); this.onclose({ code, reason: '' }); }, 0);
            }
            send() {}
            close() {}
          };
          const run = async (code, opens, attempts) => {
            const log = [];
            const client = new NotifydClient({
              getToken: () => 'token', WebSocketImpl: fake(code, opens, log), backoff: { min: 2, max: 4 },
            });
            const switched = new Promise((resolve) => client.on('transport', resolve));
            const enough = new Promise((resolve) => client.on('state', () => log.length >= attempts && resolve()));
            client.connect();
            const first = await Promise.race([switched, enough]);
            client.close();
            return { first: first ?? null, sockets: log.length, transport: client.transport };
          };
          return { refused: await run(1006, false, 5), unauthorized: await run(4001, true, 4) };
        }"""
    )
    # Two refused upgrades while /healthz answers: the next attempt is SSE.
    assert result["refused"] == {
        "first": {"transport": "sse", "fallback": True},
        "sockets": 2,
        "transport": "sse",
    }
    # A close code from notifyd means the WebSocket got through: no fallback.
    assert result["unauthorized"] == {"first": None, "sockets": 4, "transport": "websocket"}
