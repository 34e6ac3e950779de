"""Ray Serve without a cluster: the wire's errors, settings into deployment options, and the
Serve config and KubeRay manifest in infra/ against Serve's own schema and our settings."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")
yaml = pytest.importorskip("yaml")

from ray.serve import Application  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from loramux.engine_client import engine_config_from_settings  # noqa: E402
from loramux.ray_engine import expected_max_model_len, sum_stats  # noqa: E402
from loramux.ray_serve.app import app_builder  # noqa: E402
from loramux.ray_serve.config import engine_options, settings_payload  # noqa: E402
from loramux.ray_serve.wire import RayEngineError, decode_error, encode_error  # noqa: E402
from loramux.settings import Settings  # noqa: E402
from loramux.storage import LocalStorage  # noqa: E402
from loramux_engine.engine.llm_engine import LLMEngine  # noqa: E402
from loramux_engine.errors import (  # noqa: E402
    AdapterRequestError,
    InvalidSamplingParamsError,
    NonFiniteLogitsError,
    PromptTooLongError,
    SequenceFailedError,
)
from loramux_engine.lora.errors import AdapterLoadError  # noqa: E402
from loramux_engine.outputs import EngineStats  # noqa: E402

INFRA = Path(__file__).resolve().parents[2] / "infra"


@pytest.mark.parametrize(
    "error",
    [
        AdapterLoadError("av_1", FileNotFoundError("no such blob")),
        PromptTooLongError(300, 256),
        NonFiniteLogitsError("logits were not finite"),
        SequenceFailedError.caused_by(ZeroDivisionError(), "sample"),
        InvalidSamplingParamsError("top_p must be in (0, 1]"),
        AdapterRequestError("no adapter source"),
        ValueError("request_id 'x' is already streaming"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_engine_errors_cross_the_wire_as_themselves(error: Exception) -> None:
    again = decode_error(encode_error(error))
    assert type(again) is type(error)
    assert str(again) == str(error)
    if isinstance(error, AdapterLoadError):
        assert isinstance(again, AdapterLoadError) and again.adapter_id == "av_1"


def test_other_errors_are_the_engines() -> None:
    again = decode_error(encode_error(RuntimeError("engine shut down")))
    assert type(again) is RayEngineError and str(again) == "engine shut down"


def test_replica_stats_sum() -> None:
    a = EngineStats(num_running=2, kv_blocks_total=100, kv_blocks_used=50, kv_block_size=16)
    b = EngineStats(num_running=1, kv_blocks_total=100, kv_blocks_used=0, kv_block_size=16)
    a.extra["adapter_cache_device_loads"] = 3.0
    total = sum_stats([a, b])
    assert (total.num_running, total.kv_blocks_total, total.kv_block_size) == (3, 200, 16)
    assert total.kv_cache_usage == 0.25
    assert total.extra == {"adapter_cache_device_loads": 3.0}


def test_replica_stats_sum_requests_per_tenant_and_list_every_resident_adapter() -> None:
    a = EngineStats(num_running_by_key={"t1": 2}, num_waiting_by_key={"t2": 1})
    b = EngineStats(num_running_by_key={"t1": 1, "t2": 4})
    a.resident_adapters = [{"slot": 1, "id": "adv_a", "namespace": "t1", "pinned": True}]
    b.resident_adapters = [{"slot": 1, "id": "adv_b", "namespace": "t2", "pinned": False}]
    total = sum_stats([a, b])
    assert total.num_running_by_key == {"t1": 3, "t2": 4}
    assert total.num_waiting_by_key == {"t2": 1}
    assert [r["id"] for r in total.resident_adapters] == ["adv_a", "adv_b"]
    assert a.num_running_by_key == {"t1": 2}  # the replicas' own stats are left as they were


@pytest.mark.parametrize("kv_cache_bytes", [256 << 10, 64 << 20], ids=["kv-capped", "context"])
def test_the_clients_context_length_is_the_engines(
    tiny_llama_dir: Path, tmp_path: Path, kv_cache_bytes: int
) -> None:
    """Before a replica answers, the client sizes the context as LLMEngine does (on CPU)."""
    settings = Settings(
        home=tmp_path,
        model=str(tiny_llama_dir),
        device="cpu",
        engine_kv_cache_bytes=kv_cache_bytes,
    )
    engine = LLMEngine(engine_config_from_settings(settings, LocalStorage(tmp_path / "storage")))
    try:
        assert expected_max_model_len(settings, tiny_llama_dir) == engine.max_model_len
    finally:
        engine.close()


def test_engine_options_follow_settings() -> None:
    settings = Settings(
        ray_engine_min_replicas=0,
        ray_engine_max_replicas=3,
        ray_engine_target_ongoing_requests=8,
        ray_engine_num_gpus=1,
        engine_max_num_seqs=32,
    )
    options = engine_options(settings)
    assert options["autoscaling_config"]["min_replicas"] == 0
    assert options["autoscaling_config"]["max_replicas"] == 3
    assert options["autoscaling_config"]["target_ongoing_requests"] == 8
    assert options["max_ongoing_requests"] == 32
    assert options["ray_actor_options"]["num_gpus"] == 1


def test_replicas_get_the_settings_given_here_and_their_own_env_for_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [n for n in os.environ if n.startswith("LORAMUX_")]:
        monkeypatch.delenv(name)
    payload = settings_payload(Settings(port=9000, ray_engine_min_replicas=0))
    assert payload == {"port": 9000, "ray_engine_min_replicas": 0}


def _serve_config(text: str) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(text)
    ServeDeploySchema.model_validate(config)
    return config


def _check_application(config: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    [application] = config["applications"]
    assert application["import_path"] == "loramux.ray_serve.app:app_builder"
    env = application["runtime_env"]["env_vars"]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()  # each one parses as a setting
    assert isinstance(app_builder({}), Application)
    return engine_options(settings)


def test_the_serve_config_builds_the_application(monkeypatch: pytest.MonkeyPatch) -> None:
    config = _serve_config((INFRA / "serve-config.yaml").read_text())
    options = _check_application(config, monkeypatch)
    assert options["autoscaling_config"]["min_replicas"] == 0  # scale to zero


def test_the_rayservice_runs_the_same_application(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = list(yaml.safe_load_all((INFRA / "rayservice.yaml").read_text()))
    by_kind = {doc["kind"]: doc for doc in docs}
    service = by_kind["RayService"]["spec"]
    assert service["rayClusterConfig"]["rayVersion"] == ray.__version__
    options = _check_application(_serve_config(service["serveConfigV2"]), monkeypatch)
    assert options["ray_actor_options"]["num_gpus"] == 1
    # PostgreSQL, Redis and S3 as in compose, for every pod, from the Secret.
    secret = by_kind["Secret"]["stringData"]
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    compose_env = set(compose["services"]["loramux"]["environment"])
    assert compose_env - {"LORAMUX_ENGINE_URL"} <= set(secret)
    cluster = service["rayClusterConfig"]
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for pod in [*pods, by_kind["Job"]["spec"]]:
        [container] = pod["template"]["spec"]["containers"]
        assert container["envFrom"] == [{"secretRef": {"name": "loramux-settings"}}]


def test_celery_workers_and_one_beat_run_beside_the_rayservice() -> None:
    """As in compose: workers and one beat, their engine reached through the Serve app's API
    (KubeRay's `<name>-serve-svc` on the Serve HTTP port), settings from the same Secret."""
    docs = list(yaml.safe_load_all((INFRA / "rayservice.yaml").read_text()))
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    [rayservice] = [d for d in docs if d["kind"] == "RayService"]
    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    engine_url = (
        f"http://{rayservice['metadata']['name']}-serve-svc:{serve_config['http_options']['port']}"
    )
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())["services"]
    containers = {}
    for name in ("loramux-worker", "loramux-beat"):
        [container] = deployments[name]["spec"]["template"]["spec"]["containers"]
        assert container["envFrom"] == [{"secretRef": {"name": "loramux-settings"}}]
        containers[name] = container
    worker, beat = containers["loramux-worker"], containers["loramux-beat"]
    assert worker["command"] == compose["worker"]["entrypoint"]
    assert worker["env"] == [{"name": "LORAMUX_ENGINE_URL", "value": engine_url}]
    assert Settings(engine_url=engine_url).resolved_engine_url == engine_url
    assert beat["command"][:5] == compose["beat"]["entrypoint"][:5]
    assert deployments["loramux-beat"]["spec"]["replicas"] == 1
    assert deployments["loramux-beat"]["spec"]["strategy"] == {"type": "Recreate"}
