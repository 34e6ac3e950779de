"""Catastrophic module name patterns uploaded to a live server beside another tenant's stream.

Before, a pattern went to ``re`` in the validation worker and in the engine's loader,
holding the GIL while it backtracked: one froze ``/healthz`` for seconds. Now each config
is resolved at upload by the bounded matcher: refused at once (400, nothing stored), or
resolved to its modules in bounded work. ``/healthz`` answers throughout, and the victim's
streamed tokens beside the attack equal its tokens alone.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.conftest import LiveServer
from tests.e2e.victim import Victim
from tests.engine.peft_reference import load_base, save_random_adapter
from tests.platform.adapters.helpers import (
    CONFIG,
    WEIGHTS,
    assert_openai_error,
    bearer,
    upload,
    wait_validated,
)

# Nested stars: re backtracks exponentially on any module name they do not match.
NESTED = "((.*)*)*"
EVIL = "(" * 10 + "a*" + ")*" * 10 + "$"

REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "target-lookahead": ({"target_modules": NESTED + "(?=q)q_proj"}, "is refused"),
    "target-nothing": ({"target_modules": EVIL}, "match none of the base model's projections"),
    "exclude-backref": ({"exclude_modules": r"(.*)*(\w)\2_proj"}, "is not supported"),
    "rank-flags": ({"rank_pattern": {"(?s)" + NESTED + "q_proj": 2}}, "rank_pattern key"),
    "alpha-possessive": ({"alpha_pattern": {NESTED + "+v_proj": 2}}, "possessive"),
    "layers-pattern": (
        {"layers_to_transform": [0], "layers_pattern": "(la|l|a)*yers$"},
        "layers_pattern must name",
    ),
    "too-much-work": (
        {"rank_pattern": {f".*z.*{NESTED}|{i}": 2 for i in range(400)}},
        "take too much work",
    ),
    "dora": ({"use_dora": True}, "DoRA (use_dora) is not supported"),
}


class HealthPoller:
    """Polls /healthz until stopped; every answer is recorded (a hang would time out)."""

    def __init__(self, server: LiveServer) -> None:
        self.server = server
        self.statuses: list[int] = []
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run)

    def run(self) -> None:
        with httpx.Client(base_url=self.server.base_url, timeout=30) as http:
            while not self.stop.is_set():
                try:
                    self.statuses.append(http.get("/healthz").status_code)
                except httpx.HTTPError as error:
                    self.errors.append(error)
                time.sleep(0.05)


def test_hostile_patterns_are_refused_at_once_and_nobody_else_notices(
    live_server: LiveServer, tmp_path: Path
) -> None:
    _, attacker = live_server.make_tenant("hostile-patterns-attacker")
    _, victim_key = live_server.make_tenant("hostile-patterns-victim")
    model_dir = Path(live_server.env["LORAMUX_MODEL"])
    adapter_dir, _ = save_random_adapter(
        load_base(model_dir), tmp_path / "a", seed=5, std=0.1, target_modules=["q_proj", "v_proj"]
    )
    config = json.loads((adapter_dir / CONFIG).read_bytes())
    weights = (adapter_dir / WEIGHTS).read_bytes()
    victim = Victim(live_server, victim_key)
    alone = victim.alone()
    health = HealthPoller(live_server)
    health.thread.start()
    try:
        with (
            httpx.Client(base_url=live_server.base_url, timeout=30) as http,
            victim.beside() as beside,
        ):
            for name, (changes, needle) in REFUSED.items():
                hostile = json.dumps(config | changes).encode()
                response = upload(http, attacker, name, config=hostile, weights=weights)
                error = assert_openai_error(response, 400, "invalid_adapter")
                assert needle in error["message"], (name, error)
            # Valid, and catastrophic for re on every name it does not match: resolved at
            # upload to the four layers' q_proj and v_proj, then served.
            nested = json.dumps(config | {"target_modules": NESTED + r"\.(q|v)_proj"}).encode()
            response = upload(http, attacker, "nested", config=nested, weights=weights)
            assert response.status_code == 201, response.text
            assert response.json()["target_modules"] == [
                f"model.layers.{layer}.self_attn.{projection}"
                for layer in range(4)
                for projection in ("q_proj", "v_proj")
            ]
            assert wait_validated(http, attacker, "nested")["status"] == "ready"
            completion = http.post(
                "/v1/completions",
                json={"model": "nested", "prompt": "Hi", "max_tokens": 4},
                headers=bearer(attacker),
            )
            assert completion.status_code == 200, completion.text
            listed = http.get("/v1/adapters", headers=bearer(attacker)).json()["data"]
            assert [adapter["name"] for adapter in listed] == ["nested"]  # nothing else stored
    finally:
        health.stop.set()
        health.thread.join()
    assert beside == [alone]
    assert health.errors == [] and health.statuses and set(health.statuses) == {200}
