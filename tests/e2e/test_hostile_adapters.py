"""Adapters with huge finite values, uploaded to a live server beside another tenant's stream.

Each must end ``rejected`` (before, they were ``ready`` and overflowed in the engine's
slot pool); requests naming them get a clean 400 in OpenAI's shape; and the victim's
streamed tokens beside the attack equal its tokens alone.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.e2e.conftest import LiveServer
from tests.e2e.victim import Victim
from tests.engine.peft_reference import load_base, save_random_adapter
from tests.platform.adapters.helpers import assert_openai_error, bearer, upload, wait_validated
from tests.platform.adapters.hostile_values import hostile_adapters


def test_hostile_adapters_are_rejected_and_the_victim_is_untouched(
    live_server: LiveServer, tmp_path: Path
) -> None:
    _, attacker = live_server.make_tenant("hostile-values-attacker")
    _, victim_key = live_server.make_tenant("hostile-values-victim")
    model_dir = Path(live_server.env["LORAMUX_MODEL"])
    adapter_dir, _ = save_random_adapter(
        load_base(model_dir), tmp_path / "a", seed=7, std=0.3, target_modules=["q_proj", "v_proj"]
    )
    hostile = hostile_adapters(adapter_dir)
    victim = Victim(live_server, victim_key)
    alone = victim.alone()

    with (
        httpx.Client(base_url=live_server.base_url, timeout=30) as http,
        victim.beside() as beside,
    ):
        for name, adapter in hostile.items():
            response = upload(http, attacker, name, config=adapter.config, weights=adapter.weights)
            assert response.status_code == 201, response.text
        for name, adapter in hostile.items():
            shown = wait_validated(http, attacker, name)
            assert shown["status"] == "rejected", (name, shown)
            assert adapter.reason in shown["reason"], (name, shown["reason"])
        for name in hostile:
            for route, body in (
                ("/v1/completions", {"prompt": "Hi", "max_tokens": 4}),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
            ):
                for stream in (False, True):
                    response = http.post(
                        route,
                        json={"model": name, "stream": stream, **body},
                        headers=bearer(attacker),
                    )
                    error = assert_openai_error(response, 400, "model_rejected")
                    assert error["param"] == "model" and "rejected" in error["message"]
    assert beside == [alone]
