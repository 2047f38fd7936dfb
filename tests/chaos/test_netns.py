"""The topology helper creates only what it names, and removes it whatever happens."""

from __future__ import annotations

import socket
import subprocess
import sys

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
    try:
        with netns.Topology(1) as (live,):  # a new topology clears what dead runs left
            assert orphan not in netns.namespaces()
            assert f"{netns.PREFIX}beefh0" not in _links()
            assert netns.remove_leftovers() == []  # and never a live run's
            assert live.namespace in netns.namespaces()
    finally:
        netns.remove_leftovers([orphan])


def test_a_partition_makes_connects_time_out_and_healing_restores_them() -> None:
    with netns.Topology(1) as (node,):
        server = subprocess.Popen(
            node.exec_argv(
                sys.executable,
                "-c",
                f"import socket, time; s = socket.create_server(('{node.address}', 9)); "
                "print('up', flush=True); time.sleep(60)",
            ),
            stdout=subprocess.PIPE,
        )
        try:
            assert server.stdout is not None and server.stdout.readline() == b"up\n"
            _connect(node.address)
            node.partition()
            with pytest.raises(TimeoutError):  # not refused: the packets vanish
                _connect(node.address)
            node.heal()
            _connect(node.address)
        finally:
            server.kill()
            server.wait()


def _connect(address: str) -> None:
    socket.create_connection((address, 9), timeout=1).close()
