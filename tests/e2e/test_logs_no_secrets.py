"""No prompt, completion or key secret reaches a log, even at DEBUG.

A live `loramux serve` (the embedded default: SQLite, its own Celery worker and beat, all
writing to one file) logs JSON at DEBUG with tracing on and spans printed to the same
output. It serves a chat completion, a streamed one, a completion, a refused key and a
batch line, each with a distinctive prompt; then the whole output is searched for every
prompt, every completion and every key secret.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.conftest import ADMIN_KEY, LiveServer

# Far above what the work takes; reached only when something is broken.
TIMEOUT_S = 150.0


def escaped(text: str) -> set[str]:
    """``text`` as it would appear in a plain line and inside a JSON string."""
    return {text, json.dumps(text, ensure_ascii=False)[1:-1], json.dumps(text)[1:-1]}


def chat(model: str, content: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": model, "messages": [{"role": "user", "content": content}],
        "max_tokens": 16, "temperature": 0, **extra,
    }  # fmt: skip


def run_batch(client: httpx.Client, model: str, prompt: str) -> str:
    """One batch line through the embedded worker; its completion's text."""
    line = {"custom_id": "line-0", "method": "POST", "url": "/v1/chat/completions",
            "body": chat(model, prompt)}  # fmt: skip
    uploaded = client.post(
        "/files", data={"purpose": "batch"},
        files={"file": ("in.jsonl", json.dumps(line).encode() + b"\n")},
    )  # fmt: skip
    assert uploaded.status_code == 200, uploaded.text
    batch = client.post(
        "/batches",
        json={"input_file_id": uploaded.json()["id"], "endpoint": "/v1/chat/completions",
              "completion_window": "24h"},
    )  # fmt: skip
    assert batch.status_code == 200, batch.text
    deadline = time.monotonic() + TIMEOUT_S
    while (state := client.get(f"/batches/{batch.json()['id']}").json())["status"] in (
        "validating", "in_progress", "finalizing",
    ):  # fmt: skip
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    assert state["status"] == "completed" and state["request_counts"]["completed"] == 1, state
    output = client.get(f"/files/{state['output_file_id']}/content")
    body = json.loads(output.text)["response"]["body"]
    return str(body["choices"][0]["message"]["content"])


def test_no_prompt_completion_or_key_reaches_the_logs(
    live_server_factory: Callable[[dict[str, str]], LiveServer], tiny_llama_dir: Path
) -> None:
    server = live_server_factory(
        {
            "LORAMUX_MODEL": str(tiny_llama_dir),
            "LORAMUX_LOG_LEVEL": "DEBUG",
            "LORAMUX_LOG_FORMAT": "json",
            "LORAMUX_OTEL_EXPORTER": "console",
            "LORAMUX_BATCH_POLL_S": "0.2",
        }
    )
    _, key = server.make_tenant("logs")
    marker = uuid.uuid4().hex[:12]
    prompts = {
        kind: f"secret-{kind}-prompt-{marker}" for kind in ("chat", "stream", "text", "batch")
    }
    completions: list[str] = []
    refused_key = f"lmx_refused-{uuid.uuid4().hex}"
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=f"{server.base_url}/v1", headers=headers, timeout=60) as client:
        model = client.get("/models").json()["data"][0]["id"]
        answered = client.post(
            "/chat/completions", json=chat(model, prompts["chat"]),
            headers={"X-Request-Id": f"logs-chat-{marker}"},
        )  # fmt: skip
        assert answered.status_code == 200, answered.text
        assert answered.headers["x-request-id"] == f"logs-chat-{marker}"
        completions.append(answered.json()["choices"][0]["message"]["content"])
        streamed = ""
        with client.stream(
            "POST", "/chat/completions", json=chat(model, prompts["stream"], stream=True)
        ) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    streamed += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        completions.append(streamed)
        text = client.post(
            "/completions", json={"model": model, "prompt": prompts["text"], "max_tokens": 16}
        )
        assert text.status_code == 200, text.text
        completions.append(text.json()["choices"][0]["text"])
        refused = client.post(
            "/chat/completions", json=chat(model, prompts["chat"]),
            headers={"Authorization": f"Bearer {refused_key}"},
        )  # fmt: skip
        assert refused.status_code == 401
        completions.append(run_batch(client, model, prompts["batch"]))

    server.process.terminate()  # its exit flushes the spans still batched for export
    server.process.wait(timeout=60)
    log = server.log.read_text(errors="replace")

    # The log is the one asked for: JSON at DEBUG, request and trace ids, spans beside.
    records = [json.loads(line) for line in log.splitlines() if line.startswith('{"time"')]
    assert any(r["level"] == "DEBUG" for r in records)
    ours = [r for r in records if r.get("request_id") == f"logs-chat-{marker}"]
    assert ours and all(len(r.get("trace_id", "")) == 32 for r in ours)
    assert '"name": "loramux.engine.generate"' in log
    assert '"name": "celery.run loramux.run_batch"' in log

    secrets = {"tenant key": key, "admin key": ADMIN_KEY, "refused key": refused_key}
    secrets |= {f"{kind} prompt": prompt for kind, prompt in prompts.items()}
    # The tiny random model's outputs are byte strings: long ones are distinctive.
    distinctive = [c for c in completions if len(c.strip()) >= 8]
    assert len(distinctive) >= 2, completions
    secrets |= {f"completion {i}": c for i, c in enumerate(distinctive)}
    for what, secret in secrets.items():
        for form in escaped(secret):
            assert form not in log, f"the {what} reached the log"
    # The key's prefix identifies it in logs; the secret part never appears.
    assert key[12:] not in log
