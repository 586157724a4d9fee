"""Benchmarks: notifyd and its baselines, measured side by side in one run.

    python benchmarks/run.py            # the whole suite (`make bench`), ~17 minutes here
    python benchmarks/run.py --quick    # small counts, for development
    python benchmarks/run.py --quick --scenarios churn --only notifyd naive   # a subset

Every server runs as its own process against one private RabbitMQ node; the load
generator holds the sockets in two other processes. Results: a JSON file per run in
benchmarks/results/, the ratio table in benchmarks/README.md, and a latency plot.

On a 2-core machine the server, RabbitMQ, the publisher and the load generator share
the cores, so wall-clock rates understate what a server does alone. Each rate is
therefore reported twice: per wall-clock second, and per second of the server's own
CPU time (``/proc/<pid>/stat``), which is what a dedicated core would give.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aio_pika  # noqa: E402

from benchmarks import lift_fd_limit  # noqa: E402
from benchmarks.loadgen import LoadGenerator  # noqa: E402
from notifyd.amqp import EXCHANGE, HISTORY_STREAM  # noqa: E402
from notifyd.auth import mint_token  # noqa: E402
from notifyd.devbroker import RabbitNode, free_port  # noqa: E402
from notifyd.metrics import GC_TRACKED_MAX_AGE  # noqa: E402

SECRET = "benchmark-secret-benchmark-secret-123456"
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "benchmarks" / "README.md"
# notifyd-classic right after notifyd: its figures are read against notifyd's, so
# RabbitMQ should be in the same state for both.
ALL_SERVERS = [
    "notifyd",
    "notifyd-classic",
    "notifyd-2w",
    "naive",
    "raw",
    "socketio",
    "notifyd-stream",
    "notifyd-sse",
]
#: Every scenario (``--scenarios``); see benchmarks/README.md.
SCENARIOS = ["idle", "fanout", "latency", "upstream", "storms", "resume", "churn"]
#: The scenarios that share one server process with ``config["sockets"]`` sockets open.
SHARED = {"fanout", "latency", "upstream", "storms"}
#: The servers whose memory per idle socket is compared (in a process of its own).
IDLE_SERVERS = ("notifyd", "naive", "socketio")
#: The servers the churn scenario runs against.
CHURN_SERVERS = ("notifyd", "naive")
#: The churn's floor (``--only`` only, the churn only): a bare asyncio protocol that
#: answers the upgrade and pings and nothing else, on uvloop, on the stdlib loop, and
#: on uvloop verifying each upgrade's token (benchmarks/baselines/bare_server.py).
FLOOR_SERVERS = ["bare", "bare-asyncio", "bare-jwt"]
#: notifyd settings for the churn: the pinger's socket sends 10 messages/s, well under
#: the rate limit, but a stall of the server's loop bunches them, and the default
#: burst (40) would close the measuring socket with 4029 after a 4 s stall.
CHURN_SETTINGS = {"NOTIFYD_WS_RATE_BURST": "1000"}
#: Niceness of the server and the pinger in the churn, as root (lowering it needs
#: root). On a small machine the server shares its cores with RabbitMQ and the load
#: generator, which in a deployment run elsewhere; at the same niceness they take the
#: CPU from a server that has work in time slices of several ms, and a ping's round
#: trip measures the scheduler: in the unniced runs of this machine most pings over 5
#: ms were passes in which the server had under a fifth of the wall time on a CPU
#: (benchmarks/stallwatch.py). Niced, the server's own stalls (collections, a burst
#: of EOFs, of upgrades) are what is left. ``--nice N`` overrides it (0: not niced).
CHURN_NICE = -15
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: File descriptors a server needs besides its sockets (listener, RabbitMQ, logs, ...).
FD_SPARE = 256
GC_ACTIONS = ("full", "young", "freeze")

FULL = {
    "sockets": 10_000,
    "levels": [1_000, 5_000, 10_000, 18_000],
    "repeats": 3,
    "broadcasts": 40,
    "broadcasts_slow": 8,
    "rates": [1_000, 5_000, None],
    "latency_seconds": 5,
    "warmup_seconds": 2,
    "max_count": 30_000,
    "resume_sockets": 5_000,
    "resume_gap": 10,
    "upstream_sockets": 2_000,
    "upstream_each": 20,
    "churn_sockets": 15_000,
    "churn_wave": 5_000,
    "churn_waves": 2,
    "ping_interval": 0.1,
    "churn_lead_seconds": 2.0,
    "churn_tail_seconds": 3.0,
}
QUICK = {
    "sockets": 2_000,
    "levels": [1_000, 2_000, 3_000],
    "repeats": 2,
    "broadcasts": 20,
    "broadcasts_slow": 5,
    "rates": [1_000, None],
    "latency_seconds": 2,
    "warmup_seconds": 1,
    "max_count": 5_000,
    "resume_sockets": 1_000,
    "resume_gap": 5,
    "upstream_sockets": 500,
    "upstream_each": 10,
    "churn_sockets": 3_000,
    "churn_wave": 1_000,
    "churn_waves": 2,
    "ping_interval": 0.1,
    "churn_lead_seconds": 1.0,
    "churn_tail_seconds": 2.0,
}


# --- the server under test ---------------------------------------------------------------


def _family(pid: int) -> list[int]:
    try:
        return [pid, *map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]
    except OSError:
        return [pid]


def rss_kib(pid: int) -> int:
    """Resident memory of a process and its children (KiB)."""
    total = 0
    for member in _family(pid):
        for line in Path(f"/proc/{member}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children so far."""
    ticks = 0
    for member in _family(pid):
        fields = Path(f"/proc/{member}/stat").read_text().rpartition(")")[2].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / CLOCK_TICKS


