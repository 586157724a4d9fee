"""A lean WebSocket load generator: many sockets per process, frames counted, not parsed.

Each worker process holds thousands of sockets as plain asyncio protocols: the
upgrade is written by hand, incoming frames are split by their headers only, and a
payload is looked at only to find the send timestamp of latency samples. The parent
drives workers through pipes (connect, reset counters, read counters, close). A
:class:`Probe` pings one socket at a fixed interval and times each ``pong``.
"""

from __future__ import annotations

import asyncio
import base64
import math
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
_REF = re.compile(rb'"ref":\s*([0-9]+)')
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

    #: Set on the one socket a :class:`Probe` pings: it takes the pongs.
    probe: Probe | None = None
    #: The server's close code, once it sent a close frame.
    close_code: int | None = None
    #: The status line of an accepted upgrade.
    ACCEPTED = b"HTTP/1.1 101"

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
        buffer = self._past_response_head(data)
        if buffer is None:
            return
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
                if length >= 2:
                    self.close_code = int.from_bytes(buffer[start : start + 2], "big")
                if self.transport is not None:
                    self.transport.close()
                return
            offset = end
        self.buffer = buffer[offset:]

    def _past_response_head(self, data: bytes) -> bytes | None:
        """``data`` (after what was kept) past the response head once it is complete and
        ``ACCEPTED``; None while it is incomplete or after a refusal (then failed)."""
        buffer = self.buffer + data if self.buffer else data
        if self.upgraded:
            return buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            self.buffer = buffer
            return None
        if not buffer.startswith(self.ACCEPTED):
            self._fail(buffer[: buffer.find(b"\r\n")].decode(errors="replace"))
            return None
        self.upgraded = True
        return buffer[end + 4 :]

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
        if self.probe is not None and self.probe.answered(buffer[start:end], now):
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


class Probe:
    """Sends ``{"type":"ping","ref":N}`` on one socket every ``interval`` seconds, and
    times the round trip of each ``{"type":"pong","ref":N}``.

    Times are ``time.perf_counter()``, the system-wide monotonic clock on Linux, so
    other processes can place the samples on their own timeline.
    """

    def __init__(self, client: Client, interval: float) -> None:
        self.client = client
        self.interval = interval
        #: Refs sent and not answered yet -> when each was sent.
        self.pending: dict[int, float] = {}
        #: (sent at, round trip seconds) of each answered ping.
        self.samples: list[tuple[float, float]] = []
        self.sent = 0
        client.probe = self
        self.task = asyncio.get_running_loop().create_task(self._ping())

    def _closed(self) -> bool:
        transport = self.client.transport
        return transport is None or transport.is_closing()

    async def _ping(self) -> None:
        started, tick = time.perf_counter(), 0
        while not self._closed():
            ref = self.sent
            self.pending[ref] = time.perf_counter()
            self.client.transport.write(  # type: ignore[union-attr]
                masked_frame(b'{"type":"ping","ref":%d}' % ref)
            )
            self.sent += 1
            # The next tick of a fixed schedule; ticks this process missed (it was not
            # scheduled) are skipped, not made up in a burst.
            late = math.ceil((time.perf_counter() - started) / self.interval)
            tick = max(tick + 1, late)
            await asyncio.sleep(started + tick * self.interval - time.perf_counter())

    def answered(self, payload: bytes, now: float) -> bool:
        """Whether ``payload`` (a text frame received at ``now``) was a pong to a ping."""
        if b'"pong"' not in payload:
            return False
        match = _REF.search(payload)
        sent_at = self.pending.pop(int(match.group(1)), None) if match else None
        if sent_at is None:
            return False
        self.samples.append((sent_at, now - sent_at))
        return True

    async def stop(self, grace: float) -> dict[str, Any]:
        """Stop pinging; pongs not back within ``grace`` seconds count as missing."""
        self.task.cancel()
        deadline = time.perf_counter() + grace
        while self.pending and not self._closed() and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        self.client.probe = None
        return {
            "sent": self.sent,
            "missing": len(self.pending),
            "samples": self.samples,
            "closed": self._closed(),
            "close_code": self.client.close_code,
        }


#: What starts a notification event in an SSE stream (notifyd's ``GET /sse``).
_SSE_NOTIFICATION = b"event: notification\n"


