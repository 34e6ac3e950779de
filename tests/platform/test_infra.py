"""infra/ cannot run here (no container engine); these checks keep it honest against the code."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from loramux.settings import Settings

INFRA = Path(__file__).resolve().parents[2] / "infra"
DEFAULTED = re.compile(r"\$\{[A-Z_]+:-([^}]*)\}")
REQUIRED = re.compile(r"\$\{[A-Z_]+:\?[^}]*\}")


def _setting_names(text: str) -> set[str]:
    return set(re.findall(r"\bLORAMUX_([A-Z0-9_]+)", text))


def test_every_loramux_variable_in_infra_is_a_setting() -> None:
    fields = {name.upper() for name in Settings.model_fields}
    used: set[str] = set()
    for path in INFRA.rglob("*"):
        if path.is_file() and path.suffix != ".whl":  # infra/gpu/wheels: vendored wheels
            used |= _setting_names(path.read_text())
    assert used, "infra/ names no LORAMUX_* variable"
    assert used - fields == set()


def test_every_loramux_variable_in_the_readme_is_a_setting() -> None:
    used = _setting_names((INFRA.parent / "README.md").read_text())
    assert "HOST" in used and "PORT" in used
    assert used - {name.upper() for name in Settings.model_fields} == set()


def _compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    compose: dict[str, Any] = yaml.safe_load((INFRA / "compose.yaml").read_text())
    return compose


def _interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` as its default, ``${VAR:?msg}`` as a placeholder."""
    return REQUIRED.sub("lmx_placeholder", DEFAULTED.sub(r"\1", value))


def test_compose_settings_load_as_production(monkeypatch: pytest.MonkeyPatch) -> None:
    services = _compose()["services"]
    assert {"postgres", "redis", "minio", "create-bucket", "loramux", "worker"} <= set(services)
    env = services["loramux"]["environment"]
    assert services["worker"]["environment"] == env
    assert services["worker"]["entrypoint"][:3] == ["celery", "-A", "loramux.jobs.app"]
    for name, value in env.items():
        monkeypatch.setenv(name, _interpolate(str(value)))
    settings = Settings()
    assert settings.database_url is not None
    assert settings.database_url.startswith("postgresql+psycopg://")
    assert settings.database_url.endswith("@postgres:5432/loramux")
    assert settings.storage_url == "s3://loramux/prod"
    assert settings.s3_endpoint_url == "http://minio:9000"
    assert (settings.redis_url, settings.broker_url) == (
        "redis://redis:6379/0",
        "redis://redis:6379/1",
    )
    assert settings.admin_key is not None
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)


def test_bucket_job_creates_the_storage_bucket() -> None:
    services = _compose()["services"]
    bucket = services["loramux"]["environment"]["LORAMUX_STORAGE_URL"].split("/")[2]
    assert f"store/{bucket}" in " ".join(services["create-bucket"]["entrypoint"])


def test_prometheus_scrapes_loramux_metrics() -> None:
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((INFRA / "prometheus.yml").read_text())
    [job] = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["loramux:8000"]
    # /metrics asks for the admin key by default: the scrape sends the one compose holds.
    secret = job["authorization"]["credentials_file"].rsplit("/", 1)[1]
    services = _compose()
    assert services["secrets"][secret]["environment"] == "LORAMUX_ADMIN_KEY"
    assert secret in services["services"]["prometheus"]["secrets"]


def _dockerfile(name: str) -> list[str]:
    """The instructions of infra/<name>, continuation lines joined, comments left out."""
    text = (INFRA / name).read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def test_cuda_image_is_the_cpu_image_with_cuda_torch() -> None:
    cpu, cuda = _dockerfile("Dockerfile"), _dockerfile("Dockerfile.cuda")
    [cpu_torch] = [line for line in cpu if "pip install torch==" in line]
    [cuda_torch] = [line for line in cuda if "pip install torch==" in line]
    pin = re.search(r"torch==\S+", cpu_torch)
    assert pin is not None and pin.group() in cuda_torch  # the same torch, its CUDA build
    [index] = [line for line in cuda if line.startswith("ARG TORCH_INDEX=")]
    assert re.fullmatch(r"ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cu\d+", index)
    # triton's launcher is compiled with the system C compiler at first use
    assert any("apt-get install" in line and " gcc " in line for line in cuda)
    assert "triton.__version__ == '3.7.1'" in cuda_torch
    pyproject = (INFRA.parent / "pyproject.toml").read_text()
    assert '"triton==3.7.1;' in pyproject  # the dev extra tests the kernels with that triton
    # the same application, user, model and entrypoint
    same = ("COPY", "RUN pip install -e", "USER", "RUN loramux", "ENTRYPOINT", "EXPOSE")
    assert [x for x in cpu if x.startswith(same)] == [x for x in cuda if x.startswith(same)]
    [env] = [line for line in cuda if line.startswith("ENV ")]
    assert "LORAMUX_DEVICE=cuda" in env.split()
    assert (INFRA / "Dockerfile.cuda.dockerignore").read_text().splitlines()[1:] == (
        (INFRA / "Dockerfile.dockerignore").read_text().splitlines()[1:]
    )


def test_gpu_compose_override_gives_the_engine_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    yaml = pytest.importorskip("yaml")
    base = _compose()["services"]
    override = yaml.safe_load((INFRA / "compose.gpu.yaml").read_text())["services"]
    assert set(override) == {"loramux"}  # worker and beat keep the CPU image
    service = override["loramux"]
    assert (INFRA.parent / service["build"]["dockerfile"]).name == "Dockerfile.cuda"
    assert service["build"]["context"] == base["loramux"]["build"]["context"]
    assert service["image"] != base["worker"]["image"]
    [device] = service["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    # compose merges the environment maps: the production settings plus the GPU's
    env = {**base["loramux"]["environment"], **service["environment"]}
    for name, value in env.items():
        monkeypatch.setenv(name, _interpolate(str(value)))
    settings = Settings()
    assert settings.device == "cuda"
    assert settings.engine_cuda_graphs is True
    assert settings.database_url is not None


def test_rayservice_engine_workers_ask_for_a_gpu() -> None:
    yaml = pytest.importorskip("yaml")
    docs = list(yaml.safe_load_all((INFRA / "rayservice.yaml").read_text()))
    [service] = [d for d in docs if d["kind"] == "RayService"]
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    env = serve["applications"][0]["runtime_env"]["env_vars"]
    gpus_per_replica = float(env["LORAMUX_RAY_ENGINE_NUM_GPUS"])
    assert gpus_per_replica >= 1
    [group] = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    [container] = pod["containers"]
    for kind in ("requests", "limits"):
        assert container["resources"][kind]["nvidia.com/gpu"] >= gpus_per_replica
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert "docker build -f infra/Dockerfile.cuda -t " + container["image"] in (
        (INFRA / "rayservice.yaml").read_text()
    )
