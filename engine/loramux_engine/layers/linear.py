"""The projection layer every q/k/v/o/gate/up/down weight goes through.

Multi-LoRA attaches here: the runner points ``lora_stack`` at this projection's stack in
the slot pool, and each step's ``get_context().lora_batch`` says which slot each token uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loramux_engine.lora.ops import LoRAStack, add_lora
from loramux_engine.utils.context import get_context


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, projection: str) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.projection = projection  # "q_proj", "k_proj", ..., "down_proj"
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.lora_stack: LoRAStack | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, in_features] -> [num_tokens, out_features]
        y = F.linear(x, self.weight, self.bias)
        if self.lora_stack is not None:
            batch = get_context().lora_batch
            if batch is not None:
                add_lora(y, x, self.lora_stack, batch)
        return y
