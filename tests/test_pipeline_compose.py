"""docker-compose.yml: Docker cannot run here, so check its structure (and, when the compose
plugin is installed, let ``docker compose config`` validate it)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_volume_and_healthchecks(compose):
    services = compose["services"]
    assert {"scheduler", "worker-1", "worker-2", "api"} <= set(services)
    assert services["scheduler"]["command"][:2] == ["dask", "scheduler"]
    for name in ("worker-1", "worker-2"):
        cmd = services[name]["command"]
        assert cmd[:3] == ["dask", "worker", "tcp://scheduler:8786"]
        assert cmd[cmd.index("--nthreads") + 1] == "2"
        assert services[name]["depends_on"]["scheduler"]["condition"] == "service_healthy"
    api = services["api"]
    assert api["command"][:2] == ["b3mine", "serve"] and "0.0.0.0" in api["command"]
    assert api["environment"] == {**api["environment"], "B3MINE_DATA_ROOT": "/data",
                                  "B3MINE_ENGINE": "dask",
                                  "DASK_SCHEDULER_ADDRESS": "tcp://scheduler:8786"}
    # one named volume, mounted at the same path everywhere (checkpoints cross containers)
    assert "b3mine-data" in compose["volumes"]
    for name, svc in services.items():
        assert "b3mine-data:/data" in svc["volumes"], name
        test = " ".join(svc["healthcheck"]["test"])
        assert "health" in test, name
    assert "/healthz" in " ".join(api["healthcheck"]["test"])
    assert "8787/health" in " ".join(services["scheduler"]["healthcheck"]["test"])


def test_dockerfile_installs_the_pipeline_and_service():
    text = (ROOT / "Dockerfile").read_text()
    assert '.[pipeline,service]' in text and "torch" not in text.split("RUN pip")[1]
    for package in ("b3mine", "pipelines", "service"):
        assert f"COPY {package} " in text


def _compose_plugin() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _compose_plugin(), reason="docker compose plugin not installed")
def test_docker_compose_config_validates():
    done = subprocess.run(["docker", "compose", "-f", str(ROOT / "docker-compose.yml"), "config",
                           "-q"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
