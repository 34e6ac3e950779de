"""The official `openai` SDK against a live `loramux serve`."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.conftest import LiveServer
from tests.engine.peft_reference import load_base, save_random_adapter
from tests.platform.adapters.helpers import bearer, upload


def sdk(server: LiveServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0)


def test_chat_and_completions_streamed_and_not(live_server: LiveServer) -> None:
    _, key = live_server.make_tenant("sdk-user")
    client = sdk(live_server, key)
    model = client.models.list().data[0].id
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage is not None and chat.usage.completion_tokens == 8
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == chat.usage.total_tokens

    completion = client.completions.create(model=model, prompt="Once", max_tokens=6, temperature=0)
    pieces = client.completions.create(
        model=model, prompt="Once", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(p.choices[0].text for p in pieces) == completion.choices[0].text


def test_sdk_exceptions(live_server: LiveServer) -> None:
    tenant, key = live_server.make_tenant("limited", requests_per_minute=1)
    client = sdk(live_server, key)
    model = client.models.list().data[0].id
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="someone-elses-adapter", prompt="x", max_tokens=1)
    client.completions.create(model=model, prompt="x", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as limited:
        client.completions.create(model=model, prompt="x", max_tokens=1)
    retry_after = int(limited.value.response.headers["retry-after"])
    time.sleep(retry_after)
    client.completions.create(model=model, prompt="x", max_tokens=1)
    with live_server.admin() as admin:
        keys = admin.get(f"/admin/api/tenants/{tenant['id']}/keys").json()["data"]
        admin.delete(f"/admin/api/keys/{keys[0]['id']}").raise_for_status()
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_raw_http_wrong_key_is_401_in_openai_shape(live_server: LiveServer) -> None:
    response = httpx.get(
        f"{live_server.base_url}/v1/models",
        headers={"Authorization": "Bearer lmx_wrong-key-000000000000"},
    )
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_sdk_against_an_uploaded_adapter(live_server: LiveServer, tmp_path: Path) -> None:
    """Upload over HTTP, validation by the server's own worker, then the SDK on the adapter."""
    _, key = live_server.make_tenant("adapter-owner")
    _, other_key = live_server.make_tenant("adapter-stranger")
    model_dir = Path(live_server.env["LORAMUX_MODEL"])
    adapter_dir, _ = save_random_adapter(
        load_base(model_dir), tmp_path / "bot", seed=5, std=0.3, r=8, target_modules="all-linear"
    )
    with httpx.Client(base_url=live_server.base_url, timeout=30) as http:
        created = upload(http, key, "bot", adapter_dir)
        assert created.status_code in (200, 201), created.text
        deadline = time.monotonic() + 120
        while (status := http.get("/v1/adapters/bot", headers=bearer(key)).json())[
            "status"
        ] == "validating":
            assert time.monotonic() < deadline, "validation never finished"
            time.sleep(0.5)
    assert status["status"] == "ready", status

    client = sdk(live_server, key)
    models = {m.id: m for m in client.models.list().data}
    base = next(m.id for m in models.values() if m.id != "bot")
    assert models["bot"].parent == base  # type: ignore[attr-defined]
    messages = [{"role": "user", "content": "Hello"}]
    chat = client.chat.completions.create(
        model="bot",
        messages=messages,
        max_tokens=10,
        temperature=0,  # type: ignore[arg-type]
    )
    streamed = client.chat.completions.create(
        model="bot@1",
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == (
        chat.choices[0].message.content
    )
    plain = client.completions.create(model="bot", prompt="Once", max_tokens=10, temperature=0)
    pieces = client.completions.create(
        model="bot", prompt="Once", max_tokens=10, temperature=0, stream=True
    )
    assert "".join(p.choices[0].text for p in pieces) == plain.choices[0].text
    base_text = (
        client.completions.create(model=base, prompt="Once", max_tokens=10, temperature=0)
        .choices[0]
        .text
    )
    assert plain.choices[0].text != base_text  # the adapter really changed the output

    with pytest.raises(openai.NotFoundError):  # another tenant's adapter: as if it did not exist
        sdk(live_server, other_key).completions.create(model="bot", prompt="x", max_tokens=1)
