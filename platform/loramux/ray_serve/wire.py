"""What an engine replica streams back to ``RayEngineClient``, besides ``RequestOutput``.

A replica first says it took the request (``Accepted``: which replica, its context length,
its stats), then streams the engine's outputs, and ends with its stats (``ReplicaStats``).
An engine error travels as an ``EngineFailure`` and is raised again on the caller's side as
the same exception type the in-process client raises, so the API maps it to the same
OpenAI error: engine exceptions do not all survive pickling (``AdapterLoadError`` and
``PromptTooLongError`` take more than a message), and a raised one would arrive wrapped in
Ray's own error.
"""

from __future__ import annotations

from dataclasses import dataclass

from loramux_engine.errors import (
    AdapterRequestError,
    InvalidSamplingParamsError,
    NonFiniteLogitsError,
    PromptTooLongError,
    SequenceFailedError,
)
from loramux_engine.lora.errors import AdapterLoadError
from loramux_engine.outputs import EngineStats


class RayEngineError(RuntimeError):
    """The engine failed in a way that is not the request's own (its step, its shutdown)."""


@dataclass(frozen=True, slots=True)
class Accepted:
    replica_id: str
    max_model_len: int
    stats: EngineStats


@dataclass(frozen=True, slots=True)
class ReplicaStats:
    replica_id: str
    stats: EngineStats


@dataclass(frozen=True, slots=True)
class EngineFailure:
    kind: str
    message: str
    adapter_id: str = ""
    num_prompt_tokens: int = 0
    max_model_len: int = 0


class _RemoteCause(Exception):
    """The cause of an AdapterLoadError raised in a replica, as its message."""


# The nearest of these in an exception's MRO names its kind; anything else is the engine's.
_MESSAGE_ONLY: dict[str, type[Exception]] = {
    cls.__name__: cls
    for cls in (
        NonFiniteLogitsError,
        SequenceFailedError,
        InvalidSamplingParamsError,
        AdapterRequestError,
        ValueError,
    )
}


def encode_error(error: BaseException) -> EngineFailure:
    if isinstance(error, AdapterLoadError):
        cause = str(error.__cause__) if error.__cause__ is not None else str(error)
        return EngineFailure("AdapterLoadError", cause, adapter_id=error.adapter_id)
    if isinstance(error, PromptTooLongError):
        return EngineFailure(
            "PromptTooLongError",
            str(error),
            num_prompt_tokens=error.num_prompt_tokens,
            max_model_len=error.max_model_len,
        )
    for cls in type(error).__mro__:
        if cls.__name__ in _MESSAGE_ONLY and _MESSAGE_ONLY[cls.__name__] is cls:
            return EngineFailure(cls.__name__, str(error))
    return EngineFailure(RayEngineError.__name__, str(error))


def decode_error(failure: EngineFailure) -> Exception:
    if failure.kind == "AdapterLoadError":
        return AdapterLoadError(failure.adapter_id, _RemoteCause(failure.message))
    if failure.kind == "PromptTooLongError":
        return PromptTooLongError(failure.num_prompt_tokens, failure.max_model_len)
    cls = _MESSAGE_ONLY.get(failure.kind, RayEngineError)
    return cls(failure.message)
