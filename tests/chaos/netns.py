"""A cluster on this machine: one network namespace per node, joined to the host by a veth pair.

`Topology` creates, for each node, a namespace and a veth pair whose host end stays here and
whose other end moves into the namespace, with a /30 of a private /24 picked per run (one not
routed on this machine yet). A process started with `exec_argv(node, ...)` runs in the node's
namespace and is reached at `node.address`; the gateway runs on the host and reaches it through
`node.host_link`. A partition takes the namespace's end of the link down: packets vanish,
nothing is refused. (Latency is `tests/chaos/delay.py`: this machine's kernel has no netem.)

Invariants: every name carries the creating process's pid and a per-topology token, so this
touches only what it created; `Topology` removes its namespaces and links whatever happens
(exceptions, Ctrl-C); `remove_leftovers()` removes those of runs whose process is gone (a
SIGKILLed pytest). Needs root (CAP_NET_ADMIN) and iproute2; `available()` says whether both are.
"""

from __future__ import annotations

import ipaddress
import os
import random
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Sequence
from types import TracebackType

import attrs

PREFIX = "ntx"
# ntx-<pid>-<token>-<index>: the namespace; ntx<token>h<index> / n<index>: the veth ends (at
# most 15 characters, the kernel's limit for a link's name).
_NAMESPACE = re.compile(rf"^{PREFIX}-(\d+)-([0-9a-f]{{4}})-(\d+)$")
MAX_NODES = 63  # /30s in a /24


def available() -> str | None:
    """None when namespaces can be made here; else why not."""
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    try:
        _run("ip", "netns", "list")
    except subprocess.CalledProcessError as error:
        return f"ip netns does not work here: {error.stderr.strip()}"
    return None


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=30)


@attrs.frozen
class Node:
    """One namespace, its address and the host's end of its link."""

    namespace: str
    address: str  # inside the namespace
    host_address: str  # the host's end of the link, reachable from inside
    host_link: str
    peer_link: str

    def exec_argv(self, *argv: str) -> list[str]:
        """`argv` run inside this node's namespace (`ip netns exec` execs it: same pid)."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def partition(self) -> None:
        """The namespace's end of the link goes down: the host's end loses its carrier and
        drops what it is given, silently. Connects time out, open connections go quiet."""
        _run("ip", "-n", self.namespace, "link", "set", self.peer_link, "down")

    def heal(self) -> None:
        """The link up again; returns once the host's end has its carrier back."""
        _run("ip", "-n", self.namespace, "link", "set", self.peer_link, "up")
        deadline = time.monotonic() + 5
        while "NO-CARRIER" in _run("ip", "-o", "link", "show", self.host_link).stdout:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.host_link} has no carrier 5 s after going up")
            time.sleep(0.01)
        # Addresses that failed to resolve during the partition would wait for the next ARP
        # attempt (a dropped SYN, a second's retransmission): forget them now.
        _run("ip", "neigh", "flush", "dev", self.host_link)
        _run("ip", "-n", self.namespace, "neigh", "flush", "dev", self.peer_link)


def _free_subnet(rng: random.Random) -> ipaddress.IPv4Network:
    """A /24 of 10.0.0.0/8 that no address or route on this machine overlaps."""
    used = []
    for line in _run("ip", "-4", "route", "show", "table", "all").stdout.splitlines():
        word = line.split()[0] if line.split() else ""
        if word[:1].isdigit():
            used.append(ipaddress.ip_network(word, strict=False))
    for line in _run("ip", "-4", "-o", "addr").stdout.splitlines():
        used.append(ipaddress.ip_interface(line.split()[3]).network)
    for _ in range(1000):
        subnet = ipaddress.ip_network(f"10.{rng.randrange(64, 250)}.{rng.randrange(256)}.0/24")
        if not any(subnet.overlaps(other) for other in used):
            return subnet
    raise RuntimeError("no free /24 in 10.0.0.0/8")


class Topology:
    """`with Topology(3) as nodes:` three namespaces, each on its own link to the host."""

    def __init__(self, count: int, *, rng: random.Random | None = None) -> None:
        if not 0 < count <= MAX_NODES:
            raise ValueError(f"1 to {MAX_NODES} nodes, not {count}")
        self.count = count
        self.token = secrets.token_hex(2)
        self.rng = rng or random.Random()
        self.nodes: list[Node] = []

    def __enter__(self) -> list[Node]:
        remove_leftovers()
        try:
            subnet = _free_subnet(self.rng)
            hosts = list(subnet.hosts())
            for index in range(self.count):
                self._add(index, hosts[4 * index], hosts[4 * index + 1])
        except BaseException:
            self.close()
            raise
        return list(self.nodes)

    def _add(self, index: int, host: ipaddress.IPv4Address, peer: ipaddress.IPv4Address) -> None:
        node = Node(
            namespace=f"{PREFIX}-{os.getpid()}-{self.token}-{index}",
            address=str(peer),
            host_address=str(host),
            host_link=f"{PREFIX}{self.token}h{index}",
            peer_link=f"{PREFIX}{self.token}n{index}",
        )
        # Listed before it exists, so that a failure half way still removes what was made.
        self.nodes.append(node)
        _run("ip", "netns", "add", node.namespace)
        _run("ip", "link", "add", node.host_link, "type", "veth", "peer", "name", node.peer_link)
        _run("ip", "link", "set", node.peer_link, "netns", node.namespace)
        _run("ip", "addr", "add", f"{host}/30", "dev", node.host_link)
        _run("ip", "link", "set", node.host_link, "up")
        _run("ip", "-n", node.namespace, "addr", "add", f"{peer}/30", "dev", node.peer_link)
        _run("ip", "-n", node.namespace, "link", "set", node.peer_link, "up")
        _run("ip", "-n", node.namespace, "link", "set", "lo", "up")

    def close(self) -> None:
        for node in self.nodes:
            _remove(node.namespace, node.host_link)
        self.nodes.clear()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _remove(namespace: str, host_link: str) -> None:
    # Deleting either end of a veth pair deletes both; the namespace's end goes with it.
    _run("ip", "link", "del", host_link, check=False)
    _run("ip", "netns", "del", namespace, check=False)


def namespaces() -> list[str]:
    return [line.split()[0] for line in _run("ip", "netns", "list").stdout.splitlines() if line]


def remove_leftovers(names: Sequence[str] | None = None) -> list[str]:
    """Remove the namespaces (and links) of runs whose creating process is gone; their names."""
    removed = []
    for name in namespaces() if names is None else names:
        match = _NAMESPACE.match(name)
        if match is None or _alive(int(match.group(1))):
            continue
        _remove(name, f"{PREFIX}{match.group(2)}h{match.group(3)}")
        removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
