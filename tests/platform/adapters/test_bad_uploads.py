"""Refused at once with a clear 400 (or 403 for quotas), and nothing stored."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from loramux.app import build_state, create_app
from loramux.db.models import Adapter, AdapterUpload, AdapterVersion
from loramux.storage import storage_from_settings
from tests.platform.adapters.crafted import CRAFTED, PICKLE_BYTES
from tests.platform.adapters.helpers import CONFIG, WEIGHTS, assert_openai_error, bearer, upload


@pytest.fixture
def nothing_stored(client: TestClient, db: sessionmaker[Session]) -> Iterator[None]:
    """Asserts after the test that it added no blob and no registry row."""
    storage = client.app.state.loramux.storage  # type: ignore[attr-defined]
    before = set(storage.list("adapters/")) | set(storage.list("uploads/"))
    yield
    assert set(storage.list("adapters/")) | set(storage.list("uploads/")) == before
    with db() as session:
        for model in (Adapter, AdapterVersion, AdapterUpload):
            assert session.scalar(select(func.count()).select_from(model)) == 0, model


def _config(adapter_dir: Path, **changes: Any) -> bytes:
    config = json.loads((adapter_dir / CONFIG).read_bytes())
    config.update(changes)
    return json.dumps(config).encode()


BAD_CONFIGS = [
    ({"auto_map": {"AutoModel": "evil.Model"}}, "auto_map"),
    ({"loftq_config": {"trust_remote_code": True}}, "trust_remote_code"),
    ({"peft_type": "IA3"}, "peft_type"),
    ({"r": 128}, "ranks from 1 to 64"),
    ({"rank_pattern": {"q_proj": 65}}, "ranks from 1 to 64"),
    ({"lora_alpha": "big"}, "lora_alpha"),
    ({"target_modules": []}, "target_modules"),
]


def test_bad_configs_are_refused(  # type: ignore[no-untyped-def]
    client, make_tenant, peft_adapter_dir, nothing_stored
) -> None:
    _, secret = make_tenant("acme")
    for changes, needle in BAD_CONFIGS:
        config = _config(peft_adapter_dir, **changes)
        response = upload(client, secret, "bot", peft_adapter_dir, config=config)
        error = assert_openai_error(response, 400, "invalid_adapter")
        assert needle in error["message"] and error["param"] == "config", changes


def test_unparseable_or_oversized_configs_are_refused(  # type: ignore[no-untyped-def]
    client, make_tenant, peft_adapter_dir, nothing_stored
) -> None:
    _, secret = make_tenant("acme")
    for config, needle in [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "not an object"),
        (b'{"peft_type": "LORA", "pad": "' + b"x" * 70_000 + b'"}', "over"),
    ]:
        response = upload(client, secret, "bot", peft_adapter_dir, config=config)
        assert needle in assert_openai_error(response, 400)["message"], config[:20]


def test_crafted_weights_are_refused_at_upload(  # type: ignore[no-untyped-def]
    client, make_tenant, peft_adapter_dir, nothing_stored
) -> None:
    _, secret = make_tenant("acme")
    for kind, (make, needle) in CRAFTED.items():
        response = upload(client, secret, "bot", peft_adapter_dir, weights=make())
        error = assert_openai_error(response, 400, "invalid_adapter")
        assert needle in error["message"] and error["param"] == "weights", kind


NOT_THE_TWO_FILES = [
    ({"weights": ("adapter_model.bin", PICKLE_BYTES)}, "pickle"),
    ({"weights": ("adapter_model.pt", PICKLE_BYTES)}, "pickle"),
    ({"weights": ("weights.npz", b"PK")}, ".safetensors"),
    ({"config": ("config.yaml", b"{}")}, ".json"),
    ({"extra": ("modeling.py", b"import os")}, "unexpected field 'extra'"),
    ({"weights2": ("adapter_model.bin", PICKLE_BYTES)}, "unexpected field"),
]


def test_files_other_than_the_two_expected_are_refused(  # type: ignore[no-untyped-def]
    client, make_tenant, peft_adapter_dir, nothing_stored
) -> None:
    _, secret = make_tenant("acme")
    for files, needle in NOT_THE_TWO_FILES:
        response = upload(client, secret, "bot", peft_adapter_dir, extra_files=files)
        error = assert_openai_error(response, 400, "unsupported_file")
        assert needle in error["message"], files


def test_malformed_requests_are_refused(  # type: ignore[no-untyped-def]
    client, make_tenant, peft_adapter_dir, nothing_stored
) -> None:
    _, secret = make_tenant("acme")
    assert_openai_error(
        client.post("/v1/adapters", json={"name": "x"}, headers=bearer(secret)), 400
    )
    missing = upload(client, secret, "bot", config=(peft_adapter_dir / CONFIG).read_bytes())
    assert "'weights' is missing" in assert_openai_error(missing, 400)["message"]
    as_text = client.post(
        "/v1/adapters",
        data={"name": "bot", "weights": "not a file"},
        files={"config": (CONFIG, (peft_adapter_dir / CONFIG).read_bytes())},
        headers=bearer(secret),
    )
    assert "file part" in assert_openai_error(as_text, 400)["message"]


def test_bad_names_are_refused(  # type: ignore[no-untyped-def]
    client, make_tenant, peft_adapter_dir, nothing_stored
) -> None:
    _, secret = make_tenant("acme")
    for name in ["../etc", "a/b", "...", ".hidden", "x" * 65, "", "bot@2", "with space"]:
        error = assert_openai_error(upload(client, secret, name, peft_adapter_dir), 400)
        assert error["param"] == "name", name
    base = client.app.state.loramux.base_model_id
    error = assert_openai_error(upload(client, secret, base, peft_adapter_dir), 400)
    assert "base model" in error["message"]


def test_weights_over_the_size_limit_are_refused(  # type: ignore[no-untyped-def]
    settings, make_tenant, peft_adapter_dir, nothing_stored
) -> None:
    _, secret = make_tenant("acme")
    small = settings.model_copy(update={"max_adapter_bytes": 1024})
    with TestClient(create_app(small, app_state=build_state(small))) as small_client:
        response = upload(small_client, secret, "bot", peft_adapter_dir)
    assert (
        "over the 1024-byte limit"
        in assert_openai_error(response, 400, "file_too_large")["message"]
    )


def test_adapter_count_quota(  # type: ignore[no-untyped-def]
    client, make_tenant, peft_adapter_dir, make_peft_adapter
) -> None:
    _, secret = make_tenant("acme", max_adapters=1)
    assert upload(client, secret, "one", peft_adapter_dir).status_code == 201
    refused = upload(client, secret, "two", peft_adapter_dir)
    assert (
        "max_adapters=1" in assert_openai_error(refused, 403, "adapter_quota_exceeded")["message"]
    )
    # A new version of an existing name is not a new adapter.
    assert upload(client, secret, "one", make_peft_adapter(seed=3)).json()["version"] == 2


def test_storage_quota_counts_each_versions_bytes(  # type: ignore[no-untyped-def]
    client, make_tenant, peft_adapter_dir, make_peft_adapter, settings
) -> None:
    size = sum((peft_adapter_dir / f).stat().st_size for f in (CONFIG, WEIGHTS))
    _, secret = make_tenant("acme", max_storage_bytes=size + size // 2)
    assert upload(client, secret, "one", peft_adapter_dir).status_code == 201
    storage = storage_from_settings(settings)
    before = set(storage.list("adapters/"))
    refused = upload(client, secret, "one", make_peft_adapter(seed=4))
    assert (
        "max_storage_bytes"
        in assert_openai_error(refused, 403, "storage_quota_exceeded")["message"]
    )
    assert set(storage.list("adapters/")) == before
    # After deleting, the bytes are free again.
    assert client.delete("/v1/adapters/one", headers=bearer(secret)).status_code == 200
    assert upload(client, secret, "two", make_peft_adapter(seed=4)).status_code == 201


def test_a_storage_outage_is_a_503_and_leaves_no_lease(  # type: ignore[no-untyped-def]
    client, make_tenant, peft_adapter_dir, db, monkeypatch
) -> None:
    from loramux.storage import StorageError

    def down(*_args: object, **_kwargs: object) -> None:
        raise StorageError("S3 unreachable")

    monkeypatch.setattr(client.app.state.loramux.storage, "put", down)
    _, secret = make_tenant("acme")
    response = upload(client, secret, "bot", peft_adapter_dir)
    assert_openai_error(response, 503, "service_unavailable")
    with db() as session:
        for model in (Adapter, AdapterVersion, AdapterUpload):
            assert session.scalar(select(func.count()).select_from(model)) == 0, model
