"""A private RabbitMQ node for development and tests (``notifyd dev-broker``).

Starts Debian's ``rabbitmq-server`` in a directory of its own, on free ports,
listening on 127.0.0.1 only, with its own Erlang cookie and node name, so it never
touches (or clashes with) a system RabbitMQ. Run as root, Debian's wrapper
drops to the ``rabbitmq`` user: the node's directories are handed to that user.

``notifyd dev-broker -- COMMAND...`` runs COMMAND once the node answers AMQP
(with ``NOTIFYD_AMQP_URL`` pointing at it) and stops the node when COMMAND ends;
SIGTERM or SIGINT stops both. ``make run`` is built on it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pwd
import random
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType, TracebackType
from typing import NoReturn

from .errors import BrokerError

log = logging.getLogger(__name__)

SERVER = "rabbitmq-server"
CTL = "rabbitmqctl"
#: Debian's /usr/sbin wrappers re-run these as the rabbitmq user when called by root,
#: and refuse other users: those run the real scripts with a HOME of their own.
_REAL_SCRIPTS = Path("/usr/lib/rabbitmq/bin")
#: Times a node is started on new ports after one of its ports turned out taken.
START_ATTEMPTS = 4
#: The lowest port :func:`free_port` hands out (below: ports services tend to claim).
_LOWEST_PORT = 10_000
#: What the node logs when a port it was given is taken, and which port that was.
_PORT_TAKEN = {"dist_port_already_used": "dist", "eaddrinuse": "amqp"}
#: Seconds the command run by ``dev-broker`` gets to exit after SIGTERM
#: (notifyd's default shutdown_timeout, plus a margin).
_COMMAND_GRACE = 30.0
#: After a SIGINT (Ctrl-C, which the terminal sends the command too), seconds the
#: command gets to stop on its own before it is sent SIGTERM: notifyd takes a second
#: signal as "hurry" and says so in a warning. Its default drain_seconds (5), plus the
#: few seconds its sockets get to go.
_OWN_STOP_GRACE = 10.0


def _command(name: str) -> str:
    real = _REAL_SCRIPTS / name
    if os.geteuid() != 0 and real.exists():
        return str(real)
    return name


class _PortTaken(BrokerError):
    def __init__(self, which: str, detail: str) -> None:
        super().__init__(detail)
        self.which = which


def _ephemeral_ports() -> range:
    """The ports the kernel gives outgoing connections and ``bind(0)``."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        low, high = (int(part) for part in text.split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default; IANA's is 49152..65535
    return range(low, high + 1)


def port_is_free(port: int, reuse_address: bool = False) -> bool:
    """Nothing uses ``port`` on any IPv4 or IPv6 address of this machine.

    Without ``reuse_address`` a port that any socket holds, even a client socket or
    one in TIME_WAIT, counts as used; with it, only a listener does (as for a server
    that sets SO_REUSEADDR, as RabbitMQ does).
    """
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # no IPv6 on this machine: nothing can hold the port there
            continue
        with sock:
            if reuse_address:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRNOTAVAIL:  # IPv6 disabled on every interface
                    continue
                return False
    return True


def free_port(exclude: Collection[int] = ()) -> int:
    """A TCP port that is free on every address and outside the ephemeral range.

    ``bind(("127.0.0.1", 0))`` returns a port from the range the kernel also gives
    outgoing connections, and free on 127.0.0.1 only: seconds later, when the node
    binds it, a client socket may hold it (``dist_port_already_used`` on a machine
    with many connections open). Outside that range only another server can take it.
    """
    ephemeral = _ephemeral_ports()
    candidates = [
        p for p in range(_LOWEST_PORT, 65536) if p not in ephemeral and p not in exclude
    ] or [p for p in range(1024, 65536) if p not in exclude]
    for port in random.sample(candidates, min(len(candidates), 500)):
        if port_is_free(port):
            return port
    raise BrokerError("no free TCP port found")


