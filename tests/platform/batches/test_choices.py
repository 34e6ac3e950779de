"""A batch line's choices (prompts x n) count as the same request's online: the same
choices, the same cap per request, and the batch's bound on what it holds in the engine
counts choices (engine sequences), not lines."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from loramux.batches.runner import BatchRunner
from loramux.batches.worker import AdmitAll
from loramux.state import AppState
from tests.platform.adapters.helpers import assert_openai_error
from tests.platform.batches.conftest import bearer, request_line
from tests.platform.batches.test_runner import COMPLETION, model_of, output_lines, stable


def test_a_lines_choices_and_their_cap_equal_online(  # type: ignore[no-untyped-def]
    client, make_tenant, start_batch, run_batch, app_state
) -> None:
    _, key = make_tenant("acme")
    model = model_of(client, key)
    wide = {"model": model, **COMPLETION, "prompt": ["Once upon a time", "The sea"], "n": 2}
    too_wide = {**wide, "n": 3}  # 6 choices, over the cap of 4 set below
    cap = {"max_choices_per_request": 4}
    lines = [request_line("wide", wide), request_line("too-wide", too_wide)]
    batch_id = start_batch(key, lines)["id"]
    assert run_batch(batch_id, **cap) == "completed"
    done = client.get(f"/v1/batches/{batch_id}", headers=bearer(key)).json()
    assert done["request_counts"] == {"total": 2, "completed": 1, "failed": 1}

    app_state.settings = app_state.settings.model_copy(update=cap)
    [out] = output_lines(client, key, done["output_file_id"])
    online = client.post("/v1/completions", headers=bearer(key), json=wide).json()
    assert [c["index"] for c in out["response"]["body"]["choices"]] == [0, 1, 2, 3]
    assert stable(out["response"]["body"]) == stable(online)

    [refused] = output_lines(client, key, done["error_file_id"])
    online_refusal = client.post("/v1/completions", headers=bearer(key), json=too_wide)
    assert refused["response"]["status_code"] == 400
    assert refused["response"]["body"] == online_refusal.json()
    assert "6 choices" in assert_openai_error(online_refusal, 400)["message"]


class CountingEngine:
    """The real engine, counting the sequences (generate streams) it holds at once."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.running = 0
        self.peak = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def generate(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            async for output in self.inner.generate(*args, **kwargs):
                yield output
        finally:
            self.running -= 1


def run_counting(app_state: AppState, batch_id: str, max_in_flight: int) -> tuple[str, int]:
    """Run the batch on the counting engine: its final status and the most sequences held."""
    engine = CountingEngine(app_state.engine)
    settings = app_state.settings.model_copy(update={"batch_max_in_flight": max_in_flight})
    state = replace(app_state, settings=settings, limiter=AdmitAll(), engine=engine)
    status = asyncio.run(BatchRunner(state, batch_id, "counting-worker").run())
    assert engine.running == 0
    return status, engine.peak


def test_lines_in_flight_are_counted_in_choices(  # type: ignore[no-untyped-def]
    client, make_tenant, start_batch, app_state
) -> None:
    _, key = make_tenant("acme")
    body = {"model": model_of(client, key), **COMPLETION}
    three = [request_line(f"r{i}", {**body, "n": 3}) for i in range(6)]
    batch_id = start_batch(key, three)["id"]
    status, peak = run_counting(app_state, batch_id, max_in_flight=4)
    assert status == "completed"
    assert 3 <= peak <= 4  # one 3-choice line at a time fits in 4; two would not

    # A line wider than the whole budget is not refused (online takes it): it runs alone.
    ones = [request_line(f"a{i}", body) for i in range(3)]
    six = request_line("six", {**body, "n": 6})
    later = [request_line(f"b{i}", body) for i in range(3)]
    batch_id = start_batch(key, [*ones, six, *later])["id"]
    status, peak = run_counting(app_state, batch_id, max_in_flight=4)
    assert status == "completed" and peak == 6
    done = client.get(f"/v1/batches/{batch_id}", headers=bearer(key)).json()
    assert done["request_counts"] == {"total": 7, "completed": 7, "failed": 0}
