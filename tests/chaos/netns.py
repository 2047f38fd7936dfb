"""A cluster on this machine: one network namespace per node, joined to the host by a veth pair.

`Topology` creates, for each node, a namespace and a veth pair whose host end stays here and
whose other end moves into the namespace, with a /30 of a private /24 picked per run (one not
routed on this machine yet). A process started with `exec_argv(node, ...)` runs in the node's
namespace and is reached at `node.address`; the gateway runs on the host and reaches it through
`node.host_link`.

The link's faults are nftables rules on the ingress of each end (a `netdev` table in the root
namespace for the host's end, one in the node's namespace for the other), because this
machine's kernel has no sch_netem and no tc gact action but does have nf_tables with `numgen`:
- `partition()` drops every packet both ways. Both kernels still see the link up, carrier and
  routes in place, so packets leave and vanish as behind a broken switch; taking a link down
  instead would also remove the namespace's connected route (its sends fail at once, with an
  error) and show NO-CARRIER on the host: a cut cable, not a partition.
- `lose(percent)` drops that share of the TCP packets at random, both ways, once they crossed
  the link: each kernel's TCP really retransmits them. GSO is capped at one segment per packet
  on both ends so that a dropped packet is one lost segment, not a 64 KiB burst of them.
- `heal()` removes both.
Latency is `tests/chaos/delay.py`, a relay in the namespace, for the same reason (no netem).

Invariants: every name carries the creating process's pid and a per-topology token, so this
touches only what it created; `Topology` removes its namespaces, links and the host's tables
whatever happens (exceptions, Ctrl-C); `remove_leftovers()` removes those of runs whose process
is gone (a SIGKILLed pytest). Needs root (CAP_NET_ADMIN), iproute2 and nft (Debian's nftables);
`available()` says whether all three are.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import secrets
import shutil
import subprocess
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
    if shutil.which("nft") is None:
        return "nft (Debian's nftables) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    try:
        _run("ip", "netns", "list")
    except subprocess.CalledProcessError as error:
        return f"ip netns does not work here: {error.stderr.strip()}"
    return None


def _run(
    *argv: str, check: bool = True, script: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, check=check, capture_output=True, text=True, timeout=30, input=script
    )


def _nft(*argv: str, namespace: str | None = None, script: str | None = None) -> str:
    """`nft argv` in the root namespace or in `namespace`; with `script`, `nft -f -` of it."""
    prefix = ["ip", "netns", "exec", namespace] if namespace else []
    words = ["-f", "-"] if script is not None else list(argv)
    return _run(*prefix, "nft", *words, script=script).stdout


# The one chain of each end's table: what arrives over the link passes through it first.
_CHAIN = "ingress"
_DROPPED = re.compile(r"counter packets (\d+) bytes \d+ drop")


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
        """Every packet over the link dropped, both ways (ARP too): connects time out, open
        connections go quiet, nothing is refused."""
        self._filter("counter drop")

    def lose(self, percent: int) -> None:
        """`percent` of the TCP packets over the link dropped at random, each way."""
        for namespace, link in ((None, self.host_link), (self.namespace, self.peer_link)):
            netns = ["-n", namespace] if namespace else []
            _run("ip", *netns, "link", "set", "dev", link, "gso_max_segs", "1")
        self._filter(f"meta l4proto tcp numgen random mod 100 < {percent} counter drop")

    def heal(self) -> None:
        """No partition and no loss on the link any more (GSO stays capped: harmless)."""
        self._filter(None)
        # Addresses that failed to resolve during a partition would wait for the next ARP
        # attempt (a dropped SYN, a second's retransmission): forget them now.
        _run("ip", "neigh", "flush", "dev", self.host_link)
        _run("ip", "-n", self.namespace, "neigh", "flush", "dev", self.peer_link)

    def dropped(self) -> int:
        """The packets the link's rules dropped so far, both ways."""
        total = 0
        for namespace in (None, self.namespace):
            listing = _nft("list", "table", "netdev", self.namespace, namespace=namespace)
            total += sum(int(count) for count in _DROPPED.findall(listing))
        return total

    def retransmitted(self) -> int:
        """The TCP segments the namespace's kernel sent again (nstat; the history untouched)."""
        argv = self.exec_argv("nstat", "-azsj", "TcpRetransSegs")
        return int(json.loads(_run(*argv).stdout)["kernel"]["TcpRetransSegs"])

    def _filter(self, rule: str | None) -> None:
        """`rule` (or none) the only one on each end's ingress, in a table named as the
        namespace (the host's is removed with the topology, the other with the namespace)."""
        for namespace, link in ((None, self.host_link), (self.namespace, self.peer_link)):
            script = (
                f"add table netdev {self.namespace}\n"
                f"add chain netdev {self.namespace} {_CHAIN} "
                f'{{ type filter hook ingress device "{link}" priority 0; }}\n'
                f"flush chain netdev {self.namespace} {_CHAIN}\n"
            )
            if rule is not None:
                script += f"add rule netdev {self.namespace} {_CHAIN} {rule}\n"
            _nft(namespace=namespace, script=script)


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
    # The host's table first: a table outlives the device its chain hooks (and the namespace's
    # table goes with the namespace).
    _run("nft", "delete", "table", "netdev", namespace, check=False)
    # Deleting either end of a veth pair deletes both; the namespace's end goes with it.
    _run("ip", "link", "del", host_link, check=False)
    _run("ip", "netns", "del", namespace, check=False)


def namespaces() -> list[str]:
    return [line.split()[0] for line in _run("ip", "netns", "list").stdout.splitlines() if line]


def host_tables() -> list[str]:
    """The names of the root namespace's netdev tables (ours are named as their namespace)."""
    listing = _run("nft", "list", "tables", "netdev").stdout
    return [line.split()[2] for line in listing.splitlines() if line.startswith("table netdev ")]


def remove_leftovers(names: Sequence[str] | None = None) -> list[str]:
    """Remove the namespaces, links and host tables of runs whose creating process is gone;
    their names. A table outlives its namespace when a run died between the two removals."""
    removed = []
    found = sorted({*namespaces(), *host_tables()}) if names is None else names
    for name in found:
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
