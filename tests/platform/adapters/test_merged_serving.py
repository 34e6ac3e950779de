"""A merged deployment (LORAMUX_MERGED_ADAPTER) through the API: the adapter's name answers
with PEFT's greedy tokens from an engine with no LoRA slots; anything else is refused.

The adapter is uploaded and validated by the real worker on S3; the deployment pins it,
fetches it from S3 and builds its in-process engine the way ``loramux serve`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from loramux.adapters.merged_serving import (
    MergedAdapterError,
    merged_adapter_from_settings,
    resolve_merged_adapter,
)
from loramux.app import build_state, create_app
from loramux.engine_client import engine_client_from_settings
from loramux.settings import Settings
from loramux_engine.engine.detokenizer import IncrementalDetokenizer
from tests.engine.peft_reference import load_base, peft_greedy
from tests.platform.adapters.helpers import assert_openai_error, bearer, upload

PROMPTS = [[5 + (i * 7 + j * 13) % 250 for j in range(n)] for i, n in enumerate([4, 23])]
MAX_TOKENS = 10
EOS = 2  # the tiny LLaMA's eos_token_id


def engine_text(tokenizer: Any, prompt: list[int], tokens: list[int]) -> str:
    """The text the engine streams for these output tokens (one per step, to EOS)."""
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=True)
    text = ""
    for token in tokens:
        text += detokenizer.push([token])
        if token == EOS:
            break
    return text + detokenizer.flush()


@pytest.fixture
def merged_deployment(  # type: ignore[no-untyped-def]
    client: TestClient,
    make_tenant,
    make_peft_adapter: Callable[..., Path],
    wait_validated,
    settings: Settings,
    tiny_llama_dir: Path,
) -> Iterator[dict[str, Any]]:
    acme, secret = make_tenant("acme")
    adapter_dir = make_peft_adapter(seed=7, r=8, lora_alpha=32, target_modules="all-linear")
    for name in ("bot", "other-bot"):
        body = upload(client, secret, name, adapter_dir).json()
        assert wait_validated(body["version_id"]).status == "ready"
    _, intruder = make_tenant("globex")
    body = upload(client, intruder, "bot", adapter_dir).json()
    assert wait_validated(body["version_id"]).status == "ready"

    merged_settings = settings.model_copy(update={"merged_adapter": "acme/bot"})
    storage = client.app.state.loramux.storage  # type: ignore[attr-defined]
    served, local_dir = merged_adapter_from_settings(merged_settings, storage)
    engine = engine_client_from_settings(merged_settings, storage, merged_adapter=local_dir)
    app_state = build_state(merged_settings, storage=storage, engine=engine)
    app_state.merged = served
    base_tokens, base = peft_greedy(load_base(tiny_llama_dir), None, PROMPTS, MAX_TOKENS)
    tokens, _ = peft_greedy(base, adapter_dir, PROMPTS, MAX_TOKENS)
    assert tokens != base_tokens, "the adapter does not change the output"
    with TestClient(create_app(merged_settings, app_state=app_state)) as merged_client:
        yield {
            "client": merged_client,
            "secret": secret,
            "intruder": intruder,
            "tokens": tokens,
            "engine": engine,
            "served": served,
            "tenant": acme,
        }


def test_merged_deployment_serves_the_adapter_alone_with_peft_tokens(
    merged_deployment: dict[str, Any],
) -> None:
    client, secret = merged_deployment["client"], merged_deployment["secret"]
    engine = merged_deployment["engine"]
    assert engine.engine.engine.adapters is None  # no LoRA slots, no LoRA op
    for model in ("bot", f"bot@{merged_deployment['served'].version}"):
        for prompt, tokens in zip(PROMPTS, merged_deployment["tokens"], strict=True):
            response = client.post(
                "/v1/completions",
                json={"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0},
                headers=bearer(secret),
            )
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["model"] == model
            expected = engine_text(engine.tokenizer, prompt, tokens)
            assert body["choices"][0]["text"] == expected
            generated = tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens
            assert body["usage"]["completion_tokens"] == len(generated)

    # Everything else is refused, the base model too: the weights are the adapter's.
    intruder = merged_deployment["intruder"]
    listed = client.get("/v1/models", headers=bearer(secret)).json()["data"]
    assert [(m["id"], m["merged"]) for m in listed] == [("bot", True)]
    assert client.get("/v1/models", headers=bearer(intruder)).json()["data"] == []
    base_model_id = client.app.state.loramux.base_model_id
    request = {"prompt": PROMPTS[0], "max_tokens": 2}
    for model in (base_model_id, "other-bot", "bot@2", "nope"):
        response = client.post(
            "/v1/completions", json={"model": model, **request}, headers=bearer(secret)
        )
        error = assert_openai_error(response, 400, "model_not_served")
        assert "'bot'" in error["message"]  # the owner is told what this deployment serves
    # Another tenant's adapter of the same name is not this one, and is told nothing of it.
    response = client.post(
        "/v1/completions", json={"model": "bot", **request}, headers=bearer(intruder)
    )
    error = assert_openai_error(response, 400, "model_not_served")
    assert "version" not in error["message"]


def test_the_setting_must_name_a_ready_version(  # type: ignore[no-untyped-def]
    local_client: TestClient, make_tenant, peft_adapter_dir: Path, db: sessionmaker[Session]
) -> None:
    _, secret = make_tenant("acme")
    body = upload(local_client, secret, "bot", peft_adapter_dir).json()  # no worker: validating
    with db() as session:
        specs = ("nobody/bot", "acme/bot", "acme/bot@1", "acme/bot@x", body["version_id"])
        for spec in (*specs, "acme/none", "adv_missing"):
            with pytest.raises(MergedAdapterError):
                resolve_merged_adapter(session, spec)
