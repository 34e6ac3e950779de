"""S3 refusing or hung: a cold adapter, an upload and /readyz answer within seconds, the
tenant's 503 names no endpoint, bucket or key, and all works again once S3 is back."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from loramux.app import build_state, create_app
from loramux.db.models import Adapter, AdapterVersion
from loramux.engine_client import InProcessEngineClient, StorageAdapterSource
from loramux.settings import Settings
from loramux.storage import S3Storage, StorageUnavailable, adapter_key, storage_from_settings
from loramux_engine.config import EngineConfig
from loramux_engine.engine.async_engine import AsyncLLMEngine
from loramux_engine.lora import adapter_sha256
from tests.engine.lora.adapters import read_files
from tests.engine.peft_reference import load_base, save_random_adapter
from tests.fixtures.fault_proxy import FaultProxy
from tests.platform.adapters.helpers import bearer, upload
from tests.platform.conftest import ADMIN_KEY
from tests.platform.faults.conftest import FAST_TIMEOUTS, assert_unavailable, within

PREFIX = "blobs"
OUTAGES = ["refuse", "freeze"]


def internal_details(proxy: FaultProxy, bucket: str) -> list[str]:
    return ["127.0.0.1", str(proxy.port), bucket, f"{PREFIX}/", "adapters/"]


@pytest.fixture
def s3_settings(
    registry_url: str,
    db: sessionmaker[Session],
    tmp_path: Path,
    s3_proxy: FaultProxy,
    s3_bucket: str,
    tiny_llama_dir: Path,
) -> Settings:
    """The registry direct; S3 through ``s3_proxy``."""
    return Settings(
        home=tmp_path / "home",
        database_url=registry_url,
        storage_url=f"s3://{s3_bucket}/{PREFIX}",
        s3_endpoint_url=f"http://{s3_proxy.host}:{s3_proxy.port}",
        admin_key=ADMIN_KEY,
        model=str(tiny_llama_dir),
        **FAST_TIMEOUTS,
    )


@pytest.fixture
def storage(s3_settings: Settings) -> S3Storage:
    store = storage_from_settings(s3_settings)
    assert isinstance(store, S3Storage)
    return store


@pytest.fixture
def engine(storage: S3Storage, tiny_llama_dir: Path) -> InProcessEngineClient:
    config = EngineConfig(
        model_dir=str(tiny_llama_dir),
        device="cpu",
        max_num_seqs=4,
        max_model_len=128,
        kv_cache_bytes=4 << 20,
        max_num_batched_tokens=256,
        adapter_source=StorageAdapterSource(storage),
        # A failed load is retried soon: recovery is seen within the test.
        adapter_failure_ttl_s=0.2,
    )
    return InProcessEngineClient(AsyncLLMEngine.from_config(config))


@pytest.fixture
def client(
    s3_settings: Settings, storage: S3Storage, engine: InProcessEngineClient
) -> Iterator[TestClient]:
    app_state = build_state(s3_settings, storage=storage, engine=engine)
    with TestClient(create_app(s3_settings, app_state=app_state)) as test_client:
        yield test_client


@pytest.mark.parametrize("outage", OUTAGES)
def test_storage_calls_fail_fast_with_no_internal_detail(
    storage: S3Storage, s3_proxy: FaultProxy, s3_bucket: str, outage: str
) -> None:
    storage.put("files/kept", b"kept")
    getattr(s3_proxy, outage)()
    calls: list[Callable[[], Any]] = [
        storage.check,
        lambda: storage.put("files/new", b"new"),
        lambda: storage.get_bytes("files/kept", expected_sha256=None),
        lambda: list(storage.list("files/")),
    ]
    for call in calls:
        with pytest.raises(StorageUnavailable) as caught:
            within(call)
        for detail in internal_details(s3_proxy, s3_bucket):
            assert detail not in str(caught.value)
    s3_proxy.resume()
    within(storage.check)
    assert within(lambda: storage.get_bytes("files/kept", expected_sha256=None)) == b"kept"


@pytest.mark.parametrize("outage", OUTAGES)
def test_cold_adapter_upload_and_readyz_answer_503_then_recover(
    client: TestClient,
    make_tenant: Callable[..., tuple[dict[str, Any], str]],
    db: sessionmaker[Session],
    storage: S3Storage,
    s3_proxy: FaultProxy,
    s3_bucket: str,
    tiny_llama_dir: Path,
    tmp_path: Path,
    outage: str,
) -> None:
    tenant, key = make_tenant("acme")
    adapter_dir, _ = save_random_adapter(
        load_base(tiny_llama_dir), tmp_path / "bot", seed=1, std=0.3, r=4, lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
    )  # fmt: skip
    publish_ready(db, storage, tenant["id"], "bot", adapter_dir, tiny_llama_dir.name)
    completion = {"model": "bot", "prompt": "hi", "max_tokens": 4, "temperature": 0}
    internal = internal_details(s3_proxy, s3_bucket)
    getattr(s3_proxy, outage)()

    # A cold adapter: the engine's fetch from S3 fails, within seconds, and says nothing inside.
    response = within(lambda: client.post("/v1/completions", headers=bearer(key), json=completion))
    assert_unavailable(response, *internal)
    response = within(lambda: upload(client, key, "bot2", adapter_dir))
    assert_unavailable(response, *internal)
    ready = within(lambda: client.get("/readyz"))
    assert ready.status_code == 503
    assert ready.json()["checks"]["storage"].startswith("error")

    s3_proxy.resume()
    assert within(lambda: client.get("/readyz")).status_code == 200
    assert within(lambda: upload(client, key, "bot2", adapter_dir)).status_code in (200, 201, 202)
    time.sleep(0.3)  # the engine's adapter_failure_ttl_s: the failed load may be retried now
    response = within(lambda: client.post("/v1/completions", headers=bearer(key), json=completion))
    assert response.status_code == 200, response.text


def publish_ready(
    db: sessionmaker[Session],
    storage: S3Storage,
    tenant_id: str,
    name: str,
    adapter_dir: Path,
    base_model_id: str,
) -> None:
    """The blobs and the ready row a validated upload leaves (the worker's part skipped)."""
    config, weights = read_files(adapter_dir)
    sha = adapter_sha256(config, weights)
    keys = [adapter_key(sha, f) for f in ("adapter_config.json", "adapter_model.safetensors")]
    for blob_key, data in zip(keys, (config, weights), strict=True):
        storage.put(blob_key, data)
    with db() as session:
        adapter = Adapter(tenant_id=tenant_id, name=name, base_model_id=base_model_id)
        session.add(adapter)
        session.flush()
        session.add(
            AdapterVersion(
                adapter_id=adapter.id,
                tenant_id=tenant_id,
                version=1,
                sha256=sha,
                size_bytes=len(config) + len(weights),
                rank=4,
                alpha=8.0,
                target_modules=["q_proj", "v_proj"],
                config_key=keys[0],
                weights_key=keys[1],
                status="ready",
            )
        )
        session.commit()
