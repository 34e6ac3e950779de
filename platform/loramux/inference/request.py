"""Parse and check an OpenAI completions or chat request into engine inputs.

Every check names the offending ``param`` so a client sees a 400, never a 500.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from loramux.errors import InvalidRequest
from loramux.settings import Settings
from loramux_engine.errors import InvalidSamplingParamsError
from loramux_engine.sampling_params import MIN_SAMPLING_TEMPERATURE, SamplingParams

MAX_STOP = 4
# The smallest positive temperature: the engine samples greedily below it, so a smaller
# one (1e-45, 5e-324: not even float32 numbers) can only be a mistake or an attack.
MIN_TEMPERATURE = MIN_SAMPLING_TEMPERATURE
# The smallest top_p: float32 (the sampler's precision) resolves no finer nucleus, and at
# 5e-324 (0 in float32) the nucleus is empty.
MIN_TOP_P = 1e-6
SEED_LIMIT = 2**63


def _is_number(value: Any) -> bool:
    # JSON true/false are Python ints: a boolean is never a number here.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_zero(value: Any) -> bool:
    return value is None or (_is_number(value) and value == 0)


UNSUPPORTED = {
    "best_of": lambda v: not (v is None or (_is_number(v) and v == 1)),
    "echo": lambda v: v is not None and v is not False,
    "suffix": lambda v: v is not None,
    "logit_bias": lambda v: bool(v),
    "tools": lambda v: bool(v),
    "functions": lambda v: bool(v),
    "presence_penalty": lambda v: not _is_zero(v),
    "frequency_penalty": lambda v: not _is_zero(v),
}


@dataclass(slots=True)
class GenerationRequest:
    kind: str  # "chat" | "completion"
    model: str
    prompts: list[list[int]]
    n: int
    params: SamplingParams
    stream: bool
    include_usage: bool
    max_tokens_given: bool

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n

    @property
    def reserved_tokens(self) -> int:
        max_tokens = self.params.max_tokens or 0
        return sum((len(p) + max_tokens) * self.n for p in self.prompts)


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value) or not math.isfinite(value) or not lo <= value <= hi:
        raise InvalidRequest(f"{name} must be a number between {lo:g} and {hi:g}", param=name)
    return float(value)


def _temperature(body: dict[str, Any]) -> float:
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    if 0.0 < temperature < MIN_TEMPERATURE:
        raise InvalidRequest(
            f"temperature must be 0 (greedy) or between {MIN_TEMPERATURE:g} and 2",
            param="temperature",
        )
    return temperature


def _integer(body: dict[str, Any], name: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidRequest(f"{name} must be an integer between {lo} and {hi}", param=name)
    return value


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, list)
        or len(stop) > MAX_STOP
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise InvalidRequest(
            f"stop must be a non-empty string or a list of up to {MAX_STOP} of them", param="stop"
        )
    return tuple(stop)


def _stream_options(body: dict[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise InvalidRequest(
            "stream_options is only allowed with stream: true", param="stream_options"
        )
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise InvalidRequest(
            "stream_options.include_usage must be a boolean", param="stream_options"
        )
    return bool(options.get("include_usage", False))


def _speculative(body: dict[str, Any]) -> bool | None:
    """The ``speculative`` extension: true or false asks for or refuses speculative
    decoding; absent or null leaves it to the server (LORAMUX_ENGINE_SPECULATIVE)."""
    value = body.get("speculative")
    if value is not None and not isinstance(value, bool):
        raise InvalidRequest("speculative must be true, false or absent", param="speculative")
    return value


def _check_unsupported(body: dict[str, Any]) -> None:
    for name, refused in UNSUPPORTED.items():
        if name in body and refused(body[name]):
            raise InvalidRequest(f"{name} is not supported by this server", param=name)


def _sampling(
    body: dict[str, Any], settings: Settings, max_tokens: int | None, logprobs: bool | int
) -> SamplingParams:
    try:
        return SamplingParams(
            temperature=_temperature(body),
            top_p=_number(body, "top_p", 1.0, MIN_TOP_P, 1.0),
            top_k=_integer(body, "top_k", 0, 0, 1_000_000) or 0,
            seed=_integer(body, "seed", None, 0, SEED_LIMIT - 1),
            max_tokens=max_tokens,
            stop=_stop(body),
            logprobs=logprobs,
            speculative=_speculative(body),
        )
    except InvalidSamplingParamsError as error:
        raise InvalidRequest(str(error)) from error


def _max_tokens(body: dict[str, Any], settings: Settings, *names: str) -> tuple[int, bool]:
    for name in names:
        value = _integer(body, name, None, 1, settings.max_tokens_cap)
        if value is not None:
            return value, True
    return settings.default_max_tokens, False


def _n(body: dict[str, Any], settings: Settings, num_prompts: int) -> int:
    """``n``, with prompts x n bounded before any prompt is tokenized or run."""
    n = _integer(body, "n", 1, 1, settings.max_n) or 1
    most = settings.max_choices_per_request
    if num_prompts * n > most:
        raise InvalidRequest(
            f"This request asks for {num_prompts * n} choices ({num_prompts} prompts x n={n}); "
            f"one request may ask for at most {most}.",
            param="prompt" if num_prompts > 1 else "n",
        )
    return n


def _is_token_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def _token_ids(ids: list[int], vocab_size: int) -> list[int]:
    if not all(0 <= t < vocab_size for t in ids):
        raise InvalidRequest(
            f"prompt token ids must be integers in [0, {vocab_size})", param="prompt"
        )
    return list(ids)


def _text(value: str, param: str) -> str:
    # Also for callers that parsed JSON without bounded_json (its loader refuses these first).
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(
            f"{param} holds a lone UTF-16 surrogate, which is not valid Unicode", param=param
        ) from None
    return value


def parse_completion(body: dict[str, Any], settings: Settings, tokenizer: Any) -> GenerationRequest:
    _check_unsupported(body)
    model = _model(body)
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _is_token_list(prompt):
        prompt = [prompt]
    if (
        not isinstance(prompt, list)
        or not prompt
        or not (all(isinstance(p, str) for p in prompt) or all(_is_token_list(p) for p in prompt))
    ):
        raise InvalidRequest(
            "prompt must be a string, a list of strings, or token ids", param="prompt"
        )
    n = _n(body, settings, len(prompt))
    vocab_size = len(tokenizer)
    prompts = [
        tokenizer.encode(_text(p, "prompt"), add_special_tokens=False)
        if isinstance(p, str)
        else _token_ids(p, vocab_size)
        for p in prompt
    ]
    if any(not p for p in prompts):
        raise InvalidRequest("prompt must not be empty", param="prompt")
    logprobs = _integer(body, "logprobs", None, 0, 5)
    max_tokens, given = _max_tokens(body, settings, "max_tokens")
    stream = _stream(body)
    return GenerationRequest(
        kind="completion",
        model=model,
        prompts=prompts,
        n=n,
        params=_sampling(body, settings, max_tokens, False if logprobs is None else logprobs),
        stream=stream,
        include_usage=_stream_options(body, stream),
        max_tokens_given=given,
    )


def parse_chat(body: dict[str, Any], settings: Settings, tokenizer: Any) -> GenerationRequest:
    _check_unsupported(body)
    model = _model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list", param="messages")
    conversation = [_message(m, i) for i, m in enumerate(messages)]
    prompt = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    if isinstance(prompt, dict) or hasattr(prompt, "input_ids"):
        prompt = prompt["input_ids"]
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise InvalidRequest(
            'only response_format {"type": "text"} is supported', param="response_format"
        )
    logprobs: bool | int = False
    if body.get("logprobs") is not None:
        if not isinstance(body["logprobs"], bool):
            raise InvalidRequest("logprobs must be a boolean", param="logprobs")
        logprobs = body["logprobs"]
    top = _integer(body, "top_logprobs", None, 0, 20)
    if top is not None:
        if not logprobs:
            raise InvalidRequest("top_logprobs requires logprobs: true", param="top_logprobs")
        logprobs = top or True
    max_tokens, given = _max_tokens(body, settings, "max_completion_tokens", "max_tokens")
    stream = _stream(body)
    return GenerationRequest(
        kind="chat",
        model=model,
        prompts=[list(prompt)],
        n=_n(body, settings, 1),
        params=_sampling(body, settings, max_tokens, logprobs),
        stream=stream,
        include_usage=_stream_options(body, stream),
        max_tokens_given=given,
    )


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model is required", param="model")
    return model


def _stream(body: dict[str, Any]) -> bool:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("stream must be a boolean", param="stream")
    return stream


ROLES = ("system", "developer", "user", "assistant")


def _message(message: Any, index: int) -> dict[str, str]:
    param = f"messages[{index}]"
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise InvalidRequest(f"{param} must be an object with a role in {ROLES}", param=param)
    content = message.get("content")
    if isinstance(content, list):  # content parts: text only
        if not all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content
        ):
            raise InvalidRequest(f"{param}.content may only hold text parts", param=param)
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise InvalidRequest(f"{param}.content must be a string", param=param)
    role = "system" if message["role"] == "developer" else message["role"]
    return {"role": role, "content": _text(content, param)}
