"""Rotary position embedding with the scaling variants LLaMA-family configs use.

On CUDA one Triton launch rotates q and k (kernels/triton_fused.py); on a CPU in fp32 one C
call, in place (kernels/cpu_fused.c, bound by the runner as ``cpu_kernel``); else torch.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from loramux_engine.errors import ModelLoadError
from loramux_engine.kernels import cpu_fused
from loramux_engine.kernels.triton_support import use_triton


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: Mapping[str, Any]) -> torch.Tensor:
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    old_context_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_inv_freq(
    head_dim: int, theta: float, scaling: Mapping[str, Any], max_model_len: int, max_trained: int
) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] for the config's ``rope_type``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    # Dynamic NTK only departs from the default beyond the trained context.
    if rope_type == "dynamic" and max_model_len <= max_trained:
        return inv_freq
    raise ModelLoadError(f"rope scaling {rope_type!r} is not supported (at {max_model_len=})")


class RotaryEmbedding(nn.Module):
    cos_sin: torch.Tensor

    def __init__(self, inv_freq: torch.Tensor, max_model_len: int) -> None:
        super().__init__()
        freqs = torch.outer(torch.arange(max_model_len, dtype=torch.float32), inv_freq.float())
        # cos_sin: [max_model_len, 2, head_dim // 2], built once, indexed by position
        self.register_buffer(
            "cos_sin", torch.stack([freqs.cos(), freqs.sin()], 1), persistent=False
        )
        self.cpu_kernel: ctypes.CDLL | None = None  # cpu_fused.c, bound on CPU in fp32

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [num_tokens]; q: [num_tokens, heads, dim]; k: [num_tokens, kv_heads, dim]
        if self.cpu_kernel is not None and q.dtype == torch.float32:  # in place
            return cpu_fused.rotary(self.cpu_kernel, positions, q, k, self.cos_sin)
        if use_triton(q.device.type):  # one launch for q and k (kernels/triton_fused.py)
            from loramux_engine.kernels import triton_fused

            return triton_fused.rotary(positions, q, k, self.cos_sin)
        cos_sin = self.cos_sin[positions].unsqueeze(2)
        cos, sin = cos_sin[:, 0], cos_sin[:, 1]
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
