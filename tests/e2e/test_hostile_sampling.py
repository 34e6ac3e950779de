"""Extreme finite sampling floats from one tenant never reach another tenant's stream.

Before step isolation, ``temperature`` 1e-45 overflowed ``logits / T`` in the shared step,
``multinomial`` raised, and the engine failed every request in flight, of every tenant.
Here an attacker sends such floats through both OpenAI routes, streamed and not, while a
victim tenant streams a greedy completion: every attack is refused with a 400 or served
as the attacker's own request, never a 500, and the victim's tokens equal its tokens alone.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import LiveServer
from tests.e2e.victim import Victim

EXTREMES: list[dict[str, float]] = [
    {"temperature": 1e-45},
    {"temperature": 1e-300},
    {"temperature": 5e-324},
    {"temperature": 1.7e308},
    {"top_p": 1e-300},
    {"top_p": 5e-324},
    {"top_p": 1.7e308},
    {"temperature": 1e-45, "top_p": 5e-324},
    # At the platform's bounds, so that the engine's sampler sees them too.
    {"temperature": 1e-5},
    {"top_p": 1e-6},
    {"temperature": 2.0, "top_p": 1e-6},
]
ROUTES = ["/v1/completions", "/v1/chat/completions"]


def _body(route: str, stream: bool, extreme: dict[str, float]) -> dict[str, Any]:
    body: dict[str, Any] = {"max_tokens": 6, "stream": stream, **extreme}
    if route == "/v1/completions":
        return {**body, "prompt": "An attacker's prompt", "logprobs": 2}
    return {
        **body,
        "messages": [{"role": "user", "content": "An attacker's message"}],
        "logprobs": True,
        "top_logprobs": 2,
    }


def _assert_openai_400(response: httpx.Response) -> None:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]


def _attack(victim: Victim, key: str, route: str, stream: bool, extreme: dict[str, float]) -> str:
    """One attack: "refused" (400), "served", or "failed alone" (an in-band 4xx-type error)."""
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": victim.model, **_body(route, stream, extreme)}  # the base model
    url = f"{victim.server.base_url}{route}"
    if not stream:
        response = httpx.post(url, json=body, headers=headers, timeout=120)
        assert response.status_code in (200, 400), (route, extreme, response.text)
        if response.status_code == 400:
            _assert_openai_400(response)
            return "refused"
        choices = response.json()["choices"]
        assert choices and all(c["finish_reason"] in ("length", "stop") for c in choices)
        return "served"
    with httpx.stream("POST", url, json=body, headers=headers, timeout=120) as response:
        assert response.status_code in (200, 400), (route, extreme, response.read())
        if response.status_code == 400:
            response.read()
            _assert_openai_400(response)
            return "refused"
        events = [
            line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")
        ]
    for event in events:
        if event == "[DONE]":
            return "served"
        chunk = json.loads(event)  # a NaN or an Infinity would not parse
        if "error" in chunk:  # in-band: the attacker's own request failed, never the server
            assert chunk["error"]["type"] == "invalid_request_error", (route, extreme, chunk)
            return "failed alone"
    raise AssertionError(f"{route} {extreme}: the stream ended without [DONE] or an error")


@pytest.fixture(scope="module")
def keys(live_server: LiveServer) -> tuple[str, str]:
    _, victim_key = live_server.make_tenant("hostile-sampling-victim")
    _, attacker_key = live_server.make_tenant("hostile-sampling-attacker")
    return victim_key, attacker_key


def test_extreme_sampling_floats_are_confined_to_the_attacker(
    live_server: LiveServer, keys: tuple[str, str]
) -> None:
    victim_key, attacker_key = keys
    victim = Victim(live_server, victim_key, max_tokens=96)
    alone = victim.alone()
    attacks = [
        (route, stream, extreme)
        for route in ROUTES
        for stream in (False, True)
        for extreme in EXTREMES
    ]
    with victim.beside() as got, ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda attack: _attack(victim, attacker_key, *attack), attacks))
    assert got[0] == alone
    assert "served" in outcomes  # some attacks reached the engine's sampler
    # The engine still serves both tenants afterwards.
    assert victim.alone() == alone
    assert _attack(victim, attacker_key, ROUTES[0], True, {"temperature": 0.0}) == "served"