def fds_fit(sockets: int) -> bool:
    """Whether a server may hold ``sockets`` sockets under the open-file limit it inherits."""
    return sockets + FD_SPARE <= resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def server_command(
    kind: str,
    port: int,
    amqp_url: str,
    settings: Mapping[str, str] | None = None,
    stallwatch: str | None = None,
    code: Path = ROOT,
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of a server; ``settings``: notifyd's only.

    With ``stallwatch`` (a file), notifyd runs under benchmarks/stallwatch.py; ``code``:
    the checkout it runs from."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    if kind.startswith("notifyd"):
        env.update(
            {
                "NOTIFYD_AMQP_URL": amqp_url,
                "NOTIFYD_AUTH_SECRET": SECRET,
                "NOTIFYD_SERVER_PORT": str(port),
                "NOTIFYD_SERVER_HOST": "127.0.0.1",
                "NOTIFYD_SERVER_WORKERS": "2" if kind == "notifyd-2w" else "1",
                "NOTIFYD_SERVER_MAX_CONNECTIONS": "100000",
                "NOTIFYD_HISTORY_BACKEND": "stream" if kind == "notifyd-stream" else "memory",
                **({"NOTIFYD_AMQP_QUEUE_TYPE": "classic"} if kind == "notifyd-classic" else {}),
                **(settings or {}),
            }
        )
        module = "notifyd"
        if stallwatch:
            env["STALLWATCH_OUT"] = stallwatch
            module = "benchmarks.stallwatch"
        return [sys.executable, "-m", module, "--log-level", "WARNING", "serve"], env
    common = ["--port", str(port), "--amqp-url", amqp_url, "--secret", SECRET]
    if kind == "socketio":
        return [sys.executable, "-m", "benchmarks.baselines.socketio_server", *common], env
    if kind in FLOOR_SERVERS:
        options = {"bare": [], "bare-asyncio": ["--loop", "asyncio"], "bare-jwt": ["--jwt"]}
        module = "benchmarks.baselines.bare_server"
        return [sys.executable, "-m", module, *common, *options[kind]], env
    module = "benchmarks.baselines.aiohttp_server"
    return [sys.executable, "-m", module, "--mode", kind, *common], env


def _probe_path(kind: str) -> str:
    if kind.startswith("notifyd"):
        return "/readyz"
    return "/socket.io/?EIO=4&transport=polling" if kind == "socketio" else "/"


@contextmanager
def running(
    kind: str,
    amqp_url: str,
    settings: Mapping[str, str] | None = None,
    nice: int = 0,
    stallwatch: str | None = None,
    cpu: int | None = None,
    code: Path = ROOT,
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    command, env = server_command(kind, port, amqp_url, settings, stallwatch, code)
    # A file, not a pipe: a pipe nobody reads would block a chatty server.
    with tempfile.TemporaryFile() as log:
        if cpu is not None:
            command = ["taskset", "-c", str(cpu), *command]  # execs, as nice does
        if nice:
            command = ["nice", "-n", str(nice), *command]  # nice execs: the pid is the server's
        process = subprocess.Popen(command, env=env, cwd=code, stdout=log, stderr=log)
        try:
            _wait_until_serving(kind, process, port, log)
            yield process, port
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
            log.seek(0)
            tracebacks = log.read().decode(errors="replace").count("Traceback")
            if tracebacks:
                print(f"  {kind}: {tracebacks} tracebacks in its log", flush=True)


def _wait_until_serving(
    kind: str, process: subprocess.Popen[bytes], port: int, log: IO[bytes]
) -> None:
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{kind} exited: {log.read().decode()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{_probe_path(kind)}", timeout=1)
            break
        except urllib.error.HTTPError as exc:
            if exc.code in (400, 401, 404):
                break  # answering: that is all the probe asks
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{kind} did not start")
        time.sleep(0.2)
    time.sleep(0.5)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})? (\S+)$", re.M)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metrics_text(port: int) -> str | None:
    """The server's /metrics page; None if it has none (the baselines)."""
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        body: bytes = urllib.request.urlopen(url, timeout=5).read()
        return body.decode()
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def samples(text: str, metric: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of ``metric`` on a /metrics page: (labels, value)."""
    return [
        (dict(_LABEL.findall(labels)), float(value))
        for name, labels, value in _SAMPLE.findall(text)
        if name == metric
    ]


def scrape(port: int, metric: str) -> float:
    """Sum of a notifyd metric's samples on /metrics."""
    return sum(value for _, value in samples(metrics_text(port) or "", metric))


def tracked_objects(port: int) -> float | None:
    """``notifyd_gc_tracked_objects``; None where the server does not export it."""
    found = samples(metrics_text(port) or "", "notifyd_gc_tracked_objects")
    return found[0][1] if found else None


def gc_pauses(port: int) -> dict[str, dict[str, float]] | None:
    """``notifyd_gc_pause_seconds`` by action: ``count``, ``sum`` and the cumulative
    bucket counts (keyed by their ``le``); None where the server does not export it."""
    text = metrics_text(port)
    if text is None or "notifyd_gc_pause_seconds" not in text:
        return None
    pauses: dict[str, dict[str, float]] = {action: {} for action in GC_ACTIONS}
    for suffix in ("count", "sum", "bucket"):
        for labels, value in samples(text, f"notifyd_gc_pause_seconds_{suffix}"):
            pauses.setdefault(labels["action"], {})[labels.get("le", suffix)] = value
    return pauses


def pauses_between(
    before: dict[str, dict[str, float]] | None, after: dict[str, dict[str, float]] | None
) -> dict[str, dict[str, Any]] | None:
    """The collections between two :func:`gc_pauses` readings, by action: how many, the
    seconds they took in all, and the histogram bucket the longest fell in (``"<= 2.5"``,
    ``"> 2.5"`` beyond the last bound; None without a collection)."""
    if before is None or after is None:
        return None
    between: dict[str, dict[str, Any]] = {}
    for action, now in after.items():
        delta = {key: value - before.get(action, {}).get(key, 0.0) for key, value in now.items()}
        count = delta.get("count", 0.0)
        bounds = sorted((float(key), key) for key in delta if key not in ("count", "sum"))
        longest = None
        for index, (bound, key) in enumerate(bounds):
            if count and delta[key] >= count:
                longest = f"<= {key}" if bound != float("inf") else f"> {bounds[index - 1][1]}"
                break
        between[action] = {
            "count": int(count),
            "seconds": delta.get("sum", 0.0),
            "longest": longest,
        }
    return between


# --- publishing --------------------------------------------------------------------------


class Publisher:
    """Publishes the same notifications to any server: AMQP, or socket.io's own manager."""

    def __init__(self, kind: str, amqp_url: str) -> None:
        self.kind = kind
        self.amqp_url = amqp_url
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self._open())

    async def _open(self) -> None:
        if self.kind == "socketio":
            import socketio

            self.manager = socketio.AsyncAioPikaManager(
                self.amqp_url, channel="notifyd-bench", write_only=True
            )
            await self.manager.emit("warmup", {}, room="nobody")
        else:
            self.connection = await aio_pika.connect(self.amqp_url)
            channel = await self.connection.channel(publisher_confirms=False)
            self.exchange = await channel.declare_exchange(
                EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
            )

    async def _send(self, routing_key: str, message_id: str | None) -> None:
        data = {"sent": time.time(), "text": "benchmark notification payload"}
        if self.kind == "socketio":
            room = None if routing_key == "broadcast" else routing_key
            await self.manager.emit("n", data, room=room)
        else:
            body = json.dumps({"event": "bench", "data": data}).encode()
            message = aio_pika.Message(body, message_id=message_id)
            await self.exchange.publish(message, routing_key)

    def publish(self, keys: list[str], rate: float | None, message_id: str | None = None) -> float:
        """Publish one message per key, at ``rate`` per second (None: as fast as possible)."""

        async def go() -> float:
            started = time.perf_counter()
            for index, key in enumerate(keys):
                if rate:
                    delay = started + index / rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await self._send(key, message_id)
            return time.perf_counter() - started

        return self.loop.run_until_complete(go())

    def close(self) -> None:
        async def close() -> None:
            if self.kind != "socketio":
                await self.connection.close()
            elif self.manager.publisher_connection is not None:
                await self.manager.publisher_connection.close()

        self.loop.run_until_complete(close())
        self.loop.close()


def drop_queue(amqp_url: str, name: str) -> None:
    """Delete a queue (or stream) a server left behind."""

    async def drop() -> None:
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(name)

    asyncio.run(drop())


def publish(kind: str, amqp_url: str, keys: list[str], rate: float | None = None) -> float:
    publisher = Publisher(kind, amqp_url)
    try:
        return publisher.publish(keys, rate)
    finally:
        publisher.close()


# --- measuring ---------------------------------------------------------------------------


def wait_frames(load: LoadGenerator, expected: int, timeout: float) -> dict[str, Any]:
    """Counters once ``expected`` frames arrived, or nothing more came for 5 s."""
    deadline = time.monotonic() + timeout
    stats = load.stats()
    previous, stalled_since = -1, time.monotonic()
    while stats["frames"] < expected and time.monotonic() < deadline:
        time.sleep(0.1)
        stats = load.stats()
        if stats["frames"] != previous:
            previous, stalled_since = stats["frames"], time.monotonic()
        elif time.monotonic() - stalled_since > 5:
            break
    return stats


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def span(stats: dict[str, Any]) -> float:
    return float(max(1e-6, stats["last"] - stats["first"]))


def tokens_for(prefix: str, count: int) -> list[str]:
    return [mint_token(SECRET, f"{prefix}{i}", 3600) for i in range(count)]


class Bench:
    """The scenarios against one kind of server: one process for those that share its
    open sockets, a fresh one for the idle sockets, and another for the churn."""

    def __init__(
        self, kind: str, amqp_url: str, config: dict[str, Any], scenarios: set[str]
    ) -> None:
        self.kind = kind
        self.amqp_url = amqp_url
        self.config = config
        self.scenarios = scenarios
        self.result: dict[str, Any] = {"server": kind}

    def run(self) -> dict[str, Any]:
        wanted = self.scenarios
        if self.kind in FLOOR_SERVERS:
            if "churn" in wanted:
                with self.serving():
                    self.churn()
        elif self.kind == "notifyd-stream":
            if "resume" in wanted:
                with self.serving():
                    self.resume_storm()
                # Bound to the notifyd exchange with "#", the stream would otherwise
                # store every message the servers after this one are sent.
                drop_queue(self.amqp_url, HISTORY_STREAM)
        elif self.kind == "notifyd-classic":
            # The per-user path without the quorum queue's Raft log (RabbitMQ's share
            # of the latency): notifyd's own, next to the default's.
            if "latency" in wanted:
                with self.serving():
                    self.open_sockets()
                    self.per_user_latency()
        elif self.kind == "notifyd-sse":
            # The fan-out over Server-Sent Events: same sockets, same broadcasts.
            if "fanout" in wanted:
                with self.serving():
                    self.open_sockets()
                    self.fanout()
        elif wanted & SHARED:
            with self.serving():
                self.open_sockets()
                if "fanout" in wanted:
                    self.fanout()
                if "latency" in wanted and self.kind != "notifyd-2w":
                    self.per_user_latency()
                if "upstream" in wanted and self.kind == "notifyd":
                    self.upstream()
                # socket.io's storms after a mass disconnect take over a minute each.
                if "storms" in wanted and self.kind not in ("notifyd-2w", "socketio"):
                    self.reconnect_storms()
        if "idle" in wanted and self.kind in IDLE_SERVERS:
            with self.serving():
                self.idle_sockets()
        if "churn" in wanted and self.kind in CHURN_SERVERS:
            with self.serving(CHURN_SETTINGS, self.config["churn_nice"]):
                self.churn()
        return self.result

    @contextmanager
    def serving(
        self, settings: Mapping[str, str] | None = None, nice: int | None = None
    ) -> Iterator[None]:
        """A fresh server process (at ``nice``, default ``--nice``'s), and a load
        generator for it."""
        watch, cpu = self.config["stallwatch"], self.config["pin"]
        nice = self.config["nice"] if nice is None else nice
        code = self.config["code"]
        with running(self.kind, self.amqp_url, settings, nice, watch, cpu, code) as (
            process,
            port,
        ):
            self.pid, self.port = process.pid, port
            self.load = LoadGenerator(
                port, workers=2, socketio=self.kind == "socketio", sse=self.kind == "notifyd-sse"
            )
            try:
                yield
            finally:
                self.load.close()

    def log(self, text: str) -> None:
        print(f"  {self.kind}: {text}", flush=True)

    def open_sockets(self) -> None:
        """The first ``sockets`` sockets, in steps of ``levels``: the connect storm."""
        sockets = self.config["sockets"]
        tokens = tokens_for("b", sockets)
        seconds, cpu, opened = 0.0, 0.0, 0
        for level in (*(lv for lv in self.config["levels"] if lv < sockets), sockets):
            cpu_before = cpu_seconds(self.pid)
            step = self.load.connect(tokens[opened:level])
            cpu += cpu_seconds(self.pid) - cpu_before
            seconds += step["seconds"]
            opened = level
            if step["failures"]:
                self.log(f"{step['failures']} connects failed")
            time.sleep(1.0)
        self.connect_runs = [(sockets / seconds, sockets / max(cpu, 1e-6))]
        self._connect_result()
        self.result["connect_failures"] = sockets - self.load.stats()["welcomed"]
        self.log(f"connect storm {self.result['connect_rate']:.0f} sockets/s")

    def idle_sockets(self) -> None:
        """RSS (and GC-tracked objects, where the server exports them) per socket at each
        of ``levels`` sockets open, in a server process that has done nothing else."""
        levels = [level for level in self.config["levels"] if fds_fit(level)]
        skipped = [level for level in self.config["levels"] if level not in levels]
        if skipped:
            self.log(f"over the open-file limit, skipped: {skipped} sockets")
        tokens = tokens_for("i", max(levels))
        base_rss, base_objects = rss_kib(self.pid), tracked_objects(self.port)
        self.result.update(rss_kib_per_socket={}, gc_objects_per_socket={})
        opened = 0
        for level in levels:
            step = self.load.connect(tokens[opened:level])
            opened = level
            open_at = time.monotonic()
            if step["failures"]:
                self.log(f"{step['failures']} connects failed")
            time.sleep(1.0)
            per_socket = (rss_kib(self.pid) - base_rss) / level
            self.result["rss_kib_per_socket"][str(level)] = per_socket
            text = f"{level} sockets open, {per_socket:.1f} KiB/socket"
            objects = None
            if base_objects is not None:
                # notifyd counts them at most once per GC_TRACKED_MAX_AGE: a value read
                # that long after the level is open was counted with all of it open.
                time.sleep(max(0.0, open_at + GC_TRACKED_MAX_AGE + 0.5 - time.monotonic()))
                objects = tracked_objects(self.port)
            if objects is not None and base_objects is not None:
                per_socket = (objects - base_objects) / level
                self.result["gc_objects_per_socket"][str(level)] = per_socket
                text += f", {per_socket:.1f} GC-tracked objects/socket"
            self.log(text)

    def fanout(self) -> None:
        """Broadcasts to every open socket, ``repeats`` times."""
        sockets = self.config["sockets"]
        count = self.config["broadcasts_slow" if self.kind == "socketio" else "broadcasts"]
        runs, per_cpu = [], []
        for _ in range(self.config["repeats"]):
            self.load.reset()
            cpu_before = cpu_seconds(self.pid)
            publish(self.kind, self.amqp_url, ["broadcast"] * count)
            stats = wait_frames(self.load, count * sockets, timeout=120)
            cpu = cpu_seconds(self.pid) - cpu_before
            runs.append(stats["frames"] / span(stats))
            per_cpu.append(stats["frames"] / max(cpu, 1e-6))
            self.log(
                f"fan-out {stats['frames']} frames in {span(stats):.2f}s = {runs[-1]:.0f}/s, "
                f"{cpu:.2f} CPU s = {per_cpu[-1]:.0f}/CPU s"
            )
            time.sleep(0.5)
        self.result["fanout"] = statistics.median(runs)
        self.result["fanout_per_cpu_s"] = statistics.median(per_cpu)
        self.result["fanout_runs"] = runs

    def _connect_result(self) -> None:
        self.result["connect_rate"] = statistics.median(r[0] for r in self.connect_runs)
        self.result["connect_per_cpu_s"] = statistics.median(r[1] for r in self.connect_runs)
        self.result["connect_runs"] = self.connect_runs

    def reconnect_storms(self) -> None:
        """Every socket drops at once, then as many new users connect: more storms.

        The first storm (into an empty server) is repeated ``repeats - 1`` times
        after a mass disconnect, which is how storms happen in production.
        """
        sockets = self.config["sockets"]
        for repeat in range(1, self.config["repeats"]):
            self.load.disconnect()
            time.sleep(2.0)  # the server notices the closes and cleans up
            storm = self._storm(tokens_for(f"s{repeat}-", sockets), "")
            rate, per_cpu = sockets / storm["seconds"], sockets / max(storm["cpu_seconds"], 1e-6)
            self.connect_runs.append((rate, per_cpu))
            self.log(
                f"reconnect storm {rate:.0f} sockets/s, {per_cpu:.0f}/CPU s, "
                f"{storm['failures']} failed"
            )
        self._connect_result()

    def per_user_latency(self) -> None:
        """Publish to random single users at fixed rates; latency publish -> receive."""
        users = [f"user.b{i}" for i in range(self.config["sockets"])]
        rates = self.config["rates"][:1] if self.kind == "socketio" else self.config["rates"]
        repeats = self.config["repeats"]
        self.result["latency"] = {}
        for rate in rates:
            # Warm up at the same rate first: what is measured is steady traffic, not
            # the garbage collection that follows the connect storm and the fan-out.
            warmup = int(rate * self.config["warmup_seconds"]) if rate else 5_000
            self.load.reset()
            publish(self.kind, self.amqp_url, random.choices(users, k=warmup), rate)
            wait_frames(self.load, warmup, timeout=60)
            count = int(rate * self.config["latency_seconds"]) if rate else self.config["max_count"]
            windows = [self._latency_window(users, count, rate) for _ in range(repeats)]
            label = str(rate) if rate else "max"
            # Each figure is the median over the repeated windows; every window is kept.
            point = {key: statistics.median(w[key] for w in windows) for key in windows[0]}
            self.result["latency"][label] = {**point, "windows": windows}
            self.log(
                f"per-user @ {label}/s, median of {repeats}: "
                + ", ".join(f"{k}={v:.1f}" for k, v in point.items())
            )
        # Ingest: the unthrottled run, consumed from RabbitMQ and delivered.
        if "max" in self.result["latency"]:
            self.result["ingest"] = self.result["latency"]["max"]

    def _latency_window(self, users: list[str], count: int, rate: int | None) -> dict[str, float]:
        keys = random.choices(users, k=count)
        self.load.reset(latency=True)
        cpu_before = cpu_seconds(self.pid)
        publish(self.kind, self.amqp_url, keys, rate)
        stats = wait_frames(self.load, count, timeout=60)
        cpu = cpu_seconds(self.pid) - cpu_before
        samples = stats["latencies"]
        return {
            "published": count,
            "delivered": stats["frames"],
            "delivered_per_s": stats["frames"] / span(stats),
            "delivered_per_cpu_s": stats["frames"] / max(cpu, 1e-6),
            "p50_ms": percentile(samples, 0.5) * 1000,
            "p99_ms": percentile(samples, 0.99) * 1000,
            "p999_ms": percentile(samples, 0.999) * 1000,
        }

    def upstream(self) -> None:
        """Client ``send`` messages through the server to RabbitMQ, with confirms."""
        sockets, each = self.config["upstream_sockets"], self.config["upstream_each"]
        expected = sockets * each
        self.load.reset()
        cpu_before = cpu_seconds(self.pid)
        payload = b'{"type":"send","event":"position","data":{"lat":48.85,"lon":2.35}}'
        self.load.send(payload, sockets, each)
        stats = wait_frames(self.load, expected, timeout=60)
        cpu = cpu_seconds(self.pid) - cpu_before
        accepted = scrape(self.port, "notifyd_upstream_messages_total")
        self.result["upstream"] = {
            "sent": expected,
            "answered": stats["frames"],
            "accepted": accepted,
            "per_s": stats["frames"] / span(stats),
            "per_cpu_s": stats["frames"] / max(cpu, 1e-6),
        }
        self.log(f"upstream: {self.result['upstream']}")

    def resume_storm(self) -> None:
        """N sockets connect at once; then N more that each resume over a gap, compared."""
        sockets, gap = self.config["resume_sockets"], self.config["resume_gap"]
        fresh = self._storm(tokens_for("p", sockets), "")
        anchor = f"anchor-{random.getrandbits(64):x}"
        anchor_ts = int(time.time() * 1000)
        publisher = Publisher(self.kind, self.amqp_url)
        publisher.publish(["broadcast"], None, message_id=anchor)
        publisher.publish(["broadcast"] * gap, None)
        publisher.close()
        time.sleep(1.0)  # the fresh sockets got the gap live; wait until it is in the stream
        reads_before = scrape(self.port, "notifyd_history_reads_total")
        query = f"since={anchor}&since_ts={anchor_ts}"
        resumed = self._storm(tokens_for("r", sockets), query, replayed=sockets * gap)
        resumed["history_reads"] = scrape(self.port, "notifyd_history_reads_total") - reads_before
        self.result["resume"] = {"sockets": sockets, "gap": gap, "fresh": fresh, "resumed": resumed}
        self.log(f"resume storm: {self.result['resume']}")

    def churn(self) -> None:
        """Waves of sockets dropping and new users connecting, timed by a separate client.

        ``churn_sockets`` sockets are opened (a user each); then each of ``churn_waves``
        waves drops the oldest ``churn_wave`` of them and as many new users connect.
        Another process holds one more socket and pings every ``ping_interval`` s, from
        ``churn_lead_seconds`` before the first wave until ``churn_tail_seconds`` after
        the server went quiet after the last: the pong round trips are what a client
        that stays connected feels.
        """
        config = self.config
        total, size, count = config["churn_sockets"], config["churn_wave"], config["churn_waves"]
        if not fds_fit(total + 1):
            self.log(f"churn skipped: {total} sockets are over the open-file limit")
            return
        opened = self._storm(tokens_for("c0-", total), "")
        self.log(f"churn: {total} sockets open in {opened['seconds']:.1f}s")
        self._until_quiet()
        pinger = LoadGenerator(self.port, workers=1)
        if config["churn_nice"]:
            for process in pinger.processes:
                os.setpriority(os.PRIO_PROCESS, process.pid or 0, config["churn_nice"])
        try:
            if pinger.connect(tokens_for("ping", 1))["failures"]:
                raise RuntimeError(f"{self.kind}: the pinging socket did not connect")
            pauses_before, rss_before = gc_pauses(self.port), rss_kib(self.pid)
            pinged_from = time.perf_counter()
            pinger.probe(config["ping_interval"])
            time.sleep(config["churn_lead_seconds"])
            waves = [self._wave(number, size) for number in range(1, count + 1)]
            time.sleep(config["churn_tail_seconds"])
            pings = pinger.probe_results()
        finally:
            pinger.close()
        pauses = pauses_between(pauses_before, gc_pauses(self.port))
        for wave in waves:
            # The pings sent while the wave and what it left the server to do went on.
            start, end = wave.pop("started"), wave.pop("ended")
            during = [(rtt, sent) for sent, rtt in pings["samples"] if start <= sent < end]
            wave["pings"] = len(during)
            worst = max(during, default=(float("nan"), start))
            wave["rtt_max_ms"] = worst[0] * 1000
            # When the worst ping was sent, seconds after the drop; and how many pings
            # took over 50 ms and over 5 ms (the targets' worst and p99).
            wave["rtt_max_at_s"] = worst[1] - start
            wave["over_50ms"] = sum(rtt > 0.05 for rtt, _ in during)
            wave["over_5ms"] = sum(rtt > 0.005 for rtt, _ in during)
            wave["from_s"], wave["to_s"] = start - pinged_from, end - pinged_from
        rtts = [rtt for _, rtt in pings["samples"]]
        result = self.result["churn"] = {
            "sockets": total,
            "wave": size,
            "initial": opened,
            "pings": pings["sent"],
            "pongs": len(rtts),
            "missing_pongs": pings["missing"],
            "pinger_closed": pings["closed"],
            "pinger_close_codes": pings["close_codes"],
            "nice": config["churn_nice"],
            "rtt_p50_ms": percentile(rtts, 0.5) * 1000,
            "rtt_p99_ms": percentile(rtts, 0.99) * 1000,
            "rtt_max_ms": max(rtts, default=float("nan")) * 1000,
            "rss_kib_before": rss_before,
            "rss_kib_after": [wave["rss_kib"] for wave in waves],
            "rss_growth": waves[-1]["rss_kib"] / waves[0]["rss_kib"],
            "waves": waves,
            "gc_pauses": pauses,
            # (seconds since the first ping, round trip ms) of every answered ping.
            "samples": [
                (round(sent - pinged_from, 4), round(rtt * 1000, 3))
                for sent, rtt in pings["samples"]
            ],
        }
        full = (pauses or {}).get("full")
        self.log(
            f"churn: {result['pongs']} of {result['pings']} pongs, RTT p50 "
            f"{result['rtt_p50_ms']:.2f} p99 {result['rtt_p99_ms']:.2f} "
            f"max {result['rtt_max_ms']:.1f} ms; RSS after each wave "
            f"{result['rss_kib_after']} KiB; full collections: {full}; each wave's worst "
            + ", ".join(
                f"{w['rtt_max_ms']:.1f} ms at +{w['rtt_max_at_s']:.2f} s "
                f"({w['over_50ms']} over 50 ms, {w['over_5ms']} over 5 ms)"
                for w in waves
            )
        )

    def _wave(self, number: int, size: int) -> dict[str, Any]:
        """Drop the oldest ``size`` sockets and connect ``size`` new users; wait until
        the server is quiet again."""
        started, cpu_before = time.perf_counter(), cpu_seconds(self.pid)
        self.load.disconnect(size)
        storm = self._storm(tokens_for(f"c{number}-", size), "")
        seconds = time.perf_counter() - started
        settle = self._until_quiet()
        wave = {
            "started": started,
            "ended": time.perf_counter(),
            "seconds": seconds,
            "connect_seconds": storm["seconds"],
            "settle_seconds": settle,
            "cpu_seconds": cpu_seconds(self.pid) - cpu_before,
            "failures": storm["failures"],
            "rss_kib": rss_kib(self.pid),
        }
        self.log(f"churn wave {number}: {wave}")
        return wave

    def _until_quiet(self, timeout: float = 30.0) -> float:
        """Wait (at least 1 s) until the server used under 20 % of a core for 0.5 s:
        what a wave left it to do (closes, a full collection) is done. Seconds waited."""
        started = time.perf_counter()
        time.sleep(0.5)
        cpu = cpu_seconds(self.pid)
        while time.perf_counter() - started < timeout:
            time.sleep(0.5)
            now = cpu_seconds(self.pid)
            if now - cpu < 0.1:
                break
            cpu = now
        return time.perf_counter() - started

    def _storm(self, tokens: list[str], query: str, replayed: int = 0) -> dict[str, float]:
        self.load.reset()
        cpu_before = cpu_seconds(self.pid)
        step = self.load.connect(tokens, query)
        stats = wait_frames(self.load, replayed, timeout=60) if replayed else self.load.stats()
        seconds = (
            max(step["seconds"], stats["last"] - stats["first"]) if replayed else step["seconds"]
        )
        return {
            "seconds": seconds,
            "cpu_seconds": cpu_seconds(self.pid) - cpu_before,
            "failures": step["failures"],
            "replayed_frames": stats["frames"],
        }


# --- reporting ---------------------------------------------------------------------------


def ratios(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """(measure, notifyd, baseline, ratio) rows for the README table: each measure that
    notifyd has in this run, against each baseline that has it too."""
    n = results["notifyd"]
    rows = []

    def row(
        measure: str,
        value: float,
        other: str | None,
        other_value: float | None,
        fmt: str = "{:,.0f}",
    ) -> None:
        if other is None or other_value is None:  # no baseline measures it
            rows.append((measure, fmt.format(value), "—", "—"))
            return
        ratio = f"{value / other_value:.2f}" if other_value else "n/a"
        rows.append((measure, fmt.format(value), f"{other}: {fmt.format(other_value)}", ratio))

    def compare(measure: str, key: str, bases: tuple[str, ...]) -> None:
        for base in bases:
            if key in n and key in results.get(base, {}):
                row(measure, n[key], base, results[base][key])

    for key, label in (("fanout_per_cpu_s", "per server CPU s"), ("fanout", "per wall s")):
        compare(f"broadcast fan-out, frames {label}", key, ("naive", "socketio", "raw"))
    sse = results.get("notifyd-sse", {})
    for key, label in (("fanout_per_cpu_s", "per server CPU s"), ("fanout", "per wall s")):
        if key in n and key in sse:
            row(f"fan-out over SSE vs WebSocket, frames {label}", sse[key], "WebSocket", n[key])
    if "fanout" in n and "fanout" in results.get("notifyd-2w", {}):
        two = results["notifyd-2w"]["fanout"]
        row("fan-out, 2 workers vs 1, frames per wall s", two, "1 worker", n["fanout"])
    for key, label in (("connect_per_cpu_s", "per server CPU s"), ("connect_rate", "per wall s")):
        compare(f"connect storm, sockets {label}", key, ("naive", "socketio", "raw"))
    for base in ("naive", "socketio"):
        others = results.get(base, {}).get("rss_kib_per_socket", {})
        for level, value in n.get("rss_kib_per_socket", {}).items():
            if level in others:
                row(f"RSS per idle socket at {level}, KiB", value, base, others[level], "{:.1f}")
    for level, value in n.get("gc_objects_per_socket", {}).items():
        row(f"GC-tracked objects per idle socket at {level}", value, None, None, "{:.1f}")
    for base in ("naive", "raw"):
        if "ingest" in n and "ingest" in results.get(base, {}):
            for key, label in (("delivered_per_s", "wall s"), ("delivered_per_cpu_s", "CPU s")):
                other = results[base]["ingest"][key]
                row(f"ingest, per-user notifications per {label}", n["ingest"][key], base, other)
    churn = n.get("churn")
    if churn:
        naive = results.get("naive", {}).get("churn", {})
        for key, measure, fmt in (
            ("rtt_max_ms", "churn, worst ping round trip, ms", "{:,.1f}"),
            ("rtt_p99_ms", "churn, ping round trip p99, ms", "{:.2f}"),
            ("rss_growth", f"churn, RSS after wave {len(churn['waves'])} / after wave 1", "{:.3f}"),
        ):
            row(measure, churn[key], "naive", naive.get(key), fmt)
    return rows


def _full_collections(pauses: dict[str, dict[str, Any]] | None) -> str:
    if pauses is None:
        return "n/a"
    full = pauses.get("full", {"count": 0})
    if not full["count"]:
        return "none"
    return f"{full['count']}: {full['seconds']:.2f} s in all, longest {full['longest']} s"


def churn_table(results: dict[str, dict[str, Any]]) -> list[str]:
    churns = {kind: result["churn"] for kind, result in results.items() if "churn" in result}
    if not churns:
        return []
    first = next(iter(churns.values()))
    niced = f" (server and pinger at nice {first['nice']})" if first.get("nice") else ""
    lines = [
        "",
        f"| churn: {first['sockets']:,} sockets, waves of {first['wave']:,} dropped + "
        f"{first['wave']:,} new{niced} | pongs / pings | p50 ms | p99 ms | worst ms "
        "| RSS after each wave, MiB (last / first) | each wave: wall s + settling s, server CPU s "
        "| full collections |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, churn in churns.items():
        pongs = f"{churn['pongs']:,} / {churn['pings']:,}"
        if churn["pinger_closed"]:
            pongs += f" (closed by the server: {churn['pinger_close_codes']})"
        rss = " → ".join(f"{kib / 1024:,.0f}" for kib in churn["rss_kib_after"])
        waves = "; ".join(
            f"{w['seconds']:.1f} + {w['settle_seconds']:.1f}, {w['cpu_seconds']:.1f}"
            for w in churn["waves"]
        )
        lines.append(
            f"| {kind} | {pongs} | {churn['rtt_p50_ms']:.2f} | {churn['rtt_p99_ms']:.2f} "
            f"| {churn['rtt_max_ms']:,.1f} | {rss} ({churn['rss_growth']:.3f}) | {waves} "
            f"| {_full_collections(churn['gc_pauses'])} |"
        )
    return lines


def tables(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| measure | notifyd | baseline | notifyd / baseline |", "|---|---|---|---|"]
    lines += [f"| {m} | {v} | {b} | {r} |" for m, v, b, r in ratios(results)]
    if any("latency" in result for result in results.values()):
        lines += [
            "",
            "| per-user traffic, 1 socket per user | rate | delivered/s | p50 ms | p99 ms "
            "| p99.9 ms |",
            "|---|---|---|---|---|---|",
        ]
    for kind, result in results.items():
        for rate, v in result.get("latency", {}).items():
            lines.append(
                f"| {kind} | {rate}/s | {v['delivered_per_s']:,.0f} | {v['p50_ms']:.2f} "
                f"| {v['p99_ms']:.2f} | {v['p999_ms']:.2f} |"
            )
    lines += churn_table(results)
    up = results["notifyd"].get("upstream")
    if up:
        lines += [
            "",
            f"Upstream `send` (publisher confirms): {up['per_s']:,.0f} messages/s wall, "
            f"{up['per_cpu_s']:,.0f} per CPU second "
            f"({up['answered']:,} of {up['sent']:,} answered).",
        ]
    resume = results.get("notifyd-stream", {}).get("resume")
    if resume:
        fresh, back = resume["fresh"], resume["resumed"]
        lines += [
            "",
            f"Resume storm (stream history): {resume['sockets']:,} sockets connecting at once "
            f"took {fresh['seconds']:.2f} s and {fresh['cpu_seconds']:.2f} CPU s; "
            f"{resume['sockets']:,} sockets resuming at once over a gap of {resume['gap']} took "
            f"{back['seconds']:.2f} s and {back['cpu_seconds']:.2f} CPU s, replayed "
            f"{back['replayed_frames']:,} frames with {back['history_reads']:.0f} stream reads.",
        ]
    return "\n".join(lines)


def write_outputs(
    results: dict[str, dict[str, Any]], meta: dict[str, Any], readme: bool, table: str = ""
) -> None:
    """The run's JSON; with ``readme`` (a run of every scenario) the README table and plot."""
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    payload = json.dumps({"meta": meta, "results": results}, indent=2)
    (RESULTS / f"run-{stamp}.json").write_text(payload)
    print(f"results/run-{stamp}.json written")
    table = table or tables(results)
    print(table)
    if not readme:
        return
    text = README.read_text() if README.exists() else ""
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    block = f"{start}\nRun {stamp} ({meta['mode']}, {meta['machine']}):\n\n{table}\n{end}"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text += "\n" + block + "\n"
    README.write_text(text)
    plot(results, RESULTS / "latency.png")


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.5, 4.5))
    for kind, result in results.items():
        latency = result.get("latency")
        if not latency:
            continue
        points = sorted((v["delivered_per_s"], v["p50_ms"], v["p99_ms"]) for v in latency.values())
        rates = [p[0] for p in points]
        (line,) = axis.plot(rates, [p[2] for p in points], marker="o", label=f"{kind} p99")
        axis.plot(rates, [p[1] for p in points], marker=".", linestyle="--", color=line.get_color())
    axis.set_xlabel("per-user notifications delivered / s (one socket per user)")
    axis.set_ylabel("publish → receive latency, ms (p99 solid, p50 dashed)")
    axis.set_yscale("log")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    axis.set_title("Latency vs rate, same machine, same run")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def code_version(root: Path) -> str:
    """The commit the servers ran from (with ``+changes`` if its tree was not clean)."""

    def git(*args: str) -> str:
        command = ["git", "-C", str(root), *args]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}+changes" if dirty else commit


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small counts (about 3 minutes)")
    parser.add_argument(
        "--only",
        nargs="*",
        choices=ALL_SERVERS + FLOOR_SERVERS,
        default=ALL_SERVERS,
        help="these servers (the churn floor's bare servers only when named)",
    )
    parser.add_argument(
        "--scenarios",
        nargs="*",
        choices=SCENARIOS,
        default=SCENARIOS,
        help="these scenarios (a subset leaves the README table and the plot alone)",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=None,
        help="run the server and the churn's pinger at this niceness (e.g. -15, as root): "
        "on a machine shared with other work, their stalls are then the server's own "
        f"(default: not niced, except in the churn as root: {CHURN_NICE})",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="the server alone on the first CPU, everything else (RabbitMQ, the load "
        "generator, the churn's pinger, this harness) on the others: the server's own "
        "stalls, without its neighbours' on a small machine",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="run the servers in turn this many times"
    )
    parser.add_argument(
        "--stallwatch",
        metavar="FILE",
        help="run notifyd under benchmarks/stallwatch.py, its loop stalls appended to FILE",
    )
    parser.add_argument(
        "--code",
        metavar="DIR",
        help="run the servers from this checkout (e.g. an older commit's, made with git "
        "worktree): its code measured by this harness, for a before/after in one hour",
    )
    args = parser.parse_args()
    # --nice: niceness of the server and the churn's pinger (negative needs root).
    config: dict[str, Any] = {
        **(QUICK if args.quick else FULL),
        "nice": args.nice or 0,
        "churn_nice": (
            args.nice if args.nice is not None else CHURN_NICE if os.geteuid() == 0 else 0
        ),
        "stallwatch": None,
        "pin": None,
        "code": Path(args.code).resolve() if args.code else ROOT,
    }
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            parser.error("--pin needs two CPUs or more")
        # Inherited by RabbitMQ, the load generator and the pinger, started from here.
        os.sched_setaffinity(0, cpus[1:])
        config["pin"] = cpus[0]
    if args.stallwatch:
        config["stallwatch"] = str(Path(args.stallwatch).resolve())
    scenarios = set(args.scenarios)
    lift_fd_limit()  # the servers and the load generator inherit it
    started = time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    with RabbitNode() as node:
        for repeat in range(args.repeat):
            for kind in args.only:
                # Interleaved: each repeat runs every server once, in turn.
                name = kind if repeat == 0 else f"{kind}#{repeat + 1}"
                print(f"== {name}", flush=True)
                results[name] = Bench(kind, node.amqp_url, config, scenarios).run()
    meta = {
        "mode": "quick" if args.quick else "full",
        "scenarios": [name for name in SCENARIOS if name in scenarios],
        "seconds": time.monotonic() - started,
        "machine": f"{os.cpu_count()} cores, Python {sys.version.split()[0]}",
        "nice": config["nice"],
        "churn_nice": config["churn_nice"],
        "server_cpu": config["pin"],
        "code": code_version(config["code"]),
    }
    if "notifyd" in results:
        write_outputs(results, meta, readme=scenarios == set(SCENARIOS) and args.repeat == 1)
    elif any("churn" in result for result in results.values()):
        write_outputs(results, meta, readme=False, table="\n".join(churn_table(results)))
    else:
        print(json.dumps(results, indent=2))
    print(f"done in {meta['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
