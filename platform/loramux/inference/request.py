"""Parse and check an OpenAI completions or chat request into engine inputs.

Every check names the offending ``param`` so a client sees a 400, never a 500.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loramux.errors import InvalidRequest
from loramux.settings import Settings
from loramux_engine.errors import InvalidSamplingParamsError
from loramux_engine.sampling_params import SamplingParams

MAX_STOP = 4
UNSUPPORTED = {
    "best_of": lambda v: v not in (None, 1),
    "echo": lambda v: v not in (None, False),
    "suffix": lambda v: v is not None,
    "logit_bias": lambda v: bool(v),
    "tools": lambda v: bool(v),
    "functions": lambda v: bool(v),
    "presence_penalty": lambda v: v not in (None, 0, 0.0),
    "frequency_penalty": lambda v: v not in (None, 0, 0.0),
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
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise InvalidRequest(f"{name} must be a number between {lo} and {hi}", param=name)
    return float(value)


def _integer(body: dict[str, Any], name: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
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


def _check_unsupported(body: dict[str, Any]) -> None:
    for name, refused in UNSUPPORTED.items():
        if name in body and refused(body[name]):
            raise InvalidRequest(f"{name} is not supported by this server", param=name)


def _sampling(
    body: dict[str, Any], settings: Settings, max_tokens: int | None, logprobs: bool | int
) -> SamplingParams:
    try:
        return SamplingParams(
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=_number(body, "top_p", 1.0, 0.0, 1.0) or 1e-6,
            top_k=_integer(body, "top_k", 0, 0, 1_000_000) or 0,
            seed=_integer(body, "seed", None, 0, 2**63 - 1),
            max_tokens=max_tokens,
            stop=_stop(body),
            logprobs=logprobs,
        )
    except InvalidSamplingParamsError as error:
        raise InvalidRequest(str(error)) from error


def _max_tokens(body: dict[str, Any], settings: Settings, *names: str) -> tuple[int, bool]:
    for name in names:
        value = _integer(body, name, None, 1, settings.max_tokens_cap)
        if value is not None:
            return value, True
    return settings.default_max_tokens, False


def parse_completion(body: dict[str, Any], settings: Settings, tokenizer: Any) -> GenerationRequest:
    _check_unsupported(body)
    model = _model(body)
    prompt = body.get("prompt")
    prompts: list[list[int]]
    if isinstance(prompt, str):
        prompts = [tokenizer.encode(prompt, add_special_tokens=False)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = [tokenizer.encode(p, add_special_tokens=False) for p in prompt]
    elif isinstance(prompt, list) and prompt and all(_is_token_id(t) for t in prompt):
        prompts = [list(prompt)]
    elif (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(p, list) and p and all(_is_token_id(t) for t in p) for p in prompt)
    ):
        prompts = [list(p) for p in prompt]
    else:
        raise InvalidRequest(
            "prompt must be a string, a list of strings, or token ids", param="prompt"
        )
    if any(not p for p in prompts):
        raise InvalidRequest("prompt must not be empty", param="prompt")
    logprobs = _integer(body, "logprobs", None, 0, 5)
    max_tokens, given = _max_tokens(body, settings, "max_tokens")
    stream = _stream(body)
    return GenerationRequest(
        kind="completion",
        model=model,
        prompts=prompts,
        n=_integer(body, "n", 1, 1, settings.max_n) or 1,
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
        n=_integer(body, "n", 1, 1, settings.max_n) or 1,
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


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


ROLES = ("system", "developer", "user", "assistant")


def _message(message: Any, index: int) -> dict[str, str]:
    param = f"messages[{index}]"
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise InvalidRequest(f"{param} must be an object with a role in {ROLES}", param=param)
    content = message.get("content")
    if isinstance(content, list):  # content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise InvalidRequest(f"{param}.content may only hold text parts", param=param)
        content = "".join(str(p.get("text", "")) for p in content)
    if not isinstance(content, str):
        raise InvalidRequest(f"{param}.content must be a string", param=param)
    role = "system" if message["role"] == "developer" else message["role"]
    return {"role": role, "content": content}
