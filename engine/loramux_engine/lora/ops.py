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

Three kernels with the same semantics:

- sgmv: one (shrink, expand) matmul pair per run of consecutive tokens on one slot; the
  weights are read once per run and never copied. Best with one or two adapters.
- bmm: tokens grouped by slot into a zero-padded ``[num_slots_in_range, width, in]``
  gather of x; one batched shrink and one batched expand per projection over a view of
  the pool's slot range (no weight copy), ranks trimmed to the largest in that range,
  then an index_add back into y. A fixed handful of ops whatever the number of adapters.
- bgmv: gather A[s] and B[s] per token, then two batched matmuls; it copies rank x
  (in + out) weights per token.
- triton (CUDA): kernels/triton_lora.py, one shrink and one expand launch per projection
  over the runs cut into tiles; "auto" takes it on CUDA whenever triton is installed.
- runs (CPU, fp32): kernels/lora_runs.c, runs cut into pieces of up to 64 tokens, each
  reading its slot's A and B rows once for all its tokens (blocks of 4 tokens x 4 ranks
  in registers); no padding, no gather, one call per projection, on torch's threads.

Measured with bench_ops.py on SmolLM2-135M's 210 projections, rank 16, one thread: sgmv
with tokens grouped by slot costs +9% / +22% / +69% over the base matmuls at 16 tokens
and 1 / 4 / 16 adapters, +7% / +11% / +25% at 256 tokens; bgmv +37% / +44% / +73% and
+392% / +397% / +190% (it copies weights per token). sgmv's cost with many adapters is
per-segment dispatch, which bmm removes. bmm pays for padding and its gather: on a
2,048-token prefill step of 15 prompts of 16 to 256 tokens on 16 adapters (two threads),
sgmv adds 19% to the base matmuls and bmm 31%.

On a CPU in fp32, "auto" (the default) uses the runs kernel for every run: against sgmv
it adds 18% instead of 22% to that prefill step, and over the SmolLM2 `bench lora`
workload (64 requests on 16 rank-16 adapters) the engine's LoRA time went from 3.1 s
(bmm) to 0.9 s in prefill and from 2.4 s to 1.9 s in decode. Elsewhere "auto"
sends every run of at least SGMV_MIN_TOKENS tokens to sgmv, where its matmuls are big
enough, and the short runs to bmm when there are at least BMM_MIN_SEGMENTS of them and
padding at most doubles their rows, else to sgmv.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from loramux_engine.kernels import lora_runs
from loramux_engine.kernels.triton_support import use_triton

Kernel = Literal["auto", "sgmv", "bmm", "bgmv", "runs", "triton"]
BMM_MIN_SEGMENTS = 3
SGMV_MIN_TOKENS = 32


