"""The README's publishing examples, run as they are written (issue 13.16).

Each runs in a process of its own, as a reader would paste it, against a real notifyd
and RabbitMQ. Only what the README says to set elsewhere than under `make run` is set:
``NOTIFYD_AMQP_URL``, ``GATEWAY_URL`` and ``SERVICE_KEY``.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest

from .conftest import SERVICE_KEY, Server, ServerFactory, receive_until, token

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
#: What tells each example apart, and so which test runs it.
EXAMPLES = {
    "publisher": "from notifyd.publisher import Publisher",
    "pika": "pika.BlockingConnection",
    "curl": "curl ",
    "consumer": '"notifyd.upstream"',
}
#: The user every example publishes to, and the topic one of them uses.
USER, TOPIC = "42", "news"


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end]


def snippets(text: str) -> list[tuple[str, str]]:
    """``(language, code)`` of each fenced block."""
    return re.findall(r"^```(\w*)\n(.*?)^```$", text, re.M | re.S)


def example(name: str) -> tuple[str, str]:
    marker = EXAMPLES[name]
    (found,) = [s for s in snippets(section("For backends: publishing")) if marker in s[1]]
    return found


def command(language: str, code: str) -> list[str]:
    return [sys.executable, "-c", code] if language == "python" else ["sh", "-c", code]


def test_every_runnable_example_is_run_here() -> None:
    runnable = [
        s for s in snippets(section("For backends: publishing")) if s[0] in ("python", "sh")
    ]
    named = [name for name, marker in EXAMPLES.items() for _, code in runnable if marker in code]
    assert len(runnable) == len(EXAMPLES) and sorted(named) == sorted(EXAMPLES)


def test_the_readme_names_make_runs_own_keys() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for variable in ("DEV_SECRET", "DEV_SERVICE_KEY"):
        value = re.search(rf"^{variable} \?= (\S+)$", makefile, re.M)
        assert value and value.group(1) in section("For backends: publishing"), variable


@pytest.fixture
async def gateway(make_server: ServerFactory) -> Server:
    return await make_server()


@pytest.fixture
def environment(gateway: Server, amqp_url: str) -> dict[str, str]:
    """A reader's shell: notifyd's commands on PATH, no other notifyd settings."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFYD_")}
    path = f"{Path(sys.executable).parent}{os.pathsep}{kept.get('PATH', '')}"
    return {
        **kept,
        "PATH": path,
        "NOTIFYD_AMQP_URL": amqp_url,
        "GATEWAY_URL": gateway.base,
        "SERVICE_KEY": SERVICE_KEY,
    }


async def run(argv: list[str], environment: dict[str, str]) -> str:
    process = await asyncio.create_subprocess_exec(
        *argv,
        env=environment,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, (argv, out.decode(), err.decode())
    return out.decode()


async def notifications(ws: aiohttp.ClientWebSocketResponse, count: int) -> list[dict[str, Any]]:
    return [await receive_until(ws, "notification") for _ in range(count)]


async def test_the_publisher_example(gateway: Server, environment: dict[str, str]) -> None:
    ws, _ = await gateway.connect(USER, topics=[TOPIC])
    await run(command(*example("publisher")), environment)
    got = [(n["channel"], n.get("event"), n["data"]) for n in await notifications(ws, 3)]
    assert got == [
        (f"user:{USER}", "order.shipped", {"order": 1234}),
        (f"topic:{TOPIC}", None, {"text": "hi"}),
        ("broadcast", "maintenance", {"at": "22:00"}),
    ]
    await ws.close()


async def test_the_command_line_example(gateway: Server, environment: dict[str, str]) -> None:
    line = re.search(r"\*\*Command line:\*\* `([^`]+)`", section("For backends: publishing"))
    assert line is not None
    ws, _ = await gateway.connect(USER)
    printed = await run(["sh", "-c", line.group(1)], environment)
    (notification,) = await notifications(ws, 1)
    assert notification["id"] == printed.strip()
    assert (notification["event"], notification["data"]) == ("order.shipped", {"order": 1234})
    await ws.close()


async def test_the_pika_example(gateway: Server, environment: dict[str, str]) -> None:
    ws, _ = await gateway.connect(USER)
    await run(command(*example("pika")), environment)
    (notification,) = await notifications(ws, 1)
    assert (notification["id"], notification["data"]) == ("order-1234-shipped", {"order": 1234})
    await ws.close()


async def test_the_curl_example(gateway: Server, environment: dict[str, str]) -> None:
    ws, _ = await gateway.connect(USER)
    answer = await run(command(*example("curl")), environment)
    (notification,) = await notifications(ws, 1)
    assert f'"id": "{notification["id"]}"' in answer
    assert (notification["event"], notification["data"]) == ("order.shipped", {"order": 1234})
    await ws.close()


async def consumers(amqp_url: str, queue: str) -> int:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
        except aio_pika.exceptions.ChannelClosed:
            return 0
        return int(declared.declaration_result.consumer_count or 0)


async def test_the_upstream_consumer_example(
    gateway: Server, environment: dict[str, str], amqp_url: str
) -> None:
    consumer = await asyncio.create_subprocess_exec(
        *command(*example("consumer")),
        env=environment,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert consumer.stdout is not None
    try:
        async with asyncio.timeout(30):
            while not await consumers(amqp_url, "tracker-positions"):
                assert consumer.returncode is None, await consumer.stderr.read()  # type: ignore[union-attr]
                await asyncio.sleep(0.2)
        ws = await gateway.ws(token(USER))
        await receive_until(ws, "welcome")
        await ws.send_json({"type": "send", "event": "position", "data": {"lat": 1.5}, "ref": 7})
        assert (await receive_until(ws, "sent"))["ref"] == 7
        line = await asyncio.wait_for(consumer.stdout.readline(), 10)
        assert line.decode().split(" ", 2) == [USER, "position", "{'lat': 1.5}\n"]
        await ws.close()
    finally:
        consumer.terminate()
        await consumer.wait()
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            await (await connection.channel()).queue_delete("tracker-positions")


def test_the_module_list_names_every_module_and_only_those() -> None:
    start = README.index("- The package is small modules, one concept each.")
    paragraph = README[start : README.index("\n\n", start)]
    named = set(re.findall(r"`([a-z_]+)`", paragraph))
    modules = {
        path.stem for path in (ROOT / "notifyd").glob("*.py") if not path.stem.startswith("__")
    }
    assert not modules - named, f"missing from the README's module list: {modules - named}"
    assert not named - modules, f"in the README's module list, not in notifyd/: {named - modules}"
