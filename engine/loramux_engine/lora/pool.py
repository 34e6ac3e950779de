"""Preallocated slots of stacked LoRA weights, one stack per (layer, projection).

Slot 0 is reserved for "no adapter" and stays zero. Loading writes into the existing
tensors (zero-padding ranks, zeroing projections the adapter leaves alone), so a step
never allocates. Invariant: in every stack, a slot's rows from its rank on are zero.
Writes happen on the engine thread, between steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loramux_engine.lora.adapter import LoRAAdapter
from loramux_engine.lora.ops import LoRAStack
from loramux_engine.lora.shape import PROJECTIONS, BaseModelShape


def bytes_per_slot(
    shape: BaseModelShape,
    max_rank: int,
    dtype: torch.dtype,
    projections: Sequence[str] = PROJECTIONS,
) -> int:
    """Device bytes one slot takes across every layer's stacks (A, B and the scale)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_layer = sum(max_rank * sum(shape.features(p)) + 1 for p in projections)
    return shape.num_layers * per_layer * itemsize


class LoRASlotPool:
    def __init__(
        self,
        shape: BaseModelShape,
        num_slots: int,
        max_rank: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        projections: Sequence[str] = PROJECTIONS,
    ) -> None:
        if num_slots < 2:
            raise ValueError("num_slots must be at least 2: slot 0 is reserved for no adapter")
        if max_rank < 1:
            raise ValueError("max_rank must be positive")
        self.shape = shape
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.projections = tuple(projections)
        self.stacks: dict[tuple[int, str], LoRAStack] = {}
        for layer in range(shape.num_layers):
            for projection in self.projections:
                in_features, out_features = shape.features(projection)
                self.stacks[(layer, projection)] = LoRAStack(
                    a=torch.zeros(num_slots, max_rank, in_features, device=device, dtype=dtype),
                    b_t=torch.zeros(num_slots, max_rank, out_features, device=device, dtype=dtype),
                    scale=torch.zeros(num_slots, device=device, dtype=dtype),
                )
        self.slot_bytes = bytes_per_slot(shape, max_rank, dtype, self.projections)

    @classmethod
    def slots_for_budget(
        cls,
        shape: BaseModelShape,
        max_rank: int,
        dtype: torch.dtype,
        budget_bytes: int,
        projections: Sequence[str] = PROJECTIONS,
    ) -> int:
        """How many slots (slot 0 included) a device byte budget pays for."""
        return budget_bytes // bytes_per_slot(shape, max_rank, dtype, projections)

    def stack(self, layer: int, projection: str) -> LoRAStack:
        return self.stacks[(layer, projection)]

    def _check_slot(self, slot: int) -> None:
        if not 1 <= slot < self.num_slots:
            raise ValueError(f"slot must be in 1..{self.num_slots - 1}, got {slot}")

    def load(self, slot: int, adapter: LoRAAdapter) -> None:
        """Write an adapter into a slot, replacing whatever was there.

        Raises ValueError, before writing anything, when the adapter does not fit this
        pool. Should a write fail part way, the slot is zeroed before the error goes on,
        so the slot is as good as free and the invariant holds.
        """
        self._check_slot(slot)
        self._check_fits(adapter)
        try:
            for key, stack in self.stacks.items():
                weights = adapter.weights.get(key)
                rank = 0 if weights is None else weights.rank
                self._zero_rows(stack, slot, rank)
                if weights is not None:
                    stack.a[slot, :rank].copy_(weights.a)
                    stack.b_t[slot, :rank].copy_(weights.b.T)
                stack.set_slot(slot, rank, 0.0 if weights is None else weights.scale)
        except BaseException:
            self._reset(slot)
            raise

    def _check_fits(self, adapter: LoRAAdapter) -> None:
        if adapter.config.max_rank > self.max_rank:
            raise ValueError(f"adapter rank {adapter.config.max_rank} > pool max {self.max_rank}")
        unknown = {projection for _, projection in adapter.weights} - set(self.projections)
        if unknown:
            raise ValueError(f"the pool holds no stacks for {sorted(unknown)}")
        for (layer, projection), weights in adapter.weights.items():
            if (layer, projection) not in self.stacks:
                raise ValueError(f"the pool holds no layer {layer}")
            in_features, out_features = self.shape.features(projection)
            rank = weights.rank
            if not 1 <= rank <= self.max_rank or (
                tuple(weights.a.shape) != (rank, in_features)
                or tuple(weights.b.shape) != (out_features, rank)
            ):
                raise ValueError(
                    f"layer {layer} {projection}: A {list(weights.a.shape)} and B "
                    f"{list(weights.b.shape)} do not fit this pool"
                )

    def clear(self, slot: int) -> None:
        self._check_slot(slot)
        for stack in self.stacks.values():
            self._zero_rows(stack, slot, 0)
            stack.set_slot(slot, 0, 0.0)

    def _reset(self, slot: int) -> None:
        # Every row, not only those the ranks record: a failed write may have left rows
        # that no rank covers.
        for stack in self.stacks.values():
            stack.a[slot].zero_()
            stack.b_t[slot].zero_()
            stack.set_slot(slot, 0, 0.0)

    @staticmethod
    def _zero_rows(stack: LoRAStack, slot: int, keep: int) -> None:
        # Rows at or past a slot's rank are always zero, so only the rows the previous
        # adapter used beyond `keep` need zeroing: a load writes its adapter's bytes, not
        # the whole max_rank slot.
        used = stack.ranks[slot]
        if used > keep:
            stack.a[slot, keep:used].zero_()
            stack.b_t[slot, keep:used].zero_()
