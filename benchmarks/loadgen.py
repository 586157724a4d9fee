"""A lean WebSocket load generator: many sockets per process, frames counted, not parsed.

Each worker process holds thousands of sockets as plain asyncio protocols: the
upgrade is written by hand, incoming frames are split by their headers only, and a
payload is looked at only to find the send timestamp of latency samples. The parent
drives workers through pipes (connect, reset counters, read counters, close).
"""

from __future__ import annotations

import asyncio
import base64
import multiprocessing as mp
import os
import re
import struct
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from benchmarks import lift_fd_limit
from notifyd.app import install_uvloop

_SENT = re.compile(rb'"sent":\s*([0-9.]+)')
SOCKETIO_PATH = "/socket.io/?EIO=4&transport=websocket"


def masked_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A client->server frame (clients must mask); text unless ``opcode`` says otherwise."""
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    else:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + body


@dataclass
class Stats:
    frames: int = 0
    first: float = 0.0
    last: float = 0.0
    welcomed: int = 0
    closed: int = 0
    #: Publish->receive seconds, collected only when asked for (None: not collected).
    latencies: list[float] | None = None

    def frame(self, now: float) -> None:
        if not self.frames:
            self.first = now
        self.frames += 1
        self.last = now


class Client(asyncio.Protocol):
    """One socket. Counts notification frames; the first frame (welcome) authenticates."""

    def __init__(
        self, request: bytes, stats: Stats, welcomed: asyncio.Future[None], socketio: bool
    ) -> None:
        self.request = request
        self.stats = stats
        self.welcomed = welcomed
        self.socketio = socketio
        self.buffer = b""
        self.upgraded = False
        self.ready = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        if not self.upgraded:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = buffer
                return
            if not buffer.startswith(b"HTTP/1.1 101"):
                self._fail(buffer[: buffer.find(b"\r\n")].decode(errors="replace"))
                return
            self.upgraded = True
            buffer = buffer[end + 4 :]
        now = time.perf_counter()
        offset, size = 0, len(buffer)
        stats = self.stats
        while size - offset >= 2:
            opcode = buffer[offset] & 0x0F
            length = buffer[offset + 1] & 0x7F
            start = offset + 2
            if length == 126:
                if size - offset < 4:
                    break
                length = int.from_bytes(buffer[offset + 2 : offset + 4], "big")
                start = offset + 4
            elif length == 127:
                if size - offset < 10:
                    break
                length = int.from_bytes(buffer[offset + 2 : offset + 10], "big")
                start = offset + 10
            end = start + length
            if end > size:
                break
            if opcode == 0x1:
                if not self.ready:
                    self._handshake_frame(buffer[start:end])
                else:
                    self._notification(buffer, start, end, now, stats)
            elif opcode == 0x9 and self.transport is not None:  # ping -> pong
                self.transport.write(masked_frame(buffer[start:end], opcode=0xA))
            elif opcode == 0x8:
                stats.closed += 1
                if self.transport is not None:
                    self.transport.close()
                return
            offset = end
        self.buffer = buffer[offset:]

    def _handshake_frame(self, payload: bytes) -> None:
        if self.socketio:
            if payload.startswith(b"0"):  # engine.io open -> socket.io connect
                self.transport.write(masked_frame(b"40"))  # type: ignore[union-attr]
                return
            if not payload.startswith(b"40"):
                self._fail(payload[:60].decode(errors="replace"))
                return
        elif b'"welcome"' not in payload:
            self._fail(payload[:60].decode(errors="replace"))
            return
        self.ready = True
        self.stats.welcomed += 1
        if not self.welcomed.done():
            self.welcomed.set_result(None)

    def _notification(self, buffer: bytes, start: int, end: int, now: float, stats: Stats) -> None:
        if self.socketio and end - start == 1 and buffer[start] == 0x32:  # engine.io ping "2"
            self.transport.write(masked_frame(b"3"))  # type: ignore[union-attr]
            return
        stats.frame(now)
        if stats.latencies is not None and buffer.find(b'"sent"', start, end) >= 0:
            match = _SENT.search(buffer, start, end)
            if match:
                stats.latencies.append(time.time() - float(match.group(1)))

    def _fail(self, reason: str) -> None:
        if not self.welcomed.done():
            self.welcomed.set_exception(ConnectionError(reason))
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.welcomed.done():
            self.welcomed.set_exception(ConnectionError(f"closed before welcome: {exc}"))


def upgrade_request(host: str, port: int, token: str, socketio: bool, query: str = "") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    path = SOCKETIO_PATH if socketio else "/ws" + (f"?{query}" if query else "")
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {token}\r\n\r\n"
    ).encode()


async def _open(
    clients: list[Client], stats: Stats, port: int, socketio: bool, tokens: list[str], query: str
) -> dict[str, Any]:
    """Open one socket per token, at most 500 handshakes in flight."""
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    semaphore = asyncio.Semaphore(500)
    failures = 0

    async def open_one(index: int, token: str) -> None:
        nonlocal failures
        async with semaphore:
            welcomed: asyncio.Future[None] = loop.create_future()
            request = upgrade_request("127.0.0.1", port, token, socketio, query)
            try:
                _, client = await loop.create_connection(
                    lambda: Client(request, stats, welcomed, socketio),
                    "127.0.0.1",
                    port,
                    # Spread source addresses: one address has ~28k ephemeral ports.
                    local_addr=(f"127.0.0.{2 + index % 50}", 0),
                )
                await asyncio.wait_for(welcomed, 30)
                clients.append(client)
            except (OSError, ConnectionError, TimeoutError):
                failures += 1

    base = len(clients)
    await asyncio.gather(*(open_one(base + i, t) for i, t in enumerate(tokens)))
    return {"seconds": time.perf_counter() - started, "failures": failures}


async def _worker(pipe: Connection, port: int, socketio: bool) -> None:
    loop = asyncio.get_running_loop()
    stats = Stats()
    clients: list[Client] = []
    while True:
        command, args = await loop.run_in_executor(None, pipe.recv)
        if command == "connect":
            pipe.send(await _open(clients, stats, port, socketio, args["tokens"], args["query"]))
        elif command == "send":
            # The same masked frame, written ``count`` times by each of the first ``sockets``.
            frame = masked_frame(args["payload"])
            for client in clients[: args["sockets"]]:
                if client.transport is not None:
                    client.transport.write(frame * args["count"])
            pipe.send("ok")
        elif command == "reset":
            stats = Stats()
            stats.latencies = [] if args.get("latency") else None
            for client in clients:
                client.stats = stats
            pipe.send("ok")
        elif command == "stats":
            pipe.send(
                {
                    "frames": stats.frames,
                    "first": stats.first,
                    "last": stats.last,
                    "closed": stats.closed,
                    "welcomed": stats.welcomed,
                    "latencies": stats.latencies or [],
                }
            )
        elif command in ("disconnect", "close"):
            for client in clients:
                if client.transport is not None:
                    client.transport.abort()
            clients.clear()
            pipe.send("ok")
            if command == "close":
                return


def _worker_main(pipe: Connection, port: int, socketio: bool) -> None:
    lift_fd_limit()
    install_uvloop()
    asyncio.run(_worker(pipe, port, socketio))


class LoadGenerator:
    """Sockets spread over worker processes (each under the per-process fd limit)."""

    def __init__(self, port: int, workers: int = 2, socketio: bool = False) -> None:
        context = mp.get_context("spawn")
        self.pipes: list[Connection] = []
        self.processes = []
        for _ in range(workers):
            parent, child = context.Pipe()
            process = context.Process(
                target=_worker_main, args=(child, port, socketio), daemon=True
            )
            process.start()
            self.pipes.append(parent)
            self.processes.append(process)

    def _all(self, command: str, args_for: list[dict[str, Any]] | dict[str, Any]) -> list[Any]:
        for index, pipe in enumerate(self.pipes):
            args = args_for[index] if isinstance(args_for, list) else args_for
            pipe.send((command, args))
        return [pipe.recv() for pipe in self.pipes]

    def connect(self, tokens: list[str], query: str = "") -> dict[str, float]:
        """Open one socket per token, spread over the workers: seconds taken, failures."""
        shares = [tokens[i :: len(self.pipes)] for i in range(len(self.pipes))]
        started = time.perf_counter()
        results = self._all("connect", [{"tokens": share, "query": query} for share in shares])
        return {
            "seconds": time.perf_counter() - started,
            "failures": sum(r["failures"] for r in results),
        }

    def send(self, payload: bytes, sockets: int, count: int) -> None:
        """Make the first ``sockets`` sockets (in all) each send ``payload`` ``count`` times."""
        self._all(
            "send", {"payload": payload, "sockets": sockets // len(self.pipes), "count": count}
        )

    def reset(self, latency: bool = False) -> None:
        self._all("reset", {"latency": latency})

    def stats(self) -> dict[str, Any]:
        results = self._all("stats", {})
        firsts = [r["first"] for r in results if r["frames"]]
        lasts = [r["last"] for r in results if r["frames"]]
        return {
            "frames": sum(r["frames"] for r in results),
            "first": min(firsts, default=0.0),
            "last": max(lasts, default=0.0),
            "closed": sum(r["closed"] for r in results),
            "welcomed": sum(r["welcomed"] for r in results),
            "latencies": [x for r in results for x in r["latencies"]],
        }

    def disconnect(self) -> None:
        """Drop every socket at once (a network blip), keeping the workers."""
        self._all("disconnect", {})

    def close(self) -> None:
        self._all("close", {})
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
