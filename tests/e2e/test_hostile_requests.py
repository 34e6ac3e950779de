"""Hostile requests against a live `loramux serve`: the official SDK, and a client that hangs up."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from tests.e2e.conftest import LiveServer


def sdk(server: LiveServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0)


def test_the_sdk_gets_400s_naming_the_param(live_server: LiveServer) -> None:
    _, key = live_server.make_tenant("hostile-sdk")
    client = sdk(live_server, key)
    model = client.models.list().data[0].id
    for kwargs, param in [
        ({"temperature": 1e-45}, "temperature"),
        ({"temperature": 5e-324}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"seed": 2**64}, "seed"),
        ({"prompt": [10**6]}, "prompt"),
        ({"prompt": ["x"] * 65}, "prompt"),
    ]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(**{"model": model, "prompt": "x", "max_tokens": 2, **kwargs})
        assert refused.value.param == param, (kwargs, refused.value.body)
    # the SDK cannot encode a lone surrogate; json.dumps escapes it as \ud800
    chat = {"model": model, "messages": [{"role": "user", "content": "\ud800"}]}
    surrogate = httpx.post(
        f"{live_server.base_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}", "content-type": "application/json"},
        content=json.dumps(chat),
    )
    assert surrogate.status_code == 400, surrogate.text
    assert httpx.get(f"{live_server.base_url}/metrics").status_code == 401
    with live_server.admin() as admin:
        assert "loramux:num_requests_running" in admin.get("/metrics").text


def _running(server: LiveServer) -> float:
    with server.admin() as admin:
        for line in admin.get("/metrics").text.splitlines():
            if line.startswith("loramux:num_requests_running "):
                return float(line.split()[-1])
    raise AssertionError("no loramux:num_requests_running in /metrics")


def test_a_dropped_request_logs_no_error_and_frees_its_slot(live_server: LiveServer) -> None:
    _, key = live_server.make_tenant("dropper", max_concurrent_requests=1)
    model = sdk(live_server, key).models.list().data[0].id
    body = json.dumps({"model": model, "prompt": "x", "max_tokens": 400, "temperature": 0})
    url = urlsplit(live_server.base_url)
    request = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {url.netloc}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()
    with socket.create_connection((url.hostname, url.port)) as conn:
        conn.sendall(request)
        for _ in range(500):  # hang up once its tokens are being decoded
            if _running(live_server):
                break
            time.sleep(0.01)
        else:
            raise AssertionError("the request never ran")

    # Its concurrency slot comes back once the server has seen the hang-up.
    follow_up = {"model": model, "prompt": "y", "max_tokens": 2}
    for _ in range(100):
        response = httpx.post(
            f"{live_server.base_url}/v1/completions",
            headers={"Authorization": f"Bearer {key}"},
            json=follow_up,
            timeout=30,
        )
        if response.status_code != 429:
            break
        time.sleep(0.1)
    assert response.status_code == 200, response.text
    assert _running(live_server) == 0
    log = live_server.log.read_text()
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]
    with live_server.admin() as admin:
        assert 'loramux:requests_total{status="cancelled"} 1.0' in admin.get("/metrics").text
