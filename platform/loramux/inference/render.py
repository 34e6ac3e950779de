"""OpenAI response shapes for completions and chat, whole and as stream chunks."""

from __future__ import annotations

import json
import math
from typing import Any

from loramux_engine.layers.sampler import NEG_INF_LOGPROB
from loramux_engine.outputs import RequestOutput


def _token_text(tokenizer: Any, token_id: int) -> str:
    return str(tokenizer.decode([token_id]))


def _logprob(value: float) -> float:
    # JSON has no NaN or -Infinity: whatever the engine hands over, a response must parse.
    # A logprob that is not a finite number is reported as OpenAI reports probability 0.
    return value if math.isfinite(value) else NEG_INF_LOGPROB


def completion_logprobs(tokenizer: Any, outs: list[RequestOutput], offset: int) -> dict[str, Any]:
    tokens, token_logprobs, top, text_offset = [], [], [], []
    for out in outs:
        for i, token_id in enumerate(out.new_token_ids):
            text = _token_text(tokenizer, token_id)
            tokens.append(text)
            text_offset.append(offset)
            offset += len(text)
            token_logprobs.append(_logprob(out.logprobs[i]) if out.logprobs else None)
            if out.top_logprobs:
                top.append(
                    {
                        _token_text(tokenizer, t): _logprob(lp)
                        for t, lp in out.top_logprobs[i].items()
                    }
                )
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top or None,
        "text_offset": text_offset,
    }


def chat_logprobs(tokenizer: Any, outs: list[RequestOutput]) -> dict[str, Any]:
    def entry(token_id: int, logprob: float | None) -> dict[str, Any]:
        text = _token_text(tokenizer, token_id)
        value = None if logprob is None else _logprob(logprob)
        return {"token": text, "logprob": value, "bytes": list(text.encode())}

    content = []
    for out in outs:
        for i, token_id in enumerate(out.new_token_ids):
            item = entry(token_id, out.logprobs[i] if out.logprobs else None)
            tops = out.top_logprobs[i] if out.top_logprobs else {}
            item["top_logprobs"] = [entry(t, lp) for t, lp in tops.items()]
            content.append(item)
    return {"content": content}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse(payload: dict[str, Any] | str) -> bytes:
    # allow_nan=False: a non-finite number raises here rather than reach a client as NaN.
    data = (
        payload
        if isinstance(payload, str)
        else json.dumps(payload, separators=(",", ":"), allow_nan=False)
    )
    return f"data: {data}\n\n".encode()
