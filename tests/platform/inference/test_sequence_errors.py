"""A request the engine failed alone gets a clear error of its own: never a 500, never others'.

The engine's sampler is patched so that rows with a marked seed get NaN logits, as a
hostile adapter's overflow would give them (uploads refuse such weights, so the patch
stands in), or raise, as a step that fails for that sequence alone does.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from starlette.testclient import TestClient

from loramux_engine.engine import model_runner
from loramux_engine.layers.sampler import SampledToken
from loramux_engine.sampling_params import SamplingParams

NAN_SEED = 4242
RAISE_SEED = 4243


@pytest.fixture
def hostile_sampler(monkeypatch: pytest.MonkeyPatch) -> None:
    real_sample = model_runner.sample

    def sample(
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        drafts: list[list[int]] | None = None,
    ) -> list[SampledToken]:
        if any(p.seed == RAISE_SEED for p in params):
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        # The marked rows' logits become NaN, as a hostile adapter's overflow makes them
        # (a request verifying speculative drafts has a row per draft, plus one).
        logits = logits.clone()
        row = 0
        for i, p in enumerate(params):
            num_rows = 1 + len(drafts[i]) if drafts is not None else 1
            if p.seed == NAN_SEED:
                logits[row : row + num_rows] = float("nan")
            row += num_rows
        return real_sample(logits, params, generators, drafts)

    monkeypatch.setattr(model_runner, "sample", sample)


def _headers_and_model(
    client: TestClient, make_tenant: Any, name: str
) -> tuple[dict[str, str], str]:
    _, key = make_tenant(name)
    headers = {"Authorization": f"Bearer {key}"}
    return headers, client.get("/v1/models", headers=headers).json()["data"][0]["id"]


def test_non_finite_logits_answer_400_and_others_are_served(  # type: ignore[no-untyped-def]
    client, make_tenant, hostile_sampler
) -> None:
    headers, model = _headers_and_model(client, make_tenant, "attacker")
    body = {"model": model, "prompt": "hi", "max_tokens": 4, "temperature": 0.7}
    response = client.post("/v1/completions", headers=headers, json={**body, "seed": NAN_SEED})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "non_finite_logits"
    assert "not finite" in error["message"]
    served = client.post("/v1/completions", headers=headers, json={**body, "seed": 1})
    assert served.status_code == 200 and served.json()["choices"][0]["finish_reason"] == "length"


def test_non_finite_logits_in_a_stream_are_an_in_band_request_error(  # type: ignore[no-untyped-def]
    client, make_tenant, hostile_sampler
) -> None:
    headers, model = _headers_and_model(client, make_tenant, "streamer")
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "temperature": 0.7,
        "seed": NAN_SEED,
        "stream": True,
    }
    with client.stream("POST", "/v1/chat/completions", headers=headers, json=body) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    errors = [json.loads(e)["error"] for e in events if e != "[DONE]" and "error" in json.loads(e)]
    assert [e["code"] for e in errors] == ["non_finite_logits"]
    assert errors[0]["type"] == "invalid_request_error"


def test_a_step_failing_for_one_request_answers_503_not_500(  # type: ignore[no-untyped-def]
    client, make_tenant, hostile_sampler
) -> None:
    headers, model = _headers_and_model(client, make_tenant, "unlucky")
    body = {"model": model, "prompt": "hi", "max_tokens": 4, "temperature": 0.7}
    response = client.post("/v1/completions", headers=headers, json={**body, "seed": RAISE_SEED})
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "engine_error"
    assert client.post("/v1/completions", headers=headers, json=body).status_code == 200
