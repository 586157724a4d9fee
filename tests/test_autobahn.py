"""The Autobahn TestSuite against notifyd's own WebSocket layers.

``kosoku`` runs Autobahn's case files (all but 12.* and 13.*, which need
permessage-deflate: notifyd never negotiates it) against the echo endpoint of
:mod:`tests.echo_server`, which is notifyd's frame parser, session and protocol
adapter with an echo instead of the notification protocol. Every case must pass
(OK, NON-STRICT or INFORMATIONAL). A full run, two cases at a time, takes ~10 s on
two cores (~18-30 s one at a time; ~8 s of it are the cases' own waits in 5.19, 5.20
and 6.4.*).

A few close-handshake checks that Autobahn does not time are done here too, with
a raw socket against the same endpoint.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from tests import echo_server

#: Verdicts Autobahn counts as passed (``kosoku.CaseResult.passed``).
PASSED = {"OK", "NON-STRICT", "INFORMATIONAL"}
#: Cases of the suite without 12.* and 13.* (kosoku 0.1: 301).
MIN_CASES = 300
SUITE_TIMEOUT = 300.0


def _kosoku() -> str:
    """The kosoku executable of this interpreter's environment."""
    beside = Path(sys.executable).with_name("kosoku")
    found = str(beside) if beside.exists() else shutil.which("kosoku")
    assert found, "kosoku is not installed (it is in the 'test' extra: pip install -e '.[test]')"
    return found


@pytest.fixture
async def echo() -> AsyncIterator[int]:
    runner: web.AppRunner
    runner, port = await echo_server.start()
    try:
        yield port
    finally:
        await runner.cleanup()


def _verdicts(report_dir: Path) -> dict[str, tuple[str, str]]:
    """Case id -> (behavior, behaviorClose) from kosoku's ``index.json``."""
    index = json.loads((report_dir / "index.json").read_text())
    verdicts: dict[str, tuple[str, str]] = {}
    for cases in index.values():  # one entry per agent (the server's address)
        for case_id, entry in cases.items():
            verdicts[case_id] = (entry["behavior"], entry["behaviorClose"])
    return verdicts


def _case_detail(report_dir: Path, case_id: str) -> str:
    """What the case expected and what happened, from its own report file."""
    for path in report_dir.glob(f"*_case_{case_id.replace('.', '_')}.json"):
        case = json.loads(path.read_text())
        return (
            f"{case_id}: {case['description']}\n  expected {case['expected']} "
            f"close {case['expectedClose']}\n  received {case['received']} "
            f"remote close {case['remoteCloseCode']} {case['remoteCloseReason']!r} "
            f"clean={case['wasClean']} ({case['wasNotCleanReason']})"
        )
    return f"{case_id}: no report file"


@pytest.mark.timeout(SUITE_TIMEOUT + 60)
async def test_autobahn_suite_passes(echo: int, tmp_path: Path) -> None:
    report_dir = tmp_path / "autobahn"
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        _kosoku(),
        "-m",
        "fuzzingclient",
        "-x",
        "12.*",
        "-x",
        "13.*",
        "-p",
        "2",
        "-o",
        str(report_dir),
        f"ws://127.0.0.1:{echo}/",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), SUITE_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"kosoku did not finish within {SUITE_TIMEOUT:.0f} s") from None
    elapsed = time.monotonic() - started
    text = output.decode(errors="replace")
    assert (report_dir / "index.json").exists(), f"kosoku wrote no report:\n{text[-4000:]}"

    verdicts = _verdicts(report_dir)
    failed = sorted(
        (case for case, (behavior, close) in verdicts.items() if not {behavior, close} <= PASSED),
        key=lambda case: tuple(int(part) for part in case.split(".")),
    )
    assert not failed, f"{len(failed)} Autobahn cases failed:\n" + "\n".join(
        _case_detail(report_dir, case) for case in failed
    )
    assert process.returncode == 0, f"kosoku exited {process.returncode}:\n{text[-4000:]}"
    assert len(verdicts) >= MIN_CASES, f"only {len(verdicts)} cases ran:\n{text[-4000:]}"
    print(f"Autobahn: {len(verdicts)} cases passed in {elapsed:.1f} s")


# --- the close handshake's timing, which Autobahn does not check ---------------------


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return reader, writer


def _client_frame(first: int, payload: bytes) -> bytes:
    """A masked client frame (a zero mask: the payload goes as it is)."""
    assert len(payload) < 126
    return bytes([first, 0x80 | len(payload)]) + b"\0\0\0\0" + payload


async def _close_frame(reader: asyncio.StreamReader) -> int | None:
    """Read one server frame, which must be a close; its code."""
    head = await asyncio.wait_for(reader.readexactly(2), 5)
    assert head[0] == 0x88, head
    payload = await asyncio.wait_for(reader.readexactly(head[1]), 5)
    return int.from_bytes(payload[:2], "big") if payload else None


async def _seconds_until_eof(reader: asyncio.StreamReader, limit: float = 3.0) -> float:
    started = time.monotonic()
    try:
        rest = await asyncio.wait_for(reader.read(), limit)
    except ConnectionResetError:  # an abort instead of a close
        return time.monotonic() - started
    except TimeoutError:
        return limit
    assert rest == b"", rest
    return time.monotonic() - started


async def test_client_close_is_answered_and_the_server_closes_tcp(echo: int) -> None:
    reader, writer = await _open(echo)
    writer.write(_client_frame(0x88, (1000).to_bytes(2, "big") + b"bye"))
    assert await _close_frame(reader) == 1000
    assert await _seconds_until_eof(reader) < 1.0  # RFC 6455 7.1.1: the server closes first
    writer.close()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (_client_frame(0x91, b"hi"), 1002),  # RSV1 without an extension
        (_client_frame(0x83, b"hi"), 1002),  # reserved opcode
        (_client_frame(0x00, b"hi"), 1002),  # continuation without a message
        (_client_frame(0x81, b"\xff"), 1007),  # text that is not UTF-8
        (_client_frame(0x88, (999).to_bytes(2, "big")), 1002),  # invalid close code
        (_client_frame(0x88, (1000).to_bytes(2, "big") + b"\xff"), 1007),  # bad close reason
    ],
    ids=["rsv1", "opcode", "continuation", "utf8", "close-code", "close-reason"],
)
async def test_protocol_error_closes_the_tcp_connection_promptly(
    echo: int, frame: bytes, code: int
) -> None:
    """RFC 6455 7.1.7 and 10.7: fail the connection — a close frame, then the server
    closes TCP at once: it reads nothing more, so it waits for no close from the client
    (which, when its own close frame was the bad one, will not send another)."""
    reader, writer = await _open(echo)
    writer.write(frame)
    assert await _close_frame(reader) == code
    if frame[0] != 0x88:
        writer.write(_client_frame(0x88, code.to_bytes(2, "big")))  # the client answers
    assert await _seconds_until_eof(reader) < 1.0
    writer.close()