class SseClient(Client):
    """One Server-Sent Events stream (``sse``): the ``welcome`` event authenticates, each
    ``event: notification`` line counts as a frame. The body is chunked, but the marker
    never spans a chunk header (the server writes whole events): only the bytes that
    could start a marker are kept between reads."""

    #: The status line of an accepted stream.
    ACCEPTED = b"HTTP/1.1 200"

    def data_received(self, data: bytes) -> None:
        buffer = self._past_response_head(data)
        if buffer is None:
            return
        if not self.ready and b"event: welcome\n" in buffer:
            self.ready = True
            self.stats.welcomed += 1
            if not self.welcomed.done():
                self.welcomed.set_result(None)
        count = buffer.count(_SSE_NOTIFICATION)
        if count:
            now = time.perf_counter()
            for _ in range(count):
                self.stats.frame(now)
        if b"event: close\n" in buffer:
            self.stats.closed += 1
        self.buffer = buffer[-(len(_SSE_NOTIFICATION) - 1) :]


def sse_request(host: str, port: int, token: str) -> bytes:
    return (
        f"GET /sse HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n"
        f"Authorization: Bearer {token}\r\n\r\n"
    ).encode()


def upgrade_request(host: str, port: int, token: str, socketio: bool, query: str = "") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    path = SOCKETIO_PATH if socketio else "/ws" + (f"?{query}" if query else "")
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {token}\r\n\r\n"
    ).encode()


async def _open(
    clients: list[Client],
    stats: Stats,
    port: int,
    socketio: bool,
    tokens: list[str],
    query: str,
    sse: bool = False,
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
            if sse:
                request = sse_request("127.0.0.1", port, token)
            else:
                request = upgrade_request("127.0.0.1", port, token, socketio, query)
            kind = SseClient if sse else Client
            try:
                _, client = await loop.create_connection(
                    lambda: kind(request, stats, welcomed, socketio),
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


async def _worker(pipe: Connection, port: int, socketio: bool, sse: bool = False) -> None:
    loop = asyncio.get_running_loop()
    stats = Stats()
    clients: list[Client] = []
    probe: Probe | None = None
    while True:
        command, args = await loop.run_in_executor(None, pipe.recv)
        if command == "connect":
            tokens, query = args["tokens"], args["query"]
            pipe.send(await _open(clients, stats, port, socketio, tokens, query, sse))
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
        elif command == "probe":
            probe = Probe(clients[0], args["interval"]) if clients else None
            pipe.send("ok")
        elif command == "probe_stop":
            pipe.send(await probe.stop(args["grace"]) if probe is not None else None)
            probe = None
        elif command in ("disconnect", "close"):
            # The oldest ``count`` sockets (all without a count), aborted: a client drop.
            dropped = clients[: args.get("count")]
            for client in dropped:
                if client.transport is not None:
                    client.transport.abort()
            del clients[: len(dropped)]
            pipe.send("ok")
            if command == "close":
                return


def _worker_main(pipe: Connection, port: int, socketio: bool, sse: bool = False) -> None:
    lift_fd_limit()
    install_uvloop()
    asyncio.run(_worker(pipe, port, socketio, sse))


class LoadGenerator:
    """Sockets spread over worker processes (each under the per-process fd limit)."""

    def __init__(
        self, port: int, workers: int = 2, socketio: bool = False, sse: bool = False
    ) -> None:
        """``sse``: the sockets are ``GET /sse`` streams (notifyd only), not WebSockets."""
        context = mp.get_context("spawn")
        self.pipes: list[Connection] = []
        self.processes = []
        for _ in range(workers):
            parent, child = context.Pipe()
            process = context.Process(
                target=_worker_main, args=(child, port, socketio, sse), daemon=True
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

    def disconnect(self, count: int | None = None) -> None:
        """Drop every socket at once (a network blip), keeping the workers.

        With ``count``, only that many (in all, spread over the workers), the oldest.
        """
        if count is None:
            self._all("disconnect", {})
        else:
            workers = len(self.pipes)
            shares = [count // workers + (i < count % workers) for i in range(workers)]
            self._all("disconnect", [{"count": share} for share in shares])

    def probe(self, interval: float) -> None:
        """Start a :class:`Probe` on each worker's first socket."""
        self._all("probe", {"interval": interval})

    def probe_results(self, grace: float = 5.0) -> dict[str, Any]:
        """Stop the probes: pings sent, missing pongs, (sent at, round trip) samples."""
        results = [r for r in self._all("probe_stop", {"grace": grace}) if r is not None]
        return {
            "sent": sum(r["sent"] for r in results),
            "missing": sum(r["missing"] for r in results),
            "samples": sorted(s for r in results for s in r["samples"]),
            "closed": any(r["closed"] for r in results),
            "close_codes": [r["close_code"] for r in results if r["close_code"] is not None],
        }

    def close(self) -> None:
        self._all("close", {})
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
