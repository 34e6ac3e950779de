"""The projection layer every q/k/v/o/gate/up/down weight (and the LM head) goes through.

Multi-LoRA attaches here: the runner points ``lora_stack`` at this projection's stack in
the slot pool, and each step's ``get_context().lora_batch`` says which slot each token uses.

On a CPU in fp32 the runner can hand the weight to oneDNN (``pack_for_onednn``): the weight
is reordered once into oneDNN's blocked layout and every step's matmul runs through
oneDNN's JIT kernels instead of torch's default BLAS (MKL). MKL only takes its fast code
paths on Intel CPUs; on an AMD EPYC (Zen 5) oneDNN measured 2.0 to 2.8 times MKL's speed
on SmolLM2-135M's projection shapes from 16 to 2,048 tokens; at 1 token it is within a few
microseconds of MKL, and 3 times faster on the LM head. Both compute in fp32; the sums are
ordered differently, so results differ in the last bits.

With weight-only quantization (``quantize``, layers/quant.py) the weight is held as int8 or
int4 codes and the base matmul runs through torch's mixed-precision kernel for them; LoRA is
still added on top in the activation dtype.

For steps of up to 64 tokens (decode) the runner can instead keep the plain weight and run
them through kernels/gemv.c (``use_gemv``): at one token a matrix-vector product at the
speed of reading the weight. Over SmolLM2-135M's 210 projection weights (425 MB, cold, one
thread of a 2.8 GHz Xeon, CPU time) it took 39 ms at 1 token where oneDNN's packed matmul
took 54, 52 against 80 at 8 tokens, 111 against 132 at 32, and 198 against 200 at 64. One
copy of each weight stays: larger steps run oneDNN on the plain weight (from 64 to 1,024
tokens between 0.93 and 1.23 times the packed weight's time there, noisy), and a tied LM
head reads the embedding's weight instead of a packed copy of its own (113 MB less for
SmolLM2).
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from loramux_engine.kernels import gemv
from loramux_engine.layers.quant import QuantizedWeight, quantize_weight
from loramux_engine.lora.ops import LoRAStack, add_lora
from loramux_engine.utils.context import get_context


def onednn_available() -> bool:
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, projection: str) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.projection = projection  # "q_proj", "k_proj", ..., "down_proj", "lm_head"
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.lora_stack: LoRAStack | None = None
        # oneDNN's opaque copy of the weight, set by pack_for_onednn
        self.onednn_weight: torch.Tensor | None = None
        # the int8 / int4 weight, set by quantize
        self.quantized: QuantizedWeight | None = None
        # gemv.c for steps of up to gemv.MAX_TOKENS, oneDNN on the plain weight for more
        self.gemv: ctypes.CDLL | None = None
        self.onednn_plain = False

    def quantize(self, mode: str, group_size: int) -> None:
        """Hold the weight as ``mode`` codes (layers/quant.py) and drop the plain copy.

        A weight shared with another module (the tied embedding) keeps its plain copy there,
        unquantized.
        """
        weight = self.weight.detach()
        self.quantized = quantize_weight(weight, mode, weight.dtype, group_size)
        self.weight = nn.Parameter(weight.new_empty(0), requires_grad=False)

    def pack_for_onednn(self) -> None:
        """Reorder the weight for oneDNN (CPU, fp32) and drop the plain copy.

        A weight shared with another module (a tied LM head) keeps its plain copy there. A
        quantized weight keeps its own kernel.
        """
        if self.quantized is not None:
            return
        self.onednn_weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)
        self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)

    def use_gemv(self, library: ctypes.CDLL, onednn: bool) -> None:
        """Keep the plain weight (CPU, fp32): steps of up to ``gemv.MAX_TOKENS`` tokens
        through kernels/gemv.c, larger ones through oneDNN on it (``onednn``) or F.linear.
        A quantized weight keeps its own kernel."""
        if self.quantized is not None:
            return
        if not self.weight.is_contiguous():
            self.weight = nn.Parameter(self.weight.detach().contiguous(), requires_grad=False)
        self.gemv, self.onednn_plain = library, onednn

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, in_features] -> x @ W.T + b: [num_tokens, out_features]
        if self.gemv is not None:
            if x.shape[0] <= gemv.MAX_TOKENS and x.stride(1) == 1:
                return gemv.gemv(self.gemv, x, self.weight, self.bias)
            if self.onednn_plain:
                return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        if self.quantized is not None:
            y = self.quantized.matmul(x)
            return y if self.bias is None else y.add_(self.bias)
        if self.onednn_weight is not None:
            return torch.ops.mkldnn._linear_pointwise(
                x, self.onednn_weight, self.bias, "none", [], ""
            )
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, in_features] -> [num_tokens, out_features]
        y = self.matmul(x)
        if self.lora_stack is not None:
            batch = get_context().lora_batch
            if batch is not None:
                add_lora(y, x, self.lora_stack, batch)
        return y
