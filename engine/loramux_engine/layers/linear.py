"""The projection layer every q/k/v/o/gate/up/down weight goes through.

Multi-LoRA attaches here: the batch's per-token adapter slots are in
``get_context().slot_ids`` and each layer knows its ``projection`` name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, projection: str) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.projection = projection  # "q_proj", "k_proj", ..., "down_proj"
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, in_features] -> [num_tokens, out_features]
        return F.linear(x, self.weight, self.bias)
