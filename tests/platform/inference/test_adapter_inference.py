"""An adapter request through /v1/completions runs with that adapter in the in-process engine.

The adapter's blobs are put in storage at their content-addressed keys with a ready
registry row, as a validated upload leaves them; the engine fetches them through
StorageAdapterSource on first use.
"""

from __future__ import annotations

from pathlib import Path

from loramux.db.models import Adapter, AdapterVersion
from loramux.storage import LocalStorage, adapter_key
from loramux_engine.lora import AdapterRef, adapter_sha256
from loramux_engine.sampling_params import SamplingParams
from tests.engine.lora.adapters import read_files
from tests.engine.peft_reference import load_base, save_random_adapter


def _completion(client, key: str, model: str, prompt: str) -> str:  # type: ignore[no-untyped-def]
    response = client.post(
        "/v1/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0},
    )
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


def test_adapter_completion_equals_the_engines_output_for_it(  # type: ignore[no-untyped-def]
    client, engine, settings, make_tenant, db, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    tenant, key = make_tenant("acme")
    adapter_dir, _ = save_random_adapter(
        load_base(tiny_llama_dir),
        tmp_path / "bot",
        seed=3,
        std=0.3,
        r=8,
        lora_alpha=16,
        target_modules="all-linear",
    )
    config, weights = read_files(adapter_dir)
    sha = adapter_sha256(config, weights)
    storage = LocalStorage(settings.home / "storage")  # what the engine fixture's source reads
    keys = [adapter_key(sha, name) for name in ("adapter_config.json", "adapter_model.safetensors")]
    for blob_key, data in zip(keys, (config, weights), strict=True):
        storage.put(blob_key, data)
    with db() as session:
        adapter = Adapter(tenant_id=tenant["id"], name="bot", base_model_id=tiny_llama_dir.name)
        session.add(adapter)
        session.flush()
        version = AdapterVersion(
            adapter_id=adapter.id,
            tenant_id=tenant["id"],
            version=1,
            sha256=sha,
            size_bytes=len(config) + len(weights),
            rank=8,
            alpha=16.0,
            target_modules=["all-linear"],
            config_key=keys[0],
            weights_key=keys[1],
            status="ready",
        )
        session.add(version)
        session.commit()
        ref = AdapterRef(version.id, sha, namespace=tenant["id"])  # as resolve_model names it

    prompt = "Hello there, adapter"
    got = _completion(client, key, "bot", prompt)
    prompt_ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
    params = SamplingParams(temperature=0, max_tokens=12)
    expected = engine.engine.engine.generate([prompt_ids], params, adapters=[ref])[0]
    assert got == expected.text
    assert got != _completion(client, key, tiny_llama_dir.name, prompt)
    assert engine.stats().extra["adapter_cache_disk_loads"] == 1

    engine.drop_adapter(ref)
    assert _completion(client, key, "bot", prompt) == got  # fetched from storage again
    assert engine.stats().extra["adapter_cache_disk_loads"] == 2
