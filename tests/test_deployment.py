"""docs/deploy: the Kubernetes manifests are valid (kubernetes-validate, strict, against the
schemas it ships) and agree with the code: the ConfigMap's ntonix.toml passes `ntonix
check-config`, the probes ask routes a running gateway answers 200, the container port is the
one `ntonix serve` binds, the grace period covers the preStop sleep and graceful_timeout, the
shared tier is the Valkey they deploy and the image can reach it. The Compose file's gateways
agree in the same ways."""

from __future__ import annotations

import subprocess
import urllib.parse
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import kubernetes_validate
import pytest
import yaml

from ntonix.config import Config, SharedSettings
from tests.conftest import StartGatewayWith, StartMock
from tests.support import PYTHON, REPO_ROOT, answers_200, eventually

DEPLOY = REPO_ROOT / "docs" / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
# The oldest release the manifests are for: the preStop `sleep` action is on by default since
# Kubernetes 1.30.
KUBERNETES_VERSION = "1.30.0"
# Time the workers get after graceful_timeout to finish their shutdown and exit.
EXIT_MARGIN = 5


def _documents(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def _manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """Every resource under docs/deploy/kubernetes, by (kind, name)."""
    return {
        (document["kind"], document["metadata"]["name"]): document
        for path in sorted(KUBERNETES.glob("*.yaml"))
        for document in _documents(path)
    }


def _gateway_container() -> dict[str, Any]:
    (container,) = _manifests()["Deployment", "ntonix"]["spec"]["template"]["spec"]["containers"]
    result: dict[str, Any] = container
    return result


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _configmap_toml() -> str:
    text: str = _manifests()["ConfigMap", "ntonix-config"]["data"]["ntonix.toml"]
    return text


@pytest.mark.parametrize("path", sorted(KUBERNETES.glob("*.yaml")), ids=lambda path: path.name)
def test_each_manifest_is_valid_kubernetes(path: Path) -> None:
    for document in _documents(path):
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_the_validation_is_strict_enough_to_catch_a_misspelt_field() -> None:
    deployment = _manifests()["Deployment", "ntonix"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize(
    "config",
    [_configmap_toml(), (DEPLOY / "ntonix.toml").read_text()],
    ids=["kubernetes", "compose"],
)
def test_the_config_passes_check_config(config: str, tmp_path: Path) -> None:
    path = tmp_path / "ntonix.toml"
    path.write_text(config)
    check = [PYTHON, "-m", "ntonix.cli", "check-config", str(path)]
    result = subprocess.run(check, capture_output=True, text=True, cwd=REPO_ROOT, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_container_serves_the_configmap_on_the_port_it_declares() -> None:
    container = _gateway_container()
    argv = [*container["command"], *container["args"]]
    assert argv[:2] == ["ntonix", "serve"]
    (port,) = container["ports"]
    assert _option(argv, "--bind") == f"0.0.0.0:{port['containerPort']}"
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "config"]
    volumes = _manifests()["Deployment", "ntonix"]["spec"]["template"]["spec"]["volumes"]
    (volume,) = [v for v in volumes if v["name"] == "config"]
    assert volume["configMap"]["name"] == "ntonix-config"
    assert _option(argv, "--config") == f"{mount['mountPath']}/ntonix.toml"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == port["name"]
    service = _manifests()["Service", "ntonix"]
    assert (
        service["spec"]["selector"]
        == _manifests()["Deployment", "ntonix"]["spec"]["selector"]["matchLabels"]
    )
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [port["name"]]


def test_the_grace_period_covers_the_prestop_sleep_and_the_drain() -> None:
    spec = _manifests()["Deployment", "ntonix"]["spec"]["template"]["spec"]
    sleep = _gateway_container()["lifecycle"]["preStop"]["sleep"]["seconds"]
    graceful = Config.from_toml(_configmap_toml()).gateway.graceful_timeout
    assert sleep > 0
    assert spec["terminationGracePeriodSeconds"] == sleep + graceful + EXIT_MARGIN


async def test_the_probes_ask_routes_a_healthy_gateway_answers_200(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    """The ConfigMap's config, its backends swapped for a local mock and without its shared
    tier (whose host exists only in the cluster: readiness does not depend on it)."""
    mock = await start_mock()
    config = Config.from_toml(_configmap_toml())
    local = tuple(attrs.evolve(backend, url=mock.url) for backend in config.backends)
    gateway = await start_gateway_with(
        attrs.evolve(config, backends=local, shared=SharedSettings())
    )
    container = _gateway_container()
    for probe in ("readinessProbe", "livenessProbe"):
        # Ready once a probe of the config's own cadence has reached the mock.
        url = gateway + container[probe]["httpGet"]["path"]
        await eventually(partial(answers_200, client, url), timeout=2 * config.health.interval + 5)


def test_compose_gateways_serve_the_config_on_their_published_port() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    gateways = {name: s for name, s in compose["services"].items() if name.startswith("gateway")}
    assert len(gateways) == 2
    assert "valkey" in compose["services"]
    for service in gateways.values():
        argv = [*service["entrypoint"], *service["command"]]
        bind_port = _option(argv, "--bind").rpartition(":")[2]
        assert [p.rpartition(":")[2] for p in service["ports"]] == [bind_port]
        (volume,) = service["volumes"]
        source, target, _ = volume.split(":")
        assert (DEPLOY / source).resolve() == DEPLOY / "ntonix.toml"
        assert _option(argv, "--config") == target
        assert f"127.0.0.1:{bind_port}/ntonix/ready" in " ".join(service["healthcheck"]["test"])
        graceful = Config.from_file(str(DEPLOY / "ntonix.toml")).gateway.graceful_timeout
        assert int(service["stop_grace_period"].removesuffix("s")) >= graceful + EXIT_MARGIN
    for backend in Config.from_file(str(DEPLOY / "ntonix.toml")).backends:
        assert urllib.parse.urlsplit(backend.url).hostname in compose["services"]


def test_the_shared_tier_is_the_valkey_deployed_next_to_the_gateways() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for config, services in (
        (
            Config.from_toml(_configmap_toml()),
            {name for kind, name in _manifests() if kind == "Service"},
        ),
        (Config.from_file(str(DEPLOY / "ntonix.toml")), set(compose["services"])),
    ):
        url = urllib.parse.urlsplit(config.shared.url)
        assert url.scheme == "valkey" and url.hostname == "valkey" in services
    # The image the manifests and Compose run carries the tier's client (docs/deployment.md).
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert "pip install --no-cache-dir --disable-pip-version-check '.[shared]'" in dockerfile
