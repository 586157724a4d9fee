"""``make run`` as a newcomer runs it (issue 13.14): notifyd starts only on its own
broker, and a SIGTERM to ``make`` alone stops both, promptly."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from notifyd.devbroker import free_port, processes_with_env

from .conftest import upgrade_request

ROOT = Path(__file__).parent.parent
#: make's own variables from an enclosing `make test` would change how make runs.
MAKE_VARIABLES = ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")

pytestmark = pytest.mark.timeout(300)


@contextlib.contextmanager
def make_run(log: Path, amqp_port: int, http_port: int) -> Iterator[subprocess.Popen[bytes]]:
    """``make run`` on these ports (the venv is taken as installed: no pip here)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("NOTIFYD_") and k not in MAKE_VARIABLES
    }
    command = ["make", "-o", ".venv/bin/.installed", "run",
               f"DEV_AMQP_PORT={amqp_port}", f"DEV_PORT={http_port}"]  # fmt: skip
    with log.open("wb") as output:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True,  # so the test can clean up whatever is left
        )  # fmt: skip
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        # The node runs in a session of its own: end it if it survived.
        for pid in node_processes(amqp_port):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def node_processes(amqp_port: int) -> list[int]:
    """The processes of the node dev-broker names after its AMQP port."""
    return processes_with_env("RABBITMQ_NODENAME", f"notifyd{amqp_port}@localhost")


def test_notifyd_does_not_start_when_the_broker_port_answers_for_something_else(
    tmp_path: Path,
) -> None:
    amqp_port, http_port = free_port(), free_port()
    log = tmp_path / "make-run.log"
    with socket.socket() as other:  # e.g. another service on 5672: it accepts, it is not ours
        other.bind(("127.0.0.1", amqp_port))
        other.listen()
        with make_run(log, amqp_port, http_port) as make:
            try:
                code = make.wait(timeout=120)
            except subprocess.TimeoutExpired:
                code = None
            assert not listening(http_port), log.read_text()
    output = log.read_text()
    assert code is not None and code != 0, output
    assert f"port {amqp_port} is in use" in output
    assert "notifyd listening" not in output


def test_sigterm_to_make_alone_stops_notifyd_and_its_broker(tmp_path: Path) -> None:
    amqp_port, http_port = free_port(), free_port()
    log = tmp_path / "make-run.log"
    with make_run(log, amqp_port, http_port) as make:
        deadline = time.monotonic() + 180
        while not ready(http_port):
            assert make.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        assert node_processes(amqp_port)
        started = time.monotonic()
        make.send_signal(signal.SIGTERM)  # make only, not its process group
        try:
            make.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"make still running 30 s after SIGTERM:\n{log.read_text()}")
        deadline = time.monotonic() + 10
        while listening(http_port) or listening(amqp_port) or node_processes(amqp_port):
            assert time.monotonic() < deadline, "notifyd or RabbitMQ outlived make"
            time.sleep(0.2)
        assert time.monotonic() - started < 30


def test_ctrl_c_stops_notifyd_once_and_its_broker(tmp_path: Path) -> None:
    """Ctrl-C reaches every process of the terminal's group: notifyd stops on its own
    SIGINT, and dev-broker does not send it a second signal (which notifyd takes as
    "hurry", with a warning) while it drains."""
    amqp_port, http_port = free_port(), free_port()
    log = tmp_path / "make-run.log"
    with make_run(log, amqp_port, http_port) as make, contextlib.ExitStack() as sockets:
        deadline = time.monotonic() + 180
        while not ready(http_port):
            assert make.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        # Two open sockets: the drain closes them over its window (seconds, not 0.2).
        for _ in range(2):
            sock = sockets.enter_context(socket.create_connection(("127.0.0.1", http_port)))
            sock.sendall(upgrade_request())
            assert sock.recv(4096).startswith(b"HTTP/1.1 101"), log.read_text()
        os.killpg(make.pid, signal.SIGINT)  # as the terminal does
        try:
            make.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"make still running 30 s after Ctrl-C:\n{log.read_text()}")
        deadline = time.monotonic() + 10
        while listening(http_port) or listening(amqp_port) or node_processes(amqp_port):
            assert time.monotonic() < deadline, "notifyd or RabbitMQ outlived make"
            time.sleep(0.2)
    output = log.read_text()
    assert "SIGINT: shutting down" in output, output
    assert "stopped in" in output, output
    assert "again" not in output, output
