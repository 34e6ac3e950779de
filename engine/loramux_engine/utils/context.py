"""Per-step batch metadata that layers read without it being threaded through every call."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from loramux_engine.lora.ops import LoRABatch


@dataclass(slots=True)
class AttentionSegment:
    """One sequence's slice of the flattened batch and the cache rows of its keys so far."""

    query_start: int  # rows [query_start, query_end) of the batch
    query_end: int
    kv_rows: torch.Tensor  # [num_keys] int64: the cache row of each key, in order


@dataclass(slots=True)
class Context:
    cache_positions: torch.Tensor  # [num_tokens] cache row each new key/value goes to
    # For the SDPA path (empty with the CPU kernel): one per scheduled sequence.
    segments: list[AttentionSegment]
    # For the CPU attention kernel (empty without it): the block tables concatenated, and
    # for each token where its sequence's table starts in them and how many keys it
    # attends to (its sequence's keys up to and including its own).
    block_ids: torch.Tensor  # int64
    token_table_starts: torch.Tensor  # [num_tokens] int64
    token_kv_lens: torch.Tensor  # [num_tokens] int64
    # Each token's adapter slot; None when no token of this step uses an adapter.
    lora_batch: LoRABatch | None = None


# Thread-local so that two engines stepping on two threads never see each other's batch.
_local = threading.local()


def set_context(context: Context) -> None:
    _local.context = context


def get_context() -> Context:
    context: Context | None = getattr(_local, "context", None)
    if context is None:
        raise RuntimeError("no batch context set; layers run only inside ModelRunner.run")
    return context


def reset_context() -> None:
    _local.context = None
