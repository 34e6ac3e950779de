"""Per-request sampling parameters."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from loramux_engine.errors import InvalidSamplingParamsError

MAX_TOP_LOGPROBS = 20
# Below this a temperature samples greedily (vLLM's _SAMPLING_EPS): dividing logits by a
# temperature near zero only sharpens the distribution onto its argmax, and by one small
# enough (1e-45) overflows them.
MIN_SAMPLING_TEMPERATURE = 1e-5


@dataclass(slots=True)
class SamplingParams:
    temperature: float = 1.0  # below MIN_SAMPLING_TEMPERATURE (0 included) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = all tokens
    seed: int | None = None  # None: drawn from the engine's own generator
    max_tokens: int | None = 16  # None: until the context is full
    stop: Sequence[str] = field(default_factory=tuple)
    stop_token_ids: Sequence[int] = field(default_factory=tuple)
    ignore_eos: bool = False
    # True: logprob of each chosen token; an int N > 0 adds the N most likely alternatives.
    logprobs: bool | int = False
    skip_special_tokens: bool = True
    # Speculative decoding (engine/spec_decode.py): True or False asks for it or refuses it;
    # None leaves it to the engine (its speculative mode).
    speculative: bool | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0.0):
            raise InvalidSamplingParamsError("temperature must be a finite number >= 0")
        if not 0.0 < self.top_p <= 1.0:  # refuses NaN and infinities too
            raise InvalidSamplingParamsError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise InvalidSamplingParamsError("top_k must be >= 0 (0 disables it)")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidSamplingParamsError("max_tokens must be at least 1")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidSamplingParamsError("seed must be in [0, 2**63)")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidSamplingParamsError("stop strings must be non-empty strings")
        self.stop_token_ids = tuple(self.stop_token_ids)
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise InvalidSamplingParamsError("stop_token_ids must be non-negative ints")
        if not isinstance(self.logprobs, bool) and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidSamplingParamsError(f"logprobs must be a bool or 0..{MAX_TOP_LOGPROBS}")
        if self.speculative is not None and not isinstance(self.speculative, bool):
            raise InvalidSamplingParamsError("speculative must be true, false or absent")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_SAMPLING_TEMPERATURE

    @property
    def num_top_logprobs(self) -> int:
        return 0 if isinstance(self.logprobs, bool) else self.logprobs

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not False
