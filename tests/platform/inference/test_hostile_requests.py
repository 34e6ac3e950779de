"""Hostile inference requests get a clear 4xx in OpenAI's shape, never a 500.

Each test sends what a hostile or careless client sends, over raw HTTP (so booleans,
NaN, huge integers and lone surrogates reach the server exactly as written), to the app
on the tiny model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from sqlalchemy import select
from starlette.testclient import TestClient

from loramux.app import build_state, create_app
from loramux.db.models import UsageRecord
from loramux.errors import InvalidRequest
from loramux.inference.request import parse_completion
from loramux.settings import Settings
from tests.platform.conftest import admin_headers
from tests.platform.inference.test_inference_api import bearer, error_of, sse_events

OpenClient = Callable[..., Any]


@pytest.fixture
def open_client(settings: Settings, engine: Any) -> Iterator[OpenClient]:
    """``open_client(engine=None, **settings)``: an app on changed settings or engine."""
    with ExitStack() as stack:

        def open_(engine_client: Any = None, **overrides: Any) -> TestClient:
            changed = settings.model_copy(update=overrides)
            app_state = build_state(changed, engine=engine_client or engine)
            return stack.enter_context(TestClient(create_app(changed, app_state=app_state)))

        yield open_


def post_raw(client: TestClient, path: str, key: str, body: str | bytes) -> Any:
    """POST a body exactly as written: no client-side JSON encoding to clean it up."""
    return client.post(
        path,
        headers={**bearer(key), "content-type": "application/json"},
        content=body.encode() if isinstance(body, str) else body,
    )


def base_model(client: TestClient, key: str) -> str:
    model: str = client.get("/v1/models", headers=bearer(key)).json()["data"][0]["id"]
    return model


def strict_json(text: str) -> Any:
    def refuse(name: str) -> Any:
        raise AssertionError(f"{name} in a response")

    return json.loads(text, parse_constant=refuse)


# (param, the value as JSON text)
BAD_SAMPLING = [
    ("temperature", "1e-45"),
    ("temperature", "5e-324"),
    ("temperature", "1e308"),
    ("temperature", "-0.0001"),
    ("temperature", "2.0001"),
    ("temperature", "true"),
    ("temperature", '"1"'),
    ("temperature", "NaN"),
    ("temperature", "Infinity"),
    ("temperature", "1e999"),
    ("top_p", "0"),
    ("top_p", "0.0"),
    ("top_p", "5e-324"),
    ("top_p", "1e-45"),
    ("top_p", "1.5"),
    ("top_p", "false"),
    ("top_p", "-Infinity"),
    ("seed", str(2**63)),
    ("seed", str(2**64)),
    ("seed", "-1"),
    ("seed", "true"),
    ("seed", "1.5"),
    ("seed", "1" + "0" * 30),
    ("seed", "9" * 5000),
    ("max_tokens", "9" * 5000),
    ("max_tokens", "1e308"),
    ("max_tokens", "true"),
    ("n", "true"),
    ("top_k", "true"),
    ("logprobs", "true"),
    ("presence_penalty", "false"),
    ("frequency_penalty", "true"),
    ("best_of", "true"),
    ("speculative", '"yes"'),
    ("speculative", "1"),
    ("speculative", "[]"),
]


def test_sampling_values_out_of_range_are_400_with_param(client, make_tenant) -> None:  # type: ignore[no-untyped-def]
    _, key = make_tenant("acme")
    model = base_model(client, key)
    for name, value in BAD_SAMPLING:
        body = f'{{"model": "{model}", "prompt": "x", "max_tokens": 2, "{name}": {value}}}'
        error = error_of(post_raw(client, "/v1/completions", key, body), 400)
        assert error["param"] == name, (name, value, error)
        assert error["type"] == "invalid_request_error"


def test_sampling_values_at_the_edges_are_served(client, make_tenant) -> None:  # type: ignore[no-untyped-def]
    _, key = make_tenant("acme")
    model = base_model(client, key)
    for extra in [
        {"temperature": 0},
        {"temperature": 2},
        {"temperature": 1e-5},
        {"top_p": 1e-6},
        {"top_p": 1},
        {"seed": 0},
        {"speculative": True},
        {"speculative": False},
        {"speculative": None},
        # choice i draws with seed + i, which must wrap below 2**63
        {"seed": 2**63 - 1, "n": 3, "temperature": 0.8},
    ]:
        body = {"model": model, "prompt": "x", "max_tokens": 2, **extra}
        response = client.post("/v1/completions", headers=bearer(key), json=body)
        assert response.status_code == 200, (extra, response.text)


def test_out_of_bounds_json_bodies_are_400(client, make_tenant) -> None:  # type: ignore[no-untyped-def]
    _, key = make_tenant("acme")
    model = base_model(client, key)
    deep = "[" * 100_000 + "]" * 100_000
    for path, body in [
        ("/v1/completions", f'{{"model": "{model}", "prompt": {deep}}}'),
        ("/v1/completions", deep),
        ("/v1/chat/completions", f'{{"model": "{model}", "messages": {deep}}}'),
        ("/v1/completions", f'{{"model": "{model}", "prompt": [1, {"7" * 4301}]}}'),
        ("/v1/completions", '{"model": "m", "prompt": "x"'),
        ("/v1/completions", b'{"model": "\xff\xfe"}'),
    ]:
        error_of(post_raw(client, path, key, body), 400)
    # every JSON route reads its body the same way
    huge = f'{{"name": "t", "requests_per_minute": {"9" * 5000}}}'
    response = client.post(
        "/admin/api/tenants",
        headers={**admin_headers(), "content-type": "application/json"},
        content=huge.encode(),
    )
    assert error_of(response, 400)["param"] == "requests_per_minute"


def test_lone_surrogates_are_400(client, make_tenant, settings, engine) -> None:  # type: ignore[no-untyped-def]
    _, key = make_tenant("acme")
    model = base_model(client, key)
    for path, body in [
        ("/v1/completions", f'{{"model": "{model}", "prompt": "\\ud800"}}'),
        ("/v1/completions", f'{{"model": "{model}", "prompt": ["ok", "a\\udfffb"]}}'),
        ("/v1/completions", f'{{"model": "{model}", "prompt": "x", "stop": "\\udc00"}}'),
        (
            "/v1/chat/completions",
            f'{{"model": "{model}", "messages": [{{"role": "user", "content": "\\ud83d"}}]}}',
        ),
        (
            "/v1/chat/completions",
            f'{{"model": "{model}", "messages": [{{"role": "user", '
            f'"content": [{{"type": "text", "text": "\\udbff"}}]}}]}}',
        ),
    ]:
        error_of(post_raw(client, path, key, body), 400)
    # a surrogate pair is one valid character
    pair = f'{{"model": "{model}", "prompt": "\\ud83d\\ude00", "max_tokens": 2}}'
    assert post_raw(client, "/v1/completions", key, pair).status_code == 200
    # Bodies parsed elsewhere (a batch line) reach the parser as Python strings.
    with pytest.raises(InvalidRequest) as refused:
        parse_completion({"model": model, "prompt": "a\ud800"}, settings, engine.tokenizer)
    assert refused.value.param == "prompt"


def test_token_ids_outside_the_vocabulary_are_400(client, make_tenant, engine) -> None:  # type: ignore[no-untyped-def]
    _, key = make_tenant("acme")
    model = base_model(client, key)
    vocab_size = len(engine.tokenizer)
    for prompt in [
        [vocab_size],
        [1, 2, 10**9],
        [[5, 6], [7, vocab_size + 5]],
        [-1],
        [[3], [-7]],
        [True, 5],
        [[]],
        [],
    ]:
        body = {"model": model, "prompt": prompt, "max_tokens": 2}
        response = client.post("/v1/completions", headers=bearer(key), json=body)
        assert error_of(response, 400)["param"] == "prompt", prompt
    body = {"model": model, "prompt": [vocab_size - 1, 0], "max_tokens": 2}
    assert client.post("/v1/completions", headers=bearer(key), json=body).status_code == 200


def test_prompts_times_n_is_capped(open_client, make_tenant) -> None:  # type: ignore[no-untyped-def]
    _, key = make_tenant("acme")
    client = open_client()
    model = base_model(client, key)
    h = bearer(key)
    flood = {"model": model, "prompt": ["a"] * 500, "n": 8, "max_tokens": 1}
    error = error_of(client.post("/v1/completions", headers=h, json=flood), 400)
    assert error["param"] == "prompt" and "4000 choices" in error["message"]
    over = {"model": model, "prompt": [[65]] * 9, "n": 8, "max_tokens": 1}
    assert error_of(client.post("/v1/completions", headers=h, json=over), 400)["param"] == "prompt"

    small = open_client(max_choices_per_request=4)
    ok = {"model": model, "prompt": ["a", "b"], "n": 2, "max_tokens": 1}
    assert len(small.post("/v1/completions", headers=h, json=ok).json()["choices"]) == 4
    three = {**ok, "n": 3}
    assert error_of(small.post("/v1/completions", headers=h, json=three), 400)["param"] == "prompt"
    one = {"model": model, "prompt": "a", "n": 5, "max_tokens": 1}
    assert error_of(small.post("/v1/completions", headers=h, json=one), 400)["param"] == "n"
    chat = {"model": model, "messages": [{"role": "user", "content": "a"}], "n": 5}
    assert error_of(small.post("/v1/chat/completions", headers=h, json=chat), 400)["param"] == "n"


def test_each_choice_counts_against_max_concurrent_requests(client, make_tenant) -> None:  # type: ignore[no-untyped-def]
    _, key = make_tenant("acme", max_concurrent_requests=4)
    model = base_model(client, key)
    h = bearer(key)
    eight = {"model": model, "prompt": "x", "n": 8, "max_tokens": 1}
    refused = client.post("/v1/completions", headers=h, json=eight)
    assert error_of(refused, 429)["code"] == "concurrency_exceeds_limit"
    # four units, taken and given back each time
    for body in [
        {**eight, "n": 4},
        {"model": model, "prompt": ["x", "y"], "n": 2, "max_tokens": 1},
        {**eight, "n": 4, "stream": True},
    ]:
        assert client.post("/v1/completions", headers=h, json=body).status_code == 200, body


def test_monthly_quota_is_reserved_not_just_checked(client, make_tenant, db) -> None:  # type: ignore[no-untyped-def]
    tenant, key = make_tenant("acme", monthly_token_quota=32)
    model = base_model(client, key)
    h = bearer(key)
    greedy = {"model": model, "prompt": "x", "temperature": 0}  # "x" is one token

    # 1 + 64 tokens may be used: more than the 32 left, refused before any work
    over = client.post("/v1/completions", headers=h, json={**greedy, "max_tokens": 64})
    error = error_of(over, 429)
    assert error["type"] == error["code"] == "insufficient_quota"
    assert "32 are left" in error["message"]
    # the default max_tokens (256) does not fit either
    assert error_of(client.post("/v1/completions", headers=h, json=greedy), 429)
    # n multiplies the reservation: 3 x (1 + 10) = 33
    three = {**greedy, "max_tokens": 10, "n": 3}
    assert error_of(client.post("/v1/completions", headers=h, json=three), 429)

    first = client.post("/v1/completions", headers=h, json={**greedy, "max_tokens": 8})
    assert first.status_code == 200, first.text
    left = 32 - first.json()["usage"]["total_tokens"]
    refused = client.post("/v1/completions", headers=h, json={**greedy, "max_tokens": left})
    assert error_of(refused, 429)["code"] == "insufficient_quota"
    last = client.post("/v1/completions", headers=h, json={**greedy, "max_tokens": left - 1})
    assert last.status_code == 200, last.text
    with db() as session:
        records = session.scalars(
            select(UsageRecord).where(UsageRecord.tenant_id == tenant["id"])
        ).all()
    assert sum(r.prompt_tokens + r.completion_tokens for r in records) <= 32


def test_upload_cap_is_for_multipart_uploads_only(open_client, make_tenant) -> None:  # type: ignore[no-untyped-def]
    _, key = make_tenant("acme")
    client = open_client(max_body_bytes=64 * 1024)
    json_headers = {**bearer(key), "content-type": "application/json"}
    big_json = json.dumps({"name": "a", "padding": "x" * 100_000}).encode()
    for path in ["/v1/adapters/uploads", "/v1/adapters", "/v1/files", "/v1/batches"]:
        response = client.post(path, headers=json_headers, content=big_json)
        assert error_of(response, 413)["code"] == "payload_too_large", path

    def chunks() -> Iterator[bytes]:  # no Content-Length: the bytes are counted as they come
        yield b'{"name": "a", "padding": "'
        for _ in range(20):
            yield b"x" * 8192
        yield b'"}'

    streamed = client.post("/v1/adapters/uploads", headers=json_headers, content=chunks())
    assert error_of(streamed, 413)["code"] == "payload_too_large"
    absurd = {**json_headers, "content-length": "9" * 5000}
    response = client.post("/v1/adapters/uploads", headers=absurd, content=b"{}")
    assert error_of(response, 413)["code"] == "payload_too_large"
    # a multipart upload over the JSON cap is still read: the route answers, not the cap
    multipart = client.post(
        "/v1/adapters",
        headers=bearer(key),
        data={"name": "big"},
        files={"weights": ("adapter_model.safetensors", b"\0" * 100_000)},
    )
    assert multipart.status_code != 413 and error_of(multipart, 400)["param"] == "config"


def test_metrics_need_the_admin_key_unless_opened(open_client, make_tenant) -> None:  # type: ignore[no-untyped-def]
    _, key = make_tenant("acme")
    client = open_client()
    assert error_of(client.get("/metrics"), 401)["code"] == "missing_api_key"
    assert error_of(client.get("/metrics", headers=bearer(key)), 403)
    scraped = client.get("/metrics", headers=admin_headers())
    assert scraped.status_code == 200 and "loramux:num_requests_running" in scraped.text

    opened = open_client(metrics_auth="none")
    assert "loramux:num_requests_running" in opened.get("/metrics").text


class NonFiniteLogprobs:
    """The engine, with every logprob it reports made NaN and every alternative -inf."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    async def generate(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        async for out in self.engine.generate(*args, **kwargs):
            num = len(out.new_token_ids)
            yield dataclasses.replace(
                out,
                logprobs=[math.nan] * num,
                top_logprobs=[{t: -math.inf, 0: math.inf} for t in out.new_token_ids],
            )


