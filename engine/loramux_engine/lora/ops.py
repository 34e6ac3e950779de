"""The multi-LoRA op: add each token's own adapter delta to a projection's output.

Semantics::

    y[i] += scale[s[i]] * (x[i] @ A[s[i]].T) @ B[s[i]].T     for every token i with s[i] != 0

Slot 0 means "no adapter" and costs nothing. Ranks below max_rank are zero-padded in A
and B; both kernels only touch the first ``rank`` rows of the slots present.

Shape::

    x: [num_tokens, in]   y: [num_tokens, out]   s: [num_tokens]
    A: [num_slots, max_rank, in]   B: [num_slots, out, max_rank]   scale: [num_slots]

B is stored transposed, ``b_t = B.transpose(1, 2)``: [num_slots, max_rank, out], so that a
slot's first `rank` rows are one contiguous block (a third faster to read than rank
columns strided by max_rank, measured).

Two kernels with the same semantics:

- sgmv: one (shrink, expand) matmul pair per run of consecutive tokens on one slot; the
  weights are read once per run and never copied. Best when tokens are ordered by slot
  (the runner should order a step's sequences by adapter slot).
- bgmv: gather A[s] and B[s] per token, then two batched matmuls; a fixed number of ops
  whatever the mix, but it copies rank x (in + out) weights per token.

Measured with bench_ops.py on SmolLM2-135M's 210 projections, rank 16, one thread: sgmv
with tokens grouped by slot costs +9% / +22% / +69% over the base matmuls at 16 tokens
and 1 / 4 / 16 adapters, +7% / +11% / +25% at 256 tokens; bgmv +37% / +44% / +73% and
+392% / +397% / +190% (it copies weights per token). sgmv is the default on every
device; bgmv stays for measuring on GPUs, where copies are cheap and launches are not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

Kernel = Literal["sgmv", "bgmv"]


@dataclass(eq=False)
class LoRAStack:
    """One projection's adapters, stacked by slot, plus per-slot views the kernels reuse.

    The views are kept in Python lists so a step does no indexing to find a slot's
    weights: shrink[slot] is A[slot, :rank].T and expand[slot] is b_t[slot, :rank], or
    None when the slot does not adapt this projection.
    """

    a: torch.Tensor  # [num_slots, max_rank, in]
    b_t: torch.Tensor  # [num_slots, max_rank, out]
    scale: torch.Tensor  # [num_slots]
    ranks: list[int] = field(init=False)
    scales: list[float] = field(init=False)
    shrink: list[torch.Tensor | None] = field(init=False)  # [in, rank] views
    expand: list[torch.Tensor | None] = field(init=False)  # [rank, out] views

    def __post_init__(self) -> None:
        num_slots = self.a.shape[0]
        self.ranks = [0] * num_slots
        self.scales = [0.0] * num_slots
        self.shrink = [None] * num_slots
        self.expand = [None] * num_slots

    def set_slot(self, slot: int, rank: int, scale: float) -> None:
        self.ranks[slot] = rank
        self.scales[slot] = scale
        self.scale[slot] = scale
        self.shrink[slot] = self.a[slot, :rank].T if rank else None
        self.expand[slot] = self.b_t[slot, :rank] if rank else None


@dataclass(frozen=True, slots=True)
class LoRABatch:
    """A step's slot ids, prepared once per forward and shared by every projection."""

    slot_ids: torch.Tensor  # [num_tokens], int64, on the weights' device
    segments: tuple[tuple[int, int, int], ...]  # (slot, start, end) runs, slot != 0
    slots: tuple[int, ...]  # distinct non-zero slots present
    kernel: Kernel

    @property
    def empty(self) -> bool:
        return not self.segments

    @classmethod
    def build(
        cls, slot_ids: Sequence[int], device: torch.device | str, kernel: Kernel = "sgmv"
    ) -> LoRABatch:
        segments: list[tuple[int, int, int]] = []
        start = 0
        for i in range(1, len(slot_ids) + 1):
            if i == len(slot_ids) or slot_ids[i] != slot_ids[start]:
                if slot_ids[start] != 0:
                    segments.append((slot_ids[start], start, i))
                start = i
        slots = tuple(sorted({slot for slot, _, _ in segments}))
        ids = torch.tensor(list(slot_ids), dtype=torch.int64, device=device)
        return cls(slot_ids=ids, segments=tuple(segments), slots=slots, kernel=kernel)


def add_lora(y: torch.Tensor, x: torch.Tensor, stack: LoRAStack, batch: LoRABatch) -> None:
    """y += the LoRA delta of each token's slot, in place (see the module docstring)."""
    if batch.empty:
        return
    if batch.kernel == "sgmv":
        sgmv(y, x, stack, batch)
    else:
        bgmv(y, x, stack, batch)


def sgmv(y: torch.Tensor, x: torch.Tensor, stack: LoRAStack, batch: LoRABatch) -> None:
    # x: [num_tokens, in]  y: [num_tokens, out]
    whole = len(batch.segments) == 1 and batch.segments[0][1:] == (0, x.shape[0])
    for slot, start, end in batch.segments:
        shrink, expand = stack.shrink[slot], stack.expand[slot]
        if shrink is None or expand is None:
            continue
        if whole:
            y.addmm_(torch.mm(x, shrink), expand, alpha=stack.scales[slot])
        else:
            y[start:end].addmm_(torch.mm(x[start:end], shrink), expand, alpha=stack.scales[slot])


def bgmv(y: torch.Tensor, x: torch.Tensor, stack: LoRAStack, batch: LoRABatch) -> None:
    # x: [num_tokens, in]  y: [num_tokens, out]
    rank = max(stack.ranks[slot] for slot in batch.slots)
    if rank == 0:
        return
    a = stack.a[:, :rank].index_select(0, batch.slot_ids)  # [num_tokens, rank, in]
    h = torch.bmm(x.unsqueeze(1), a.transpose(1, 2))  # [num_tokens, 1, rank]
    h.mul_(stack.scale.index_select(0, batch.slot_ids).view(-1, 1, 1))
    b_t = stack.b_t[:, :rank].index_select(0, batch.slot_ids)  # [num_tokens, rank, out]
    y.unsqueeze(1).baddbmm_(h, b_t)
