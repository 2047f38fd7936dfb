"""The kernel's own time of each close arriving at a port: FIN and RST packets on loopback.

A thread woken by epoll (mocks/fin_clock.py) can take its time only once it runs and holds the
GIL again: under the benchmark's hang-up load that was milliseconds late (docs/BENCHMARKS.md,
"The hang-up path with two workers"). A packet socket on `lo` with a filter for TCP segments to
one port with FIN or RST set gets a copy of each close as it passes, stamped by the kernel
(SO_TIMESTAMPNS, the same wall clock as time.time()); those copies wait in the socket's queue
until someone asks, so no thread, core or lock decides the time.

Invariants: only segments to `port` with FIN or RST reach the queue (the filter runs in the
kernel), each once (outgoing copies are ignored); `drain` never blocks; opening needs
CAP_NET_RAW and Linux, and `open_tap` returns None without them.
"""

import ctypes
import socket
import struct

_ETH_P_IP = 0x0800
_SOL_PACKET = 263
_PACKET_IGNORE_OUTGOING = 23  # loopback shows each segment twice: sent, then received
_SO_ATTACH_FILTER = 26
_SO_TIMESTAMPNS = 35
_SO_RCVBUFFORCE = 33
_QUEUE_BYTES = 8 << 20  # a burst of hundreds of closes must not overflow before it is read
_SNAP = 64  # IPv4 header and the TCP header's ports and flags
_TIMESPEC = struct.Struct("@qq")
_FIN_OR_RST = 0x01 | 0x04


def _filter(port: int) -> bytes:
    """Classic BPF over the IPv4 packet: TCP, not a later fragment, to `port`, FIN or RST."""
    program = [
        (0x30, 0, 0, 9),  # A = protocol
        (0x15, 0, 8, socket.IPPROTO_TCP),
        (0x28, 0, 0, 6),  # A = flags and fragment offset
        (0x45, 6, 0, 0x1FFF),  # a later fragment has no TCP header
        (0xB1, 0, 0, 0),  # X = IP header length
        (0x48, 0, 0, 2),  # A = destination port
        (0x15, 0, 3, port),
        (0x50, 0, 0, 13),  # A = TCP flags
        (0x45, 0, 1, _FIN_OR_RST),
        (0x06, 0, 0, _SNAP),  # keep
        (0x06, 0, 0, 0),  # drop
    ]
    return b"".join(struct.pack("HBBI", *instruction) for instruction in program)


class FinTap:
    """The closes arriving at one local port, each with the kernel's time."""

    def __init__(self, sock: socket.socket):
        self._sock = sock

    def drain(self) -> list[tuple[tuple[str, int], float]]:
        """Every close queued since the last drain: (the closing peer's address, time.time())."""
        closes = []
        while True:
            try:
                data, ancillary, _, _ = self._sock.recvmsg(
                    _SNAP, socket.CMSG_SPACE(_TIMESPEC.size), socket.MSG_DONTWAIT
                )
            except BlockingIOError:
                return closes
            stamp = next(
                (
                    _TIMESPEC.unpack(payload[: _TIMESPEC.size])
                    for level, kind, payload in ancillary
                    if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS
                ),
                None,
            )
            header = 4 * (data[0] & 0x0F)
            if stamp is None or len(data) < header + 2:
                continue
            peer = (socket.inet_ntoa(data[12:16]), int.from_bytes(data[header : header + 2]))
            closes.append((peer, stamp[0] + stamp[1] / 1e9))

    def close(self) -> None:
        self._sock.close()


def open_tap(port: int) -> FinTap | None:
    """A tap on closes arriving at `port` over IPv4 loopback, or None where it cannot be had
    (no CAP_NET_RAW, not Linux)."""
    if not hasattr(socket, "AF_PACKET"):
        return None
    try:
        # Protocol 0 receives nothing until `bind` names one: the filter is in place by then.
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
    except OSError:
        return None
    try:
        program = ctypes.create_string_buffer(_filter(port))
        length = len(program.raw) // 8
        sock.setsockopt(
            socket.SOL_SOCKET,
            _SO_ATTACH_FILTER,
            struct.pack("HL", length, ctypes.addressof(program)),
        )
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        sock.setsockopt(_SOL_PACKET, _PACKET_IGNORE_OUTGOING, 1)
        sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, _QUEUE_BYTES)
        sock.bind(("lo", _ETH_P_IP))  # Python turns it to network order
    except OSError:
        sock.close()
        return None
    return FinTap(sock)