def processes_with_env(name: str, value: str) -> list[int]:
    """Ids of the processes whose environment has ``name=value`` (Linux's /proc)."""
    entry = f"\0{name}={value}\0".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours to read
            if entry in b"\0" + environ.read_bytes():
                found.append(int(environ.parent.name))
    return found


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _amqp_greeting(port: int, timeout: float = 2.0) -> bytes:
    """The first frame a server on ``port`` answers the AMQP 0-9-1 header with."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"AMQP\x00\x00\x09\x01")
        data = b""
        while len(data) < 7 or len(data) < 7 + struct.unpack(">I", data[3:7])[0] + 1:
            chunk = sock.recv(4096)
            if not chunk or len(data) > 65536:
                break
            data += chunk
        return data


class _CleanedUpOnExit:
    """``with`` support for the node classes: leaving the block calls ``cleanup()``."""

    def cleanup(self) -> None:
        raise NotImplementedError

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


class RabbitNode(_CleanedUpOnExit):
    """One RabbitMQ node in ``base_dir``; stop/restart keep its data and ports.

    Ports and a node name not given are picked here, and picked again when the node
    finds one taken at start.
    """

    def __init__(
        self,
        base_dir: Path | None = None,
        amqp_port: int = 0,
        nodename: str | None = None,
        cookie: str | None = None,
    ) -> None:
        if shutil.which(SERVER) is None:
            raise BrokerError(
                f"{SERVER} not found: install Debian's rabbitmq-server (make setup does)"
            )
        self._owns_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="notifyd-rabbitmq-"))
        self._fixed_amqp_port = amqp_port
        self._fixed_nodename = nodename
        self.amqp_port = amqp_port or free_port()
        self.dist_port = free_port(exclude={self.amqp_port})
        self.nodename = nodename or f"notifyd{self.amqp_port}@localhost"
        #: The Erlang cookie: nodes that share one can form a cluster.
        self.cookie = cookie or secrets.token_hex(16).upper()
        self._process: subprocess.Popen[bytes] | None = None
        self._log = self.base_dir / "node.log"

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def log_dir(self) -> Path:
        """Where the node writes its log files (and a crash dump)."""
        return self.base_dir / "log"

    @property
    def crash_dump(self) -> Path:
        # Erlang's default is the working directory: the repository, or (as root)
        # /var/lib/rabbitmq, where nothing would ever remove it.
        return self.log_dir / "erl_crash.dump"

    def _environment(self) -> dict[str, str]:
        base = self.base_dir
        return {
            **os.environ,
            # The node's own home holds its own Erlang cookie: no clash with a
            # system node, and rabbitmqctl run with the same HOME can talk to it.
            "HOME": str(base / "home"),
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.log_dir),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(base / "feature_flags"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
            "RABBITMQ_PID_FILE": str(base / "node.pid"),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "ERL_CRASH_DUMP": str(self.crash_dump),
            # Erlang's port mapper: only reachable from this machine.
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def _prepare(self) -> None:
        base = self.base_dir
        for sub in ("home", "mnesia", "log"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        cookie = base / "home" / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(self.cookie)
        cookie.chmod(0o400)
        (base / "enabled_plugins").write_text("[].\n")
        (base / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.amqp_port}\n"
            "loopback_users.guest = true\n"
            "log.console = false\n"
            "log.file.level = warning\n"
        )
        (base / "advanced.config").write_text("[].\n")
        (base / "rabbitmq-env.conf").write_text("")
        if os.geteuid() == 0:
            # Debian's wrapper re-executes itself as "rabbitmq": give it the tree.
            try:
                user = pwd.getpwnam("rabbitmq")
            except KeyError:
                return
            for parent in base.resolve().parents:
                if not parent.stat().st_mode & 0o001:
                    raise BrokerError(
                        f"{parent} is not searchable by the rabbitmq user: choose a data "
                        "directory under a world-searchable path such as /tmp"
                    )
            for path in [base, *base.rglob("*")]:
                os.chown(path, user.pw_uid, user.pw_gid)

    def start(self, timeout: float = 60.0) -> None:
        """Start the node and wait until it answers AMQP as itself.

        A port picked free may be taken by the time the node binds it: the node is
        then started again on new ports (never on ones the caller fixed).
        """
        if self.running:
            return
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                self._start_once(timeout)
                return
            except _PortTaken as exc:
                if attempt == START_ATTEMPTS or not self._pick_again(exc.which):
                    raise
                log.warning("RabbitMQ %s port was taken; starting again on new ports", exc.which)

    def _start_once(self, timeout: float) -> None:
        self._prepare()
        log_file = self._log.open("ab")
        self._process = process = subprocess.Popen(
            [_command(SERVER)],
            env=self._environment(),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stop() can end all of it
        )
        log_file.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self._failed_start()
            # Another server on the port answers too: only this node's greeting counts.
            if self._answers_as_this_node():
                self._await_startup(max(1.0, deadline - time.monotonic()))
                return
            time.sleep(0.1)
        self.kill()
        raise BrokerError(f"rabbitmq-server did not open port {self.amqp_port}:\n{self.log_tail()}")

    def _failed_start(self) -> NoReturn:
        tail = self.log_tail()
        self.kill()
        for marker, which in _PORT_TAKEN.items():
            if marker in tail:
                raise _PortTaken(which, f"rabbitmq-server found its {which} port taken:\n{tail}")
        raise BrokerError(f"rabbitmq-server exited early:\n{tail}")

    def _pick_again(self, which: str) -> bool:
        """New ports after ``which`` was taken; False when that port was the caller's."""
        if which == "amqp" and self._fixed_amqp_port:
            return False
        # What the failed boot left: a crash dump (~1 MB) and a node directory.
        self.crash_dump.unlink(missing_ok=True)
        for leftover in (self.base_dir / "mnesia").glob(f"{self.nodename}*"):
            shutil.rmtree(leftover, ignore_errors=True)
        if which == "amqp":
            self.amqp_port = free_port(exclude={self.dist_port})
            self.nodename = self._fixed_nodename or f"notifyd{self.amqp_port}@localhost"
        self.dist_port = free_port(exclude={self.amqp_port, self.dist_port})
        return True

    def _answers_as_this_node(self) -> bool:
        # RabbitMQ names its cluster after the node ("notifyd5672@<hostname>").
        try:
            greeting = _amqp_greeting(self.amqp_port)
        except OSError:
            return False
        name = self.nodename.split("@", 1)[0].encode() + b"@"
        return greeting[:1] == b"\x01" and b"RabbitMQ" in greeting and name in greeting

    def _await_startup(self, timeout: float) -> None:
        # The listener opens before every boot step is done; wait for the node proper.
        with contextlib.suppress(BrokerError, subprocess.TimeoutExpired):
            self.ctl("await_startup", "--timeout", str(int(timeout)), timeout=timeout + 5)

    def log_tail(self, lines: int = 40) -> str:
        text = self._log.read_text(errors="replace") if self._log.exists() else ""
        return "\n".join([*text.splitlines(), *self.log_lines()][-lines:])

    def log_lines(self) -> list[str]:
        """The lines of the node's own log files, file by file."""
        return [
            line
            for path in sorted(self.log_dir.glob("*.log"))
            for line in path.read_text(errors="replace").splitlines()
        ]

    def ctl(self, *args: str, timeout: float = 30) -> str:
        """Run rabbitmqctl against this node; returns its output."""
        result = subprocess.run(
            [_command(CTL), "-n", self.nodename, *args],
            env=self._environment(),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise BrokerError(
                f"rabbitmqctl {' '.join(args)} failed: {result.stderr.decode(errors='replace')}"
            )
        return result.stdout.decode(errors="replace")

    def close_connections(self, reason: str = "closed by test") -> int:
        """Force-close every client connection; returns how many there were."""
        listed = self.ctl("list_connections", "pid", "--silent").split()
        pids = [pid for pid in listed if pid.startswith("<")]
        for pid in pids:
            with contextlib.suppress(BrokerError):
                self.ctl("close_connection", pid, reason)
        return len(pids)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the node cleanly (falling back to killing its process group)."""
        process = self._process
        if process is None or process.poll() is not None:
            self._process = None
            return
        with contextlib.suppress(BrokerError, subprocess.TimeoutExpired):
            self.ctl("stop", timeout=timeout)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout)
        self.kill()
        for _ in range(50):  # the port must be free before a restart on the same one
            if not _port_open(self.amqp_port):
                break
            time.sleep(0.1)

    def kill(self) -> None:
        """End the node's whole process group at once (also for crash tests)."""
        process = self._process
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
        # su runs the node in a session of its own, out of killpg's reach, and the VM's
        # command line does not name the node: find it by its data directory, and wait
        # until it is gone (its ports with it).
        marker = ("RABBITMQ_MNESIA_BASE", str(self.base_dir / "mnesia"))
        deadline = time.monotonic() + 10
        while (pids := processes_with_env(*marker)) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        self._process = None

    def restart(self) -> None:
        """Stop and start again on the same ports and data (durable state survives)."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Stop the node; remove its directory if it was a temporary one."""
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> RabbitNode:
        self.start()
        return self


class RabbitCluster(_CleanedUpOnExit):
    """``size`` private nodes joined into one cluster (for node-failure tests).

    The nodes share an Erlang cookie; each is a :class:`RabbitNode`, so a member can
    be killed and started again on its ports and data, and it rejoins by itself.
    """

    def __init__(self, size: int = 3) -> None:
        cookie = secrets.token_hex(16).upper()
        self.nodes = [RabbitNode(cookie=cookie) for _ in range(size)]

    @property
    def amqp_urls(self) -> list[str]:
        return [node.amqp_url for node in self.nodes]

    def start(self, timeout: float = 120.0) -> None:
        """Start every node (together: each takes seconds), then join them to the first."""
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            for started in [pool.submit(node.start) for node in self.nodes]:
                started.result(timeout)
        first, *others = self.nodes
        for node in others:
            node.ctl("stop_app", timeout=timeout)
            node.ctl("join_cluster", first.nodename, timeout=timeout)
            node.ctl("start_app", timeout=timeout)

    def node_named(self, nodename: str) -> RabbitNode:
        return next(node for node in self.nodes if node.nodename == nodename)

    def cleanup(self) -> None:
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda node: node.cleanup(), self.nodes))

    def __enter__(self) -> RabbitCluster:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self


