"""A second tenant's streamed greedy request, run alone and then beside an attack.

The hostile-tenant tests use it to show that an attack is confined to the attacker: the
victim's tokens beside the attack equal its tokens alone.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from tests.e2e.conftest import LiveServer


class Victim:
    def __init__(self, server: LiveServer, key: str, max_tokens: int = 48) -> None:
        self.server = server
        self.key = key
        self.max_tokens = max_tokens
        self.model = httpx.get(
            f"{server.base_url}/v1/models", headers={"Authorization": f"Bearer {key}"}
        ).json()["data"][0]["id"]

    def stream(self, first_token: threading.Event | None = None) -> list[str]:
        """Stream a greedy completion; its tokens (as text) in the order the client got them."""
        body = {
            "model": self.model,
            "prompt": "The victim's own prompt, which no attack may change:",
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "stream": True,
            "logprobs": 0,
        }
        tokens: list[str] = []
        with httpx.stream(
            "POST",
            f"{self.server.base_url}/v1/completions",
            json=body,
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=120,
        ) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                assert "error" not in chunk, chunk
                for choice in chunk["choices"]:
                    logprobs = choice.get("logprobs") or {}
                    tokens.extend(logprobs.get("tokens") or [])
                    if first_token is not None and tokens:
                        first_token.set()
        assert tokens, "the victim received no tokens"
        return tokens

    def alone(self) -> list[str]:
        return self.stream()

    @contextmanager
    def beside(self) -> Iterator[list[list[str]]]:
        """Start the victim's stream, yield once its first token arrived, then join it.

        The yielded list receives the victim's tokens (or the error it raised) on exit.
        """
        result: list[list[str]] = []
        errors: list[BaseException] = []
        first_token = threading.Event()

        def run() -> None:
            try:
                result.append(self.stream(first_token))
            except BaseException as error:  # reported by the main thread
                errors.append(error)
                first_token.set()

        thread = threading.Thread(target=run)
        thread.start()
        first_token.wait(60)
        try:
            yield result
        finally:
            thread.join(120)
        if errors:
            raise errors[0]
        assert result, "the victim's stream did not finish"
