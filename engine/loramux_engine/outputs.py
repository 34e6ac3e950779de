"""What the engine hands back: per-request deltas and engine-wide stats."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    text: str  # the text delta since the previous output of this request
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | None while running
    num_prompt_tokens: int
    num_output_tokens: int
    # One entry per new token when logprobs were asked for.
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    # With finish_reason "error": why, e.g. AdapterLoadError, or SequenceFailedError (such as
    # NonFiniteLogitsError) for a request that failed in a step the others went on with.
    error: Exception | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of the KV cache's blocks held by sequences
    kv_cache_tokens_total: int = 0  # capacity: blocks times block size
    kv_block_size: int = 0
    kv_blocks_total: int = 0
    kv_cache_bytes: int = 0  # what the blocks take on the device
    kv_blocks_used: int = 0
    kv_tokens_stored: int = 0  # tokens whose keys and values the running sequences hold
    prefix_cache_queries_tokens_total: int = 0  # tokens of admitted sequences looked up
    prefix_cache_hits_tokens_total: int = 0  # of those, found in the cache (not computed)
    num_preemptions_total: int = 0
    prompt_tokens_per_s: float = 0.0  # over the recent window
    generation_tokens_per_s: float = 0.0
    num_prompt_tokens_total: int = 0
    num_generation_tokens_total: int = 0
    num_finished_total: int = 0
    num_steps_total: int = 0
    last_step_num_tokens: int = 0  # tokens through the model in the latest step
    last_step_num_sampled: int = 0  # rows through the LM head in the latest step
    # Speculative decoding (engine/spec_decode.py): draft tokens verified, those accepted,
    # and the sequence-steps that verified drafts.
    spec_decode_num_draft_tokens_total: int = 0
    spec_decode_num_accepted_tokens_total: int = 0
    spec_decode_num_drafting_steps_total: int = 0
    # Requests per fairness key (opaque here; the platform passes its tenant id).
    num_running_by_key: dict[str, int] = field(default_factory=dict)
    num_waiting_by_key: dict[str, int] = field(default_factory=dict)
    # Adapters in device slots: {"slot", "id", "namespace", "pinned"} (AdapterRef's fields).
    resident_adapters: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)
