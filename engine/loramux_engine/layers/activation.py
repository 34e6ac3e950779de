"""SwiGLU's gate: silu(gate) * up; on CUDA one Triton launch (kernels/triton_fused.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loramux_engine.kernels.triton_support import use_triton


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    # gate, up: [num_tokens, intermediate]
    if use_triton(gate.device.type):
        from loramux_engine.kernels import triton_fused

        return triton_fused.silu_and_mul(gate, up)
    return F.silu(gate).mul_(up)