@dataclass(frozen=True, slots=True)
class SlotGroups:
    """The bmm kernel's layout: tokens of slots first .. first + num_slots - 1, by slot."""

    first: int
    num_slots: int
    width: int  # tokens of the busiest slot; other slots are padded to it
    index: torch.Tensor  # [num_slots * width] token row per position, pads point at row 0
    mask: torch.Tensor  # [num_slots, width, 1] 1 for a token, 0 for a pad (x's dtype)
    # Set when rows [dense_start, dense_start + num_slots * width) are already this layout
    # (sorted by slot, every slot with `width` tokens): then x and y are used as views.
    dense_start: int | None = None

    @classmethod
    def build(
        cls, slot_ids: Sequence[int], device: torch.device | str, dtype: torch.dtype
    ) -> SlotGroups:
        rows: dict[int, list[int]] = {}
        for i, slot in enumerate(slot_ids):
            if slot:
                rows.setdefault(slot, []).append(i)
        first, last = min(rows), max(rows)
        width = max(len(r) for r in rows.values())
        index = [0] * ((last - first + 1) * width)
        mask = [0.0] * len(index)
        for slot, tokens in rows.items():
            at = (slot - first) * width
            index[at : at + len(tokens)] = tokens
            mask[at : at + len(tokens)] = [1.0] * len(tokens)
        num_slots = last - first + 1
        start = index[0]
        dense = len(rows) == num_slots and index == list(range(start, start + len(index)))
        return cls(
            first=first,
            num_slots=num_slots,
            width=width,
            index=torch.tensor(index, dtype=torch.int64, device=device),
            mask=torch.tensor(mask, dtype=dtype, device=device).view(num_slots, width, 1),
            dense_start=start if dense else None,
        )


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
    rank_ids: torch.Tensor = field(init=False)  # [num_slots] int64 on CPU: the runs kernel's
    slot_ranks: torch.Tensor = field(init=False)  # [num_slots] int32 on the device: Triton's
    scales: list[float] = field(init=False)
    shrink: list[torch.Tensor | None] = field(init=False)  # [in, rank] views
    expand: list[torch.Tensor | None] = field(init=False)  # [rank, out] views

    def __post_init__(self) -> None:
        num_slots = self.a.shape[0]
        self.ranks = [0] * num_slots
        self.rank_ids = torch.zeros(num_slots, dtype=torch.int64)
        self.slot_ranks = torch.zeros(num_slots, dtype=torch.int32, device=self.a.device)
        self.scales = [0.0] * num_slots
        self.shrink = [None] * num_slots
        self.expand = [None] * num_slots

    def set_slot(self, slot: int, rank: int, scale: float) -> None:
        self.ranks[slot] = rank
        self.rank_ids[slot] = rank
        self.slot_ranks[slot] = rank
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
    kernel: Kernel  # never "auto": build resolves it
    groups: SlotGroups | None = None  # the bmm kernel's layout
    # Runs that sgmv handles whatever `kernel` is: all of them for "sgmv", the long ones
    # when "auto" chose bmm for the short ones.
    sgmv_segments: tuple[tuple[int, int, int], ...] = ()
    runs: torch.Tensor | None = None  # [num_runs, 3] (slot, start, end) for "runs", on CPU
    tiles: torch.Tensor | None = None  # [num_tiles, 3] int32 for "triton", on the device
    # Set by ``fixed``: the tiles are a buffer filled before each replay of a CUDA graph.
    fixed_tiles: bool = False

    @property
    def empty(self) -> bool:
        return not self.segments and not self.fixed_tiles

    @classmethod
    def fixed(cls, slot_ids: torch.Tensor, tiles: torch.Tensor) -> LoRABatch:
        """A "triton" batch over buffers a CUDA graph reads (engine/cuda_graphs.py): which
        runs they hold is only known when the graph replays, so none are recorded here."""
        return cls(slot_ids, (), (), "triton", tiles=tiles, fixed_tiles=True)

    @classmethod
    def build(
        cls,
        slot_ids: Sequence[int],
        device: torch.device | str,
        kernel: Kernel = "auto",
        dtype: torch.dtype = torch.float32,
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
        groups, runs = None, None
        sgmv_segments = tuple(segments) if kernel == "sgmv" else ()
        if kernel == "auto":
            kernel, sgmv_segments = _choose(segments, device, dtype)
        if kernel == "runs":
            runs = _runs_tensor(segments)
        tiles = None
        if kernel == "triton":
            from loramux_engine.kernels import triton_lora

            tiles = triton_lora.tiles(segments, device)
        if kernel == "bmm" and segments:
            bmm_ids = list(slot_ids)
            for _, start, end in sgmv_segments:
                bmm_ids[start:end] = [0] * (end - start)
            groups = SlotGroups.build(bmm_ids, device, dtype)
        return cls(
            slot_ids=ids,
            segments=tuple(segments),
            slots=slots,
            kernel=kernel,
            groups=groups,
            sgmv_segments=sgmv_segments,
            runs=runs,
            tiles=tiles,
        )


def _choose(
    segments: list[tuple[int, int, int]], device: torch.device | str, dtype: torch.dtype
) -> tuple[Kernel, tuple[tuple[int, int, int], ...]]:
    """The "auto" rule of the module docstring: (kernel for the short runs, sgmv's runs)."""
    device_type = torch.device(device).type
    if device_type == "cpu" and dtype == torch.float32 and lora_runs.load():
        return "runs", ()
    if use_triton(device_type):
        return "triton", ()
    long = tuple(seg for seg in segments if seg[2] - seg[1] >= SGMV_MIN_TOKENS)
    short = [seg for seg in segments if seg[2] - seg[1] < SGMV_MIN_TOKENS]
    if not short:
        return "sgmv", long
    if len(short) >= BMM_MIN_SEGMENTS:
        tokens: dict[int, int] = {}
        for slot, start, end in short:
            tokens[slot] = tokens.get(slot, 0) + end - start
        num_slots = max(tokens) - min(tokens) + 1
        if num_slots * max(tokens.values()) <= 2 * sum(tokens.values()):
            return "bmm", long
    return "sgmv", tuple(segments)


def _runs_tensor(runs: list[tuple[int, int, int]]) -> torch.Tensor:
    """The runs kernel's work items: each run cut into pieces of at most MAX_RUN_TOKENS."""
    step = lora_runs.MAX_RUN_TOKENS
    pieces = [
        (slot, lo, min(lo + step, end))
        for slot, start, end in runs
        for lo in range(start, end, step)
    ]
    return torch.tensor(pieces, dtype=torch.int64).view(-1, 3)


def add_lora(y: torch.Tensor, x: torch.Tensor, stack: LoRAStack, batch: LoRABatch) -> None:
    """y += the LoRA delta of each token's slot, in place (see the module docstring)."""
    if batch.empty:
        return
    if batch.sgmv_segments:
        sgmv(y, x, stack, batch.sgmv_segments)
    if batch.kernel == "runs":
        runs_kernel(y, x, stack, batch)
    elif batch.kernel == "bmm":
        bmm(y, x, stack, batch)
    elif batch.kernel == "bgmv":
        bgmv(y, x, stack, batch)
    elif batch.kernel == "triton":
        from loramux_engine.kernels import triton_lora

        assert batch.tiles is not None
        triton_lora.add_lora(y, x, stack.a, stack.b_t, stack.scale, stack.slot_ranks, batch.tiles)


def sgmv(
    y: torch.Tensor,
    x: torch.Tensor,
    stack: LoRAStack,
    segments: Sequence[tuple[int, int, int]],
) -> None:
    # x: [num_tokens, in]  y: [num_tokens, out]; segments: (slot, start, end) runs
    whole = len(segments) == 1 and segments[0][1:] == (0, x.shape[0])
    for slot, start, end in segments:
        shrink, expand = stack.shrink[slot], stack.expand[slot]
        if shrink is None or expand is None:
            continue
        if whole:
            y.addmm_(torch.mm(x, shrink), expand, alpha=stack.scales[slot])
        else:
            y[start:end].addmm_(torch.mm(x[start:end], shrink), expand, alpha=stack.scales[slot])


def runs_kernel(y: torch.Tensor, x: torch.Tensor, stack: LoRAStack, batch: LoRABatch) -> None:
    # x: [num_tokens, in]  y: [num_tokens, out]
    assert batch.runs is not None
    library = lora_runs.load()
    if library is not None and lora_runs.supports(x, y, stack.a, stack.b_t):
        lora_runs.lora_runs(
            library, y, x, stack.a, stack.b_t, stack.scale, stack.rank_ids, batch.runs
        )
    else:
        sgmv(y, x, stack, [tuple(run) for run in batch.runs.tolist()])


def bmm(y: torch.Tensor, x: torch.Tensor, stack: LoRAStack, batch: LoRABatch) -> None:
    # x: [num_tokens, in]  y: [num_tokens, out]
    g = batch.groups
    if g is None:
        return
    end = g.first + g.num_slots
    rank = max(stack.ranks[g.first : end])
    if rank == 0:
        return
    a_t = stack.a[g.first : end, :rank].transpose(1, 2)  # [slots, in, rank]
    b_t = stack.b_t[g.first : end, :rank]  # [slots, rank, out]
    scale = stack.scale[g.first : end].view(-1, 1, 1)
    if g.dense_start is not None:  # no gather, no pads, the delta added in place
        rows = slice(g.dense_start, g.dense_start + g.num_slots * g.width)
        h = torch.bmm(x[rows].reshape(g.num_slots, g.width, -1), a_t)  # [slots, width, rank]
        h.mul_(scale)
        y[rows].view(g.num_slots, g.width, -1).baddbmm_(h, b_t)
        return
    xg = x.index_select(0, g.index).view(g.num_slots, g.width, -1)  # [slots, width, in]
    h = torch.bmm(xg, a_t)  # [slots, width, rank]
    h.mul_(scale)
    # Pads read row 0, another request's token: times a hostile slot's huge weights their
    # h is inf, and inf * 0 is NaN, so pads are zeroed in the delta, not multiplied by 0.
    delta = torch.bmm(h, b_t).masked_fill_(g.mask == 0, 0.0)  # [slots, width, out]
    y.index_add_(0, g.index, delta.view(g.num_slots * g.width, -1))


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
