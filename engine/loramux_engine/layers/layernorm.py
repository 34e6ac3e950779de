"""RMSNorm, computed in float32 as the reference implementation does.

``add_and_norm`` also adds the residual stream first, as the decoder layers need before
each norm; on CUDA both are one Triton launch (kernels/triton_fused.py), on a CPU in fp32
one C call (kernels/cpu_fused.c, bound by the runner as ``cpu_kernel``), elsewhere torch.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from loramux_engine.kernels import cpu_fused
from loramux_engine.kernels.triton_support import use_triton


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.cpu_kernel: ctypes.CDLL | None = None  # cpu_fused.c, bound on CPU in fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, hidden]
        if self.cpu_kernel is not None and x.dtype == torch.float32:
            return cpu_fused.rms_norm(self.cpu_kernel, x, self.weight, self.eps)[0]
        if use_triton(x.device.type):
            from loramux_engine.kernels import triton_fused

            return triton_fused.rms_norm(x, self.weight, self.eps)[0]
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def add_and_norm(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the normed input of the next block and the
        residual stream it adds to. x, residual: [num_tokens, hidden]."""
        if self.cpu_kernel is not None and x.dtype == torch.float32:
            out, summed = cpu_fused.rms_norm(self.cpu_kernel, x, self.weight, self.eps, residual)
            assert summed is not None
            return out, summed
        if use_triton(x.device.type):
            from loramux_engine.kernels import triton_fused

            return triton_fused.rms_norm(x, self.weight, self.eps, residual)
        x = x + residual
        return self.forward(x), x
