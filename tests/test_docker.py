"""The Dockerfile, compose.yaml and docker/ntonix.toml agree with each other and with the code.

No Docker engine runs the tests, so this checks what can be checked without one: the config
the compose file mounts passes `ntonix check-config`; every backend in it is a mock service of
the compose file listening where the config says, under the backend's name; the gateway's port,
config path and health check are the Dockerfile's. `docker compose config` validates the file
where a docker client with the compose plugin exists (skipped otherwise). The contract: issue 10
item 8.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.support import REPO_ROOT

COMPOSE = REPO_ROOT / "compose.yaml"
DOCKERFILE = REPO_ROOT / "Dockerfile"


def _compose() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())["services"]
    return services


def _instruction(name: str) -> str:
    """A Dockerfile instruction's arguments, continuation lines joined."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    (match,) = re.findall(rf"^{name} (.*)$", text, flags=re.MULTILINE)
    return str(match)


def _option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def _gateway_command() -> list[str]:
    command: list[str] = json.loads(_instruction("CMD"))
    return command


def _mounted_config() -> tuple[str, str]:
    """(path in the checkout, path in the container) of the gateway's config volume."""
    (volume,) = _compose()["gateway"]["volumes"]
    source, target, _mode = volume.split(":")
    return str(REPO_ROOT / source), target


def test_the_gateway_config_in_compose_passes_check_config() -> None:
    source, target = _mounted_config()
    assert target == _option(_gateway_command(), "--config")
    result = subprocess.run(
        [sys.executable, "-m", "ntonix.cli", "check-config", source],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result
    assert result.stdout == f"ok: {source} (3 backends)\n"


def test_every_backend_is_a_mock_service_listening_where_the_config_says() -> None:
    services = _compose()
    source, _ = _mounted_config()
    with open(source, "rb") as file:
        backends = tomllib.load(file)["backends"]
    for backend in backends:
        url = urlsplit(backend["url"])
        command = [str(word) for word in services[url.hostname]["command"]]
        assert command[:3] == ["python", "-m", "ntonix.mocks.llm"]
        assert _option(command, "--host") == "0.0.0.0"
        assert int(_option(command, "--port")) == url.port
        assert _option(command, "--name") == backend["name"]  # x-ntonix-backend reads true
        assert services[url.hostname]["healthcheck"] == {"disable": True}
    assert set(services["gateway"]["depends_on"]) == {urlsplit(b["url"]).hostname for b in backends}


def test_the_gateway_listens_where_the_image_and_compose_say() -> None:
    command = _gateway_command()
    assert command[:2] == ["ntonix", "serve"]
    port = _option(command, "--bind").rsplit(":", 1)[1]
    assert _instruction("EXPOSE") == port
    assert _compose()["gateway"]["ports"] == [f"{port}:{port}"]
    health = shlex.split(_instruction("HEALTHCHECK"))
    assert any(f"http://127.0.0.1:{port}/ntonix/health" in word for word in health)
    # Open streams get graceful_timeout (30 s) after `docker stop`: the grace period is longer.
    assert _compose()["gateway"]["stop_grace_period"] == "35s"


def _docker_compose() -> bool:
    if shutil.which("docker") is None:
        return False
    version = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    return version.returncode == 0


@pytest.mark.skipif(not _docker_compose(), reason="no docker client with the compose plugin")
def test_docker_compose_accepts_the_file() -> None:
    result = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
