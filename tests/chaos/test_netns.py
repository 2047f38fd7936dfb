"""The topology helper creates only what it names, and removes it whatever happens."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.chaos import netns


def _links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout


def test_a_topology_removes_its_namespaces_and_links_even_when_its_body_fails() -> None:
    with pytest.raises(RuntimeError), netns.Topology(2) as nodes:
        assert {node.namespace for node in nodes} <= set(netns.namespaces())
        assert all(node.host_link in _links() for node in nodes)
        raise RuntimeError("the test failed")
    assert not {node.namespace for node in nodes} & set(netns.namespaces())
    assert not any(node.host_link in _links() for node in nodes)


def test_the_leftovers_of_a_run_that_died_are_removed_and_a_live_run_is_left_alone() -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    orphan = f"{netns.PREFIX}-{int(dead.stdout)}-beef-0"
    subprocess.run(["ip", "netns", "add", orphan], check=True)
    subprocess.run(
        [
            "ip",
            "link",
            "add",
            f"{netns.PREFIX}beefh0",
            "type",
            "veth",
            "peer",
            "name",
            f"{netns.PREFIX}beefn0",
            "netns",
            orphan,
        ],
        check=True,
    )
    # A loss or partition on its link left a table in the root namespace.
    subprocess.run(["nft", "add", "table", "netdev", orphan], check=True)
    try:
        with netns.Topology(1) as (live,):  # a new topology clears what dead runs left
            assert orphan not in netns.namespaces()
            assert f"{netns.PREFIX}beefh0" not in _links()
            assert orphan not in netns.host_tables()
            assert netns.remove_leftovers() == []  # and never a live run's
            assert live.namespace in netns.namespaces()
    finally:
        netns.remove_leftovers([orphan])


def test_a_partition_makes_connects_time_out_and_healing_restores_them() -> None:
    with netns.Topology(1) as (node,), _serving(node, "time.sleep(60)"):
        _connect(node.address).close()
        node.partition()
        with pytest.raises(TimeoutError):  # not refused: the packets vanish
            _connect(node.address)
        node.heal()
        _connect(node.address).close()
    assert node.namespace not in netns.host_tables()


# Each way: ~1,400 segments of at most 1,448 bytes, so 2% loss drops ~28 of them; none lost
# has a chance of 0.98 ** 2800, about 1e-25.
SIZE = 2_000_000


def test_loss_drops_packets_both_ways_and_the_kernels_retransmit_them() -> None:
    echo = (
        "c, _ = s.accept(); n = 0\n"
        f"while n < {SIZE}: n += len(c.recv(65536))\n"
        f"c.sendall(bytes({SIZE})); c.close()"
    )
    with netns.Topology(1) as (node,), _serving(node, echo):
        node.lose(2)
        with _connect(node.address, timeout=10) as connection:
            connection.sendall(bytes(SIZE))
            received = 0
            while data := connection.recv(65536):
                received += len(data)
        assert received == SIZE
        assert node.dropped() > 2
        assert node.retransmitted() > 0  # the node's TCP resent what its link dropped
        node.heal()
        assert node.dropped() == 0


@contextlib.contextmanager
def _serving(node: netns.Node, body: str) -> Iterator[None]:
    """A Python server on port 9 of `node` that runs `body` (its socket is `s`)."""
    code = f"import socket, time\ns = socket.create_server(('{node.address}', 9))\n"
    code += f"print('up', flush=True)\n{body}\n"
    server = subprocess.Popen(node.exec_argv(sys.executable, "-c", code), stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None and server.stdout.readline() == b"up\n"
        yield
    finally:
        server.kill()
        server.wait()


def _connect(address: str, timeout: float = 1) -> socket.socket:
    return socket.create_connection((address, 9), timeout=timeout)
