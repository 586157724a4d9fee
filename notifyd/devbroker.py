"""A private RabbitMQ node for development and tests (``notifyd dev-broker``).

Starts Debian's ``rabbitmq-server`` in a directory of its own, on free ports,
listening on 127.0.0.1 only, with its own Erlang cookie and node name, so it never
touches (or clashes with) a system RabbitMQ. Run as root, Debian's wrapper
drops to the ``rabbitmq`` user: the node's directories are handed to that user.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

SERVER = "rabbitmq-server"
CTL = "rabbitmqctl"
#: Debian's /usr/sbin wrappers re-run these as the rabbitmq user when called by root,
#: and refuse other users: those run the real scripts with a HOME of their own.
_REAL_SCRIPTS = Path("/usr/lib/rabbitmq/bin")


def _command(name: str) -> str:
    real = _REAL_SCRIPTS / name
    if os.geteuid() != 0 and real.exists():
        return str(real)
    return name


class BrokerError(RuntimeError):
    """The node could not be started, stopped or reached."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class RabbitNode:
    """One RabbitMQ node in ``base_dir``; stop/restart keep its data and ports."""

    def __init__(
        self, base_dir: Path | None = None, amqp_port: int = 0, nodename: str | None = None
    ) -> None:
        if shutil.which(SERVER) is None:
            raise BrokerError(
                f"{SERVER} not found: install Debian's rabbitmq-server (make setup does)"
            )
        self._owns_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="notifyd-rabbitmq-"))
        self.amqp_port = amqp_port or free_port()
        self.dist_port = free_port()
        self.nodename = nodename or f"notifyd{self.amqp_port}@localhost"
        self._process: subprocess.Popen[bytes] | None = None
        self._log = self.base_dir / "node.log"

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

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
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(base / "feature_flags"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
            "RABBITMQ_PID_FILE": str(base / "node.pid"),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
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
            cookie.write_text(secrets.token_hex(16).upper())
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
        """Start the node and wait until it accepts AMQP connections."""
        if self._process is not None and self._process.poll() is None:
            return
        self._prepare()
        log = self._log.open("ab")
        self._process = subprocess.Popen(
            [_command(SERVER)],
            env=self._environment(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stop() can end all of it
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrokerError(f"rabbitmq-server exited early:\n{self.log_tail()}")
            if _port_open(self.amqp_port):
                self._await_startup(max(1.0, deadline - time.monotonic()))
                return
            time.sleep(0.1)
        self.kill()
        raise BrokerError(f"rabbitmq-server did not open port {self.amqp_port}:\n{self.log_tail()}")

    def _await_startup(self, timeout: float) -> None:
        # The listener opens before every boot step is done; wait for the node proper.
        with contextlib.suppress(BrokerError, subprocess.TimeoutExpired):
            self.ctl("await_startup", "--timeout", str(int(timeout)), timeout=timeout + 5)

    def log_tail(self, lines: int = 40) -> str:
        text = self._log.read_text(errors="replace") if self._log.exists() else ""
        logs = sorted((self.base_dir / "log").glob("*.log"))
        for path in logs:
            text += path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

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
        # su runs the node in a session of its own: end its Erlang VM by node name.
        subprocess.run(["pkill", "-9", "-f", "--", f"-sname {self.nodename}"], check=False)
        self._process = None

    def restart(self) -> None:
        """Stop and start again on the same ports and data (durable state survives)."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> RabbitNode:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="notifyd dev-broker", description=__doc__)
    parser.add_argument("--dir", help="data directory (default: a temporary one)")
    parser.add_argument("--port", type=int, default=5672, help="AMQP port (default 5672)")
    args = parser.parse_args(argv)
    try:
        node = RabbitNode(Path(args.dir) if args.dir else None, amqp_port=args.port)
        if _port_open(node.amqp_port):
            print(f"port {node.amqp_port} is in use: is a broker already running?", file=sys.stderr)
            return 1
        node.start()
    except BrokerError as exc:
        print(f"notifyd dev-broker: {exc}", file=sys.stderr)
        return 1
    print(f"RabbitMQ ready: {node.amqp_url} (data in {node.base_dir}); Ctrl-C stops it", flush=True)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while not stopping:
            if node._process is None or node._process.poll() is not None:
                print("RabbitMQ exited:\n" + node.log_tail(), file=sys.stderr)
                return 1
            time.sleep(0.5)
    finally:
        node.stop()
    return 0
