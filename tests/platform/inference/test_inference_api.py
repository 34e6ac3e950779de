"""Completions and chat over raw HTTP against a real engine on the tiny model."""

from __future__ import annotations

import json

from sqlalchemy import select

from loramux.db.models import UsageRecord
from loramux_engine.sampling_params import SamplingParams
from tests.platform.conftest import admin_headers


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def error_of(response, status: int) -> dict:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def sse_events(response) -> list:  # type: ignore[no-untyped-def]
    lines = [line for line in response.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    return [line[len("data: ") :] for line in lines]


def test_greedy_completion_equals_the_engines_own_output(client, engine, settings, make_tenant):  # type: ignore[no-untyped-def]
    _, key = make_tenant("acme")
    model = client.get("/v1/models", headers=bearer(key)).json()["data"][0]["id"]
    prompt = "Hello there, engine"
    response = client.post(
        "/v1/completions",
        headers=bearer(key),
        json={
            "model": model,
            "prompt": prompt,
            "max_tokens": 12,
            "temperature": 0,
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    tokenizer = engine.tokenizer
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    expected = engine.engine.engine.generate(
        [prompt_ids], SamplingParams(temperature=0, max_tokens=12)
    )[0]
    assert body["choices"][0]["text"] == expected.text
    assert body["usage"]["prompt_tokens"] == len(prompt_ids)
    assert body["usage"]["completion_tokens"] == len(expected.new_token_ids) == 12


def test_chat_streaming_with_usage(client, make_tenant, db) -> None:  # type: ignore[no-untyped-def]
    _, key = make_tenant("acme")
    model = client.get("/v1/models", headers=bearer(key)).json()["data"][0]["id"]
    request = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 8,
        "temperature": 0,
    }
    whole = client.post("/v1/chat/completions", headers=bearer(key), json=request).json()
    assert whole["object"] == "chat.completion"
    assert whole["choices"][0]["message"]["role"] == "assistant"
    streamed = client.post(
        "/v1/chat/completions",
        headers=bearer(key),
        json={**request, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = sse_events(streamed)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    with db() as session:
        records = session.scalars(select(UsageRecord).order_by(UsageRecord.id)).all()
        assert [r.status for r in records] == ["ok", "ok"]
        assert records[1].completion_tokens == whole["usage"]["completion_tokens"]
    usage = client.get("/v1/usage", headers=bearer(key)).json()["data"]
    assert usage[0]["num_requests"] == 2 and usage[0]["adapter"] is None
    assert usage[0]["total_tokens"] == 2 * whole["usage"]["total_tokens"]


def test_n_choices_and_logprobs(client, make_tenant) -> None:  # type: ignore[no-untyped-def]
    _, key = make_tenant("acme")
    model = client.get("/v1/models", headers=bearer(key)).json()["data"][0]["id"]
    body = client.post(
        "/v1/completions",
        headers=bearer(key),
        json={
            "model": model,
            "prompt": ["a", "b"],
            "n": 2,
            "max_tokens": 4,
            "logprobs": 2,
            "temperature": 0.8,
            "seed": 7,
        },
    ).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"])
    assert all(v <= 0 for v in lp["token_logprobs"])


def test_bad_inputs_are_clear_4xx(client, make_tenant, settings) -> None:  # type: ignore[no-untyped-def]
    _, key = make_tenant("acme")
    h = bearer(key)
    model = client.get("/v1/models", headers=h).json()["data"][0]["id"]
    ok = {"model": model, "prompt": "x", "max_tokens": 2}
    assert (
        error_of(client.post("/v1/completions", headers=h, json={**ok, "model": "nope"}), 404)[
            "code"
        ]
        == "model_not_found"
    )
    for name, value in [
        ("temperature", 3),
        ("top_p", -1),
        ("max_tokens", 0),
        ("n", 99),
        ("max_tokens", "ten"),
        ("stop", [1]),
        ("logprobs", 9),
        ("echo", True),
    ]:
        error = error_of(client.post("/v1/completions", headers=h, json={**ok, name: value}), 400)
        assert error["param"] == name, (name, error)
    assert (
        error_of(client.post("/v1/completions", headers=h, json={**ok, "prompt": 5}), 400)["param"]
        == "prompt"
    )
    assert error_of(
        client.post(
            "/v1/chat/completions", headers=h, json={"model": model, "messages": [{"role": "x"}]}
        ),
        400,
    )
    long_prompt = "word " * 400
    error = error_of(
        client.post("/v1/completions", headers=h, json={**ok, "prompt": long_prompt}), 400
    )
    assert error["code"] == "context_length_exceeded"
    assert error_of(client.post("/v1/completions", headers=h, content=b"{"), 400)
    big = {**ok, "prompt": "x" * (settings.max_body_bytes + 1)}
    assert error_of(client.post("/v1/completions", headers=h, json=big), 413)


def test_rate_limit_and_monthly_quota(client, make_tenant) -> None:  # type: ignore[no-untyped-def]
    tenant, key = make_tenant("acme", requests_per_minute=2)
    h = bearer(key)
    model = client.get("/v1/models", headers=h).json()["data"][0]["id"]
    ok = {"model": model, "prompt": "x", "max_tokens": 2, "temperature": 0}
    first = client.post("/v1/completions", headers=h, json=ok)
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    client.post("/v1/completions", headers=h, json=ok).raise_for_status()
    limited = client.post("/v1/completions", headers=h, json=ok)
    assert error_of(limited, 429)["type"] == "rate_limit_error"
    assert int(limited.headers["retry-after"]) >= 1
    client.patch(
        f"/admin/api/tenants/{tenant['id']}",
        headers=admin_headers(),
        json={"requests_per_minute": None, "monthly_token_quota": 1},
    ).raise_for_status()
    assert (
        error_of(client.post("/v1/completions", headers=h, json=ok), 429)["code"]
        == "insufficient_quota"
    )


def test_metrics_are_exposed_in_prometheus_format(client, make_tenant) -> None:  # type: ignore[no-untyped-def]
    _, key = make_tenant("acme")
    model = client.get("/v1/models", headers=bearer(key)).json()["data"][0]["id"]
    client.post(
        "/v1/completions",
        headers=bearer(key),
        json={"model": model, "prompt": "x", "max_tokens": 3},
    ).raise_for_status()
    text = client.get("/metrics", headers=admin_headers()).text
    assert 'loramux:requests_total{status="ok"} 1.0' in text
    assert "loramux:time_to_first_token_seconds_count 1.0" in text
    assert "loramux:num_requests_running 0.0" in text
    generated = [
        line for line in text.splitlines() if line.startswith("loramux:generation_tokens_total")
    ]
    assert generated and float(generated[0].split()[-1]) >= 3


def _metric(text: str, name: str) -> float:
    (line,) = [line for line in text.splitlines() if line.startswith(name + " ")]
    return float(line.split()[-1])


def test_paged_kv_and_prefix_cache_metrics(client, make_tenant) -> None:  # type: ignore[no-untyped-def]
    _, key = make_tenant("acme")
    model = client.get("/v1/models", headers=bearer(key)).json()["data"][0]["id"]
    body = {"model": model, "prompt": "shared prompt " * 3, "max_tokens": 2}
    for _ in range(2):  # the second one finds the first one's full blocks
        client.post("/v1/completions", headers=bearer(key), json=body).raise_for_status()
    text = client.get("/metrics", headers=admin_headers()).text
    assert _metric(text, "loramux:kv_cache_blocks_total") > 0
    assert _metric(text, "loramux:kv_cache_blocks_used") == 0  # every block came back
    queries = _metric(text, "loramux:prefix_cache_queries_total")
    hits = _metric(text, "loramux:prefix_cache_hits_total")
    assert queries > hits >= 16
    assert _metric(text, "loramux:num_preemptions_total") == 0