def test_non_finite_logprobs_never_reach_json(open_client, make_tenant, engine) -> None:  # type: ignore[no-untyped-def]
    _, key = make_tenant("acme")
    client = open_client(NonFiniteLogprobs(engine))
    model = base_model(client, key)
    h = bearer(key)
    chat = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "logprobs": True,
        "top_logprobs": 2,
    }
    whole = client.post("/v1/chat/completions", headers=h, json=chat)
    assert whole.status_code == 200, whole.text
    content = strict_json(whole.text)["choices"][0]["logprobs"]["content"]
    assert content and all(item["logprob"] == -9999.0 for item in content)
    assert all(top["logprob"] == -9999.0 for item in content for top in item["top_logprobs"])

    completion = {"model": model, "prompt": "hi", "max_tokens": 3, "logprobs": 2, "stream": True}
    streamed = client.post("/v1/completions", headers=h, json=completion)
    events = sse_events(streamed)
    assert events[-1] == "[DONE]"
    chunks = [strict_json(e) for e in events[:-1]]
    logprobs = [v for c in chunks for v in c["choices"][0]["logprobs"]["token_logprobs"]]
    assert logprobs and all(v == -9999.0 for v in logprobs)


def test_a_dropped_request_logs_no_error_and_frees_its_work(  # type: ignore[no-untyped-def]
    open_client, make_tenant, engine, db, caplog
) -> None:
    tenant, key = make_tenant("acme", max_concurrent_requests=1)
    client = open_client()
    model = base_model(client, key)
    max_tokens = 200  # greedy from "x" the tiny model runs to max_tokens
    body = json.dumps({"model": model, "prompt": "x", "max_tokens": max_tokens, "temperature": 0})
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"testserver"),
            (b"authorization", f"Bearer {key}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    sent: list[dict[str, Any]] = []

    async def drop_mid_generation() -> None:
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body.encode(), "more_body": False}
            for _ in range(10_000):  # the client hangs up once its tokens are being decoded
                if engine.stats().num_running:
                    return {"type": "http.disconnect"}
                await asyncio.sleep(0.001)
            raise AssertionError("the request never ran")

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await client.app(scope, receive, send)

    with caplog.at_level(logging.ERROR):
        client.portal.call(drop_mid_generation)  # type: ignore[union-attr]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text

    # its one concurrency unit is back, and the engine holds nothing of it
    after = {"model": model, "prompt": "y", "max_tokens": 2}
    assert client.post("/v1/completions", headers=bearer(key), json=after).status_code == 200
    assert not engine.engine.engine.has_unfinished()
    with db() as session:
        dropped = session.scalars(
            select(UsageRecord)
            .where(UsageRecord.tenant_id == tenant["id"])
            .order_by(UsageRecord.created_at)
        ).first()
    assert dropped is not None and dropped.status == "cancelled"
    assert dropped.completion_tokens < max_tokens
