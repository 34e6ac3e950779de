"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step launches a few hundred small kernels (per layer: norms, projections, LoRA
shrink and expand, RoPE, attention); at small batches the GPU waits on the CPU issuing
them. A CUDA graph issues them all at once. A graph replays fixed shapes at fixed
addresses, so a pure decode step (every sequence one new token, every sequence sampled)
is padded to the next bucket (1, 2, 4, ..., max_num_seqs) and its inputs are copied into
buffers allocated once:

- per row: input id, position, cache row of its new key/value, number of keys, slot;
- block tables at a fixed stride (row i's table starts at i * max_blocks_per_seq);
- the LoRA tile table (kernels/triton_lora.py), zero rows past the step's tiles.

A padded row is token 0 at position 0 whose key and value go to the scratch block (one
block past those the block manager hands out) and which attends to that key alone; its
slot is 0, so LoRA skips it, and its logits are dropped. Everything else in a step is
host-side before the replay (these copies) or after it (sampling), so the kernels in
between do no host sync and take no data-dependent shape (kernels/triton_*.py).

Graphs are captured when the engine starts (``capture_all``: without LoRA, then with LoRA
once adapters are attached), over padding rows alone, each after one eager run that
compiles the Triton kernels; one still missing is captured the first time a step needs it
(that step runs once eagerly, writing the same keys and values the replay writes again).
Prompt steps, mixed steps, speculative steps (several rows per sequence) and batches above
max_num_seqs run eagerly (model_runner.py). A capture that fails turns graphs off for the
engine, with a warning.

``capture=False`` runs the same padded static-buffer function eagerly: that is how the
bucketing and padding are tested on a CPU (tests/engine/test_cuda_graphs.py), where the C
attention kernel reads the same per-token block tables as the Triton kernel.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence as Seq
from typing import Any

import torch

from loramux_engine.engine.sequence import Sequence
from loramux_engine.lora.ops import LoRABatch
from loramux_engine.utils.context import Context, reset_context, set_context

logger = logging.getLogger(__name__)

# rows of DecodeGraphs.rows
INPUT_IDS, POSITIONS, CACHE_ROWS, KV_LENS, SLOTS = range(5)


def buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes with a graph: powers of two below max_num_seqs, then max_num_seqs."""
    sizes = [1]
    while sizes[-1] * 2 < max_num_seqs:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] < max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


def slot_runs(slot_ids: Seq[int]) -> list[tuple[int, int, int]]:
    """(slot, start, end) runs of consecutive tokens on one slot, slot 0 left out."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(slot_ids) + 1):
        if i == len(slot_ids) or slot_ids[i] != slot_ids[start]:
            if slot_ids[start]:
                runs.append((slot_ids[start], start, i))
            start = i
    return runs


def is_decode_step(seqs: Seq[Sequence]) -> bool:
    """Every sequence runs exactly its last token and samples the next one."""
    return bool(seqs) and all(
        s.num_scheduled_tokens == 1 and s.num_computed_tokens + 1 == len(s) for s in seqs
    )


class DecodeGraphs:
    def __init__(
        self,
        model: Any,  # LlamaForCausalLM: forward(input_ids, positions), compute_logits(hidden)
        block_size: int,
        max_blocks_per_seq: int,
        scratch_block: int,
        max_num_seqs: int,
        device: torch.device,
        dtype: torch.dtype,
        capture: bool,
        triton_lora: bool,
    ) -> None:
        if capture and device.type != "cuda":
            raise ValueError("CUDA graphs are captured on a CUDA device only")
        if capture and not triton_lora:
            raise ValueError("a captured decode step needs the Triton LoRA kernel")
        self.model = model
        self.block_size = block_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self.scratch_block = scratch_block
        self.buckets = buckets(max_num_seqs)
        self.device = device
        self.dtype = dtype
        self.capture = capture
        self.triton_lora = triton_lora
        size = self.buckets[-1]
        # rows: [5, size] int64; block_ids: [size, max_blocks_per_seq]; tiles: [size, 3] int32
        self.rows = torch.zeros(5, size, dtype=torch.long, device=device)
        self.block_ids = torch.zeros(size, max_blocks_per_seq, dtype=torch.long, device=device)
        self.table_starts = torch.arange(size, device=device) * max_blocks_per_seq
        self.tiles = torch.zeros(size, 3, dtype=torch.int32, device=device)
        self._slot_ids: list[int] = []  # the padded step's, for the eager stand-in
        self._graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool: Any = None
        self.enabled = True
        self.num_replays = 0
        self.num_captures = 0

    def bucket(self, num_seqs: int) -> int | None:
        return next((b for b in self.buckets if b >= num_seqs), None)

    def accepts(self, seqs: Seq[Sequence]) -> bool:
        return self.enabled and self.bucket(len(seqs)) is not None and is_decode_step(seqs)

    def run(self, seqs: Seq[Sequence]) -> torch.Tensor | None:
        """Logits [len(seqs), vocab] of the step, or None when graphs just turned off (a
        failed capture): the caller then runs the step eagerly."""
        size = self.bucket(len(seqs))
        assert size is not None
        lora = self._fill(seqs, size)
        key = (size, lora)
        if not self.capture:
            return self._forward(size, lora)[: len(seqs)]
        if key not in self._graphs and not self._try_capture(key):
            return None
        graph, logits = self._graphs[key]
        graph.replay()
        self.num_replays += 1
        return logits[: len(seqs)]

    @torch.inference_mode()
    def capture_all(self, lora: bool) -> None:
        """Capture every bucket's graph now, largest first (the memory pool they share
        serves the smaller ones from the larger's), over padding rows alone: no request
        waits for a capture. ``lora``: the graphs with the LoRA kernels, else without.
        With ``capture=False`` each bucket's padding-only step runs once instead."""
        for size in reversed(self.buckets):
            self._fill([], size)
            self.tiles[:size].zero_()
            if not self.capture:
                self._forward(size, lora)
            elif self.enabled and (size, lora) not in self._graphs:
                self._try_capture((size, lora))

    def _try_capture(self, key: tuple[int, bool]) -> bool:
        try:
            self._capture(key)
        except Exception:
            logger.warning(
                "capturing the decode step of batch %d failed; CUDA graphs are off",
                key[0],
                exc_info=True,
            )
            self.enabled = False
            self._graphs.clear()
            return False
        return True

    def _fill(self, seqs: Seq[Sequence], size: int) -> bool:
        """Copy the step into the static buffers, padded to ``size`` rows; True with LoRA."""
        n, bs, scratch = len(seqs), self.block_size, self.scratch_block
        pad = size - n
        positions = [s.num_computed_tokens for s in seqs]
        # the blocks up to each token's own (a sequence may hold one past them, for drafts)
        tables = [s.block_table[: p // bs + 1] for s, p in zip(seqs, positions, strict=True)]
        slot_ids = [s.adapter_slot for s in seqs]
        rows = [
            [s.token_ids[p] for s, p in zip(seqs, positions, strict=True)] + [0] * pad,
            positions + [0] * pad,
            [t[p // bs] * bs + p % bs for t, p in zip(tables, positions, strict=True)]
            + [scratch * bs] * pad,
            [p + 1 for p in positions] + [1] * pad,
            slot_ids + [0] * pad,
        ]
        self.rows[:, :size].copy_(torch.tensor(rows, dtype=torch.long))
        self._slot_ids = rows[SLOTS]
        width = max((len(t) for t in tables), default=1)
        padded = [t + [scratch] * (width - len(t)) for t in tables] + [[scratch] * width] * pad
        self.block_ids[:size, :width].copy_(torch.tensor(padded, dtype=torch.long))
        if not any(slot_ids):
            return False
        if self.triton_lora:
            from loramux_engine.kernels import triton_lora

            work = triton_lora.tile_list(slot_runs(slot_ids))
            self.tiles[:size].copy_(
                torch.tensor(work + [(0, 0, 0)] * (size - len(work)), dtype=torch.int32)
            )
        return True

    def _lora_batch(self, size: int) -> LoRABatch:
        if self.triton_lora:
            return LoRABatch.fixed(self.rows[SLOTS, :size], self.tiles[:size])
        # The eager stand-in (capture=False on a CPU): the kernel the runner would pick.
        return LoRABatch.build(self._slot_ids, self.device, dtype=self.dtype)

    def _forward(self, size: int, lora: bool) -> torch.Tensor:
        """The step over the first ``size`` rows of the buffers: logits [size, vocab]."""
        set_context(
            Context(
                cache_positions=self.rows[CACHE_ROWS, :size],
                segments=[],
                block_ids=self.block_ids[:size].view(-1),
                token_table_starts=self.table_starts[:size],
                token_kv_lens=self.rows[KV_LENS, :size],
                lora_batch=self._lora_batch(size) if lora else None,
            )
        )
        try:
            hidden = self.model(self.rows[INPUT_IDS, :size], self.rows[POSITIONS, :size])
            logits: torch.Tensor = self.model.compute_logits(hidden)
            return logits
        finally:
            reset_context()

    def _capture(self, key: tuple[int, bool]) -> None:
        size, lora = key
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # compiles the kernels; rewrites the same keys
            self._forward(size, lora)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            logits = self._forward(size, lora)
        self._graphs[key] = (graph, logits)
        self.num_captures += 1
        logger.info("captured the decode step of batch %d (LoRA: %s)", size, lora)