def run(data_dir: str | None, port: int, command: Sequence[str] = ()) -> int:
    """``notifyd dev-broker``: run a node until SIGTERM/SIGINT, or while ``command`` runs.

    ``command`` starts only once the node answers AMQP as itself (not merely once
    something listens on the port); its exit code is returned.
    """
    stopping = threading.Event()  # set by the signal handler (mypy cannot see a flag)
    interrupted = threading.Event()  # the signal was SIGINT
    child: subprocess.Popen[bytes] | None = None

    def stop(signum: int, _: FrameType | None) -> None:
        # The loop below notices within 0.2 s and signals the command once (a second
        # SIGTERM could hit it while it exits, after its own handler is gone).
        if signum == signal.SIGINT:
            interrupted.set()
        stopping.set()

    # Installed first: a SIGTERM during the node's start-up must still stop it.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # Checked as RabbitMQ binds (SO_REUSEADDR): a port held only by connections
    # still closing (TIME_WAIT) after the previous run is not taken.
    if not port_is_free(port, reuse_address=True):
        print(
            f"notifyd dev-broker: port {port} is in use: is a broker already running? "
            "(--port, or make run DEV_AMQP_PORT=..., picks another)",
            file=sys.stderr,
        )
        return 1
    try:
        node = RabbitNode(Path(data_dir) if data_dir else None, amqp_port=port)
    except BrokerError as exc:
        print(f"notifyd dev-broker: {exc}", file=sys.stderr)
        return 1
    try:
        node.start()
        if stopping.is_set():
            return 0
        then = f"; running {' '.join(command)}" if command else "; Ctrl-C stops it"
        print(f"RabbitMQ ready: {node.amqp_url} (data in {node.base_dir}){then}", flush=True)
        if command:
            child = subprocess.Popen(command, env={**os.environ, "NOTIFYD_AMQP_URL": node.amqp_url})
        while not stopping.is_set():
            if child is not None and child.poll() is not None:
                return child.returncode
            if not node.running:
                print("notifyd dev-broker: RabbitMQ exited:\n" + node.log_tail(), file=sys.stderr)
                return 1
            time.sleep(0.2)
        code = _end(child, _OWN_STOP_GRACE if interrupted.is_set() else 0.0)
        # Ctrl-C reaches the command too: if it was still exiting when our SIGTERM
        # came, it died of it. Asked to stop, that is a clean stop, not an error.
        return 0 if code in (-signal.SIGTERM, -signal.SIGINT) else code
    except BrokerError as exc:
        print(f"notifyd dev-broker: {exc}", file=sys.stderr)
        return 1
    finally:
        _end(child)
        node.cleanup()


def _end(child: subprocess.Popen[bytes] | None, own_stop: float = 0.0) -> int:
    """Stop ``child`` (SIGTERM, then SIGKILL after a grace period); its exit code.

    ``own_stop``: seconds to wait first for it to exit on its own (it was signalled
    too).
    """
    if child is None:
        return 0
    if own_stop and child.poll() is None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=own_stop)
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=_COMMAND_GRACE)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return child.returncode
