"""``notifyd dev-broker``'s node: ports free on every address, picked again when taken,
no crash dump or temporary directory left behind (issue 13.13)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest

from notifyd import devbroker
from notifyd.devbroker import RabbitNode
from notifyd.errors import BrokerError

#: Where Erlang wrote its crash dump before: the node's working directory.
OLD_CRASH_DUMPS = (Path("/var/lib/rabbitmq/erl_crash.dump"), Path("erl_crash.dump"))


def ephemeral_ports() -> range:
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    return range(low, high + 1)


def bindable_everywhere(port: int) -> bool:
    try:
        with socket.socket(socket.AF_INET) as v4, socket.socket(socket.AF_INET6) as v6:
            v4.bind(("0.0.0.0", port))
            v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            v6.bind(("::", port))
    except OSError:
        return False
    return True


@contextlib.contextmanager
def held(
    port: int, family: socket.AddressFamily = socket.AF_INET, host: str = "127.0.0.1"
) -> Iterator[None]:
    """Something else listening on ``port`` (no SO_REUSEADDR, as most servers)."""
    with socket.socket(family) as sock:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen()
        yield


def test_free_ports_are_free_everywhere_and_outside_the_ephemeral_range() -> None:
    """Ephemeral ports are what outgoing connections take while the node boots."""
    ephemeral = ephemeral_ports()
    for _ in range(20):
        port = devbroker.free_port()
        assert port not in ephemeral
        assert bindable_everywhere(port)


@pytest.mark.parametrize(
    ("family", "host"), [(socket.AF_INET, "127.0.0.2"), (socket.AF_INET6, "::1")]
)
def test_a_port_held_on_any_address_is_not_free(family: socket.AddressFamily, host: str) -> None:
    port = devbroker.free_port()
    with held(port, family, host):
        assert not devbroker.port_is_free(port)
        assert not devbroker.port_is_free(port, reuse_address=True)
    assert devbroker.port_is_free(port)


def amqp_works(url: str) -> bool:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    connection.close()
    return True


def test_a_taken_dist_port_is_picked_again_and_nothing_is_left_behind() -> None:
    dumps_before = {path for path in OLD_CRASH_DUMPS if path.exists()}
    node = RabbitNode()
    taken = node.dist_port
    try:
        # Free when picked, taken by the time the node binds it: the race of 13.13.
        with held(taken):
            node.start()
        assert node.dist_port != taken
        assert amqp_works(node.amqp_url)
        assert not node.crash_dump.exists()
        assert {path for path in OLD_CRASH_DUMPS if path.exists()} == dumps_before
    finally:
        node.cleanup()
    assert not node.base_dir.exists()


def test_a_foreign_listener_on_a_fixed_amqp_port_is_not_mistaken_for_the_node() -> None:
    """It answers on the port, but it is not this node: start fails, and says why."""
    port = devbroker.free_port()
    node = RabbitNode(amqp_port=port)
    try:
        with held(port, host="0.0.0.0"), pytest.raises(BrokerError, match="amqp port taken"):
            node.start()
        assert not node.running
    finally:
        node.cleanup()
    assert not node.base_dir.exists()


def test_kill_ends_the_erlang_vm_too() -> None:
    """Run as root, su puts the VM in a session of its own: killpg alone missed it."""
    node = RabbitNode()
    try:
        node.start()
        mnesia = str(node.base_dir / "mnesia")
        assert devbroker.processes_with_env("RABBITMQ_MNESIA_BASE", mnesia)
        node.kill()
        assert not devbroker.processes_with_env("RABBITMQ_MNESIA_BASE", mnesia)
    finally:
        node.cleanup()
