"""Per-step batch metadata that layers read without it being threaded through every call."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from loramux_engine.lora.ops import LoRABatch


@dataclass(slots=True)
class AttentionSegment:
    """One sequence's slice of the flattened batch and of the KV cache."""

    query_start: int  # rows [query_start, query_end) of the batch
    query_end: int
    kv_start: int  # cache rows [kv_start, kv_end) hold this sequence's keys so far
    kv_end: int


@dataclass(slots=True)
class Context:
    cache_positions: torch.Tensor  # [num_tokens] cache row each new key/value goes to
    segments: list[AttentionSegment]
    # For the CPU attention kernel (empty without it): the cache rows each token attends
    # to, [start, start + len), its sequence's keys up to and including its own.
    token_kv_starts: torch.Tensor  # [num_tokens] int64
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
