"""A request's state as it moves through the scheduler."""

from __future__ import annotations

import enum
import itertools

import torch

from loramux_engine.sampling_params import SamplingParams

_arrivals = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        max_len: int,
        fairness_key: str = "",
        priority: int = 0,
        adapter: object | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        # Prompt plus everything it may generate: it finishes with "length" there.
        self.max_len = max_len
        self.fairness_key = fairness_key
        self.priority = priority
        self.adapter = adapter
        self.adapter_slot = 0  # the adapter's pinned device slot while running; 0: none
        self.error: Exception | None = None  # why it finished with reason "error"
        self.generator = generator
        self.arrival = next(_arrivals)
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.num_computed_tokens = 0  # tokens whose keys/values are in the cache
        self.num_scheduled_tokens = 0  # tokens going through the model this step
        # The KV cache blocks holding its tokens, in order (engine/kv_cache.py), and the
        # prefix-cache keys of the leading full ones; both empty while it waits.
        self.block_table: list[int] = []
        self.block_keys: list[bytes] = []
        self.prefix_salt = b""  # tenant and adapter version, hashed into every block key
        self.num_preemptions = 0
        self.num_bypassed = 0  # sequences admitted past it while it waited (scheduler.py)
        self.output_text = ""
        self.num_emitted_chars = 0
        self.num_emitted_tokens = 0
        self.logprobs: list[float] = []
        self.top_logprobs: list[dict[int, float]] = []
        # Speculative decoding (engine/spec_decode.py): the draft tokens going through the
        # model after its last token this step, to be verified; empty otherwise. Never in
        # token_ids, never counted as computed until accepted.
        self.draft_token_ids: list[int] = []
        self.spec: object | None = None  # the speculator's per-sequence state

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def scheduled_token_ids(self) -> list[int]:
        """The tokens going through the model this step: uncomputed ones, then drafts."""
        start = self.num_computed_tokens
        if not self.draft_token_ids:
            return self.token_ids[start : start + self.num_scheduled_tokens]
        return self.token_ids[start:] + self.draft_token_ids

    @property
    def num_sampled_rows(self) -> int:
        """Rows of this step's logits the sequence samples from: 0 for a prompt chunk that
        does not reach its end, 1 for a plain step, 1 + drafts for a speculative one."""
        end = self.num_computed_tokens + self.num_scheduled_tokens
        if end < len(self.token_ids) + len(self.draft_token_ids):
            return 0
        return 1 + len(self.draft_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
