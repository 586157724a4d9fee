"""The browser client and the demo page in headless Chromium (Debian's), against real servers."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest
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
