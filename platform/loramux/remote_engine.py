"""``EngineClient`` for a process that does not hold the engine (a Celery worker).

It calls the serving process's internal engine routes (``loramux.api.engine``) with an
admin key, so batch work runs through the same engine as interactive traffic.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from loramux import telemetry
from loramux.engine_client import INTERACTIVE_PRIORITY
from loramux_engine.lora.ref import AdapterRef
from loramux_engine.outputs import EngineStats, RequestOutput
from loramux_engine.sampling_params import SamplingParams


class RemoteEngineError(RuntimeError):
    pass


class RemoteEngineClient:
    def __init__(self, base_url: str, admin_key: str, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {admin_key}"}
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        response = httpx.get(
            f"{self.base_url}/internal/engine/info", headers=self._headers, timeout=30
        )
        _raise_for(response)
        info = response.json()
        self.max_model_len = int(info["max_model_len"])
        self.base_model_id = str(info["base_model_id"])

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        fairness_key: str,
        priority: int = INTERACTIVE_PRIORITY,
        adapter: AdapterRef | None = None,
    ) -> AsyncIterator[RequestOutput]:
        body = {
            "request_id": request_id,
            "prompt_token_ids": prompt_token_ids,
            "params": _params(params),
            "fairness_key": fairness_key,
            "priority": priority,
            "adapter": _ref_json(adapter) if adapter else None,
        }
        timeout = httpx.Timeout(30, read=None)
        async with (
            httpx.AsyncClient(timeout=timeout) as client,
            client.stream(
                "POST",
                f"{self.base_url}/internal/engine/generate",
                json=body,
                headers=telemetry.inject(self._headers),  # the server continues the trace
            ) as response,
        ):
            if response.status_code != 200:
                await response.aread()
                _raise_for(response)
            async for line in response.aiter_lines():
                if not line:
                    continue
                item = json.loads(line)
                if "stream_error" in item:
                    raise RemoteEngineError(str(item["stream_error"]))
                if item.get("error") is not None:
                    item["error"] = RemoteEngineError(str(item["error"]))
                if item.get("top_logprobs"):  # JSON turned the token-id keys into strings
                    item["top_logprobs"] = [
                        {int(t): lp for t, lp in top.items()} for top in item["top_logprobs"]
                    ]
                yield RequestOutput(**item)

    def abort(self, request_id: str) -> None:
        """Closing the stream of ``generate`` aborts its request on the server."""

    def drop_adapter(self, ref: AdapterRef) -> None:
        response = httpx.post(
            f"{self.base_url}/internal/engine/drop-adapter",
            json=_ref_json(ref),
            headers=self._headers,
            timeout=30,
        )
        _raise_for(response)

    def stats(self) -> EngineStats:
        response = httpx.get(
            f"{self.base_url}/internal/engine/info", headers=self._headers, timeout=30
        )
        _raise_for(response)
        return EngineStats(**response.json()["stats"])

    def start(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def _ref_json(ref: AdapterRef) -> dict[str, str]:
    """What loramux.api.engine reads back into the same AdapterRef."""
    return {"id": ref.id, "sha256": ref.sha256, "namespace": ref.namespace}


def _params(params: SamplingParams) -> dict[str, Any]:
    return {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "seed": params.seed,
        "max_tokens": params.max_tokens,
        "stop": list(params.stop),
        "stop_token_ids": list(params.stop_token_ids),
        "ignore_eos": params.ignore_eos,
        "logprobs": params.logprobs,
        "skip_special_tokens": params.skip_special_tokens,
    }


def _raise_for(response: httpx.Response) -> None:
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        raise RemoteEngineError(f"engine server answered {response.status_code}: {message}")
