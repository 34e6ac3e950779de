"""Weight-only quantization of the base model's projections and LM head.

Two schemes, each with its quantize/dequantize pair (the reference, in fp32):

- ``int8``: per output channel, symmetric. ``w[n, k] ~= q[n, k] * scale[n]``, ``q`` in
  [-127, 127].
- ``int4``: groups of ``group_size`` consecutive input weights in a row, asymmetric, with a
  scale and a minimum per group held in fp16, as GGUF's Q4_1 holds them:
  ``w[n, k] ~= q[n, k] * scale[n, g] + min[n, g]``, ``q`` in [0, 15], ``g = k // group_size``.

The packed weights multiply without a per-step dequantize:

- CPU, fp32 activations: kernels/quant_matmul.c widens the codes in registers (int4 weights
  rebuilt bit for bit as the reference's). torch's ``_weight_int8pack_mm`` and
  ``_weight_int4pack_mm_for_cpu`` take fp32 too, but torch 2.13 vectorizes them for
  bfloat16 only: in fp32 they measured 5 to 200 times slower than oneDNN's fp32 matmul here.
  From ``DENSE_MIN_TOKENS`` tokens (prefill) the step dequantizes once and runs a dense matmul.
- Elsewhere (bfloat16 or float16, CUDA, or no C compiler): torch's kernels,
  ``_weight_int8pack_mm`` and ``_weight_int4pack_mm_for_cpu`` / tinygemm's
  ``_weight_int4pack_mm`` (CUDA, bfloat16), whose int4 layout takes a scale and a zero per
  group with ``w = (q - 8) * scale + zero``, so ``zero = min + 8 * scale``.

Q4_1 stores ``d`` and ``m`` in fp16 and decodes ``d * q + m``; a group decoded that way holds
its minimum (q = 0) and its maximum (q = 15), so quantizing the decoded weights again finds
the same fp16 scale and minimum and the same codes: ``int4`` at group size 32 gives back
SmolLM2's shipped weights exactly (tests/engine/test_quantization.py checks it on the real
model).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loramux_engine.kernels import quant_matmul

QUANTIZATION_MODES = ("none", "int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what both int4 kernels take
_INT8_MAX = 127
_INT4_MAX = 15
_INT4_MID = 8
# _convert_weight_to_int4pack (CUDA tinygemm): inner k tiles of 16 weights, the most that fit
_INNER_K_TILES = (8, 4, 2)
_ROW_TILE = 16  # output rows per tile in both torch int4 kernels' layouts
# From this many tokens a step dequantizes the weight and runs a dense fp32 matmul: widening
# the codes for every four tokens cost 1.6 to 2.2 times oneDNN's fp32 matmul at 64 to 256
# tokens, dequantizing 0.2 ms per SmolLM2 MLP weight (1 thread, 2.8 GHz Xeon).
DENSE_MIN_TOKENS = 128


class QuantizationError(ValueError):
    """A weight cannot be quantized as asked (its shape, its values, the device)."""


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight: [out, in]`` -> ``q: [out, in] int8``, ``scale: [out] float32``."""
    w = weight.detach().float()
    if w.dim() != 2 or w.numel() == 0:
        raise QuantizationError(f"int8 needs a non-empty 2-D weight, not {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise QuantizationError("weight holds non-finite values")
    scale = w.abs().amax(dim=1) / _INT8_MAX
    # an all-zero row keeps q = 0 whatever its scale; 1 avoids a 0 / 0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / safe[:, None]).clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q: [out, in] int8``, ``scale: [out]`` -> ``[out, in] float32``."""
    return q.float() * scale.float()[:, None]


def _check_int4_shape(shape: tuple[int, ...], group_size: int) -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise QuantizationError(
            f"int4 group size must be one of {INT4_GROUP_SIZES}, not {group_size}"
        )
    if len(shape) != 2 or 0 in shape:
        raise QuantizationError(f"int4 needs a non-empty 2-D weight, not {shape}")
    if shape[1] % group_size:
        sizes = [g for g in INT4_GROUP_SIZES if shape[1] % g == 0]
        hint = f"group sizes that divide it: {sizes}" if sizes else "no int4 group size divides it"
        raise QuantizationError(
            f"int4 groups of {group_size} do not divide the input width {shape[1]} ({hint})"
        )


def quantize_int4(
    weight: torch.Tensor, group_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight: [out, in]`` -> ``q: [out, in] uint8`` in [0, 15], ``scale, min: [out, in /
    group_size] float16``. ``in`` must be a multiple of ``group_size``.
    """
    _check_int4_shape(tuple(weight.shape), group_size)
    w = weight.detach().float()
    if not torch.isfinite(w).all():
        raise QuantizationError("weight holds non-finite values")
    groups = w.view(w.shape[0], -1, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / _INT4_MAX).half()
    minimum = low.half()
    if not (torch.isfinite(scale).all() and torch.isfinite(minimum).all()):
        raise QuantizationError("weight values exceed float16's range for int4 scales")
    s, m = scale.float()[..., None], minimum.float()[..., None]
    # a constant group (or one whose scale rounds to 0 in fp16) keeps q = 0: every weight at min
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round((groups - m) / safe).clamp_(0, _INT4_MAX)
    q = torch.where(s > 0, q, torch.zeros_like(q))
    return q.to(torch.uint8).view(w.shape), scale, minimum


def dequantize_int4(
    q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, group_size: int = 32
) -> torch.Tensor:
    """The inverse of ``quantize_int4``: ``[out, in] float32``, ``q * scale + min`` per group."""
    groups = q.float().view(q.shape[0], -1, group_size)
    w = groups * scale.float()[..., None] + minimum.float()[..., None]
    return w.view(q.shape)


def fake_quantize(weight: torch.Tensor, mode: str, group_size: int = 32) -> torch.Tensor:
    """``weight`` as the ``mode`` kernels see it, in fp32: the reference for the engine."""
    if mode == "int8":
        return dequantize_int8(*quantize_int8(weight))
    if mode == "int4":
        return dequantize_int4(*quantize_int4(weight, group_size), group_size=group_size)
    raise QuantizationError(f"quantization must be int8 or int4 here, not {mode!r}")


def _cpu_kernel(weight: torch.Tensor, dtype: torch.dtype) -> ctypes.CDLL | None:
    """quant_matmul.c for a CPU fp32 engine; None elsewhere (or where it cannot be built)."""
    if weight.device.type != "cpu" or dtype != torch.float32:
        return None
    return quant_matmul.load()


def _check_device(weight: torch.Tensor, mode: str) -> None:
    if weight.device.type not in ("cpu", "cuda"):
        raise QuantizationError(f"{mode} weights run on CPU or CUDA, not {weight.device.type}")


@dataclass(slots=True)
class Int8Weight:
    qweight: torch.Tensor  # [out, in] int8
    scale: torch.Tensor  # [out], the activation dtype
    kernel: ctypes.CDLL | None  # quant_matmul.c; None: torch's _weight_int8pack_mm

    @classmethod
    def from_weight(cls, weight: torch.Tensor, dtype: torch.dtype) -> Int8Weight:
        _check_device(weight, "int8")
        q, scale = quantize_int8(weight)
        kernel = _cpu_kernel(weight, dtype) if weight.shape[1] % 16 == 0 else None
        return cls(q.to(weight.device), scale.to(device=weight.device, dtype=dtype), kernel)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.qweight, self.scale)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, in] -> [num_tokens, out]
        if self.kernel is None:
            return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scale)
        x = x if x.stride(1) == 1 else x.contiguous()
        if x.shape[0] >= DENSE_MIN_TOKENS:
            dense = quant_matmul.int8_dequantize(self.kernel, self.qweight, self.scale)
            return F.linear(x, dense)
        return quant_matmul.int8_matmul(self.kernel, x, self.qweight, self.scale)


@dataclass(slots=True)
class Int4Weight:
    packed: torch.Tensor  # the kernel's own layout of the codes
    # CPU kernel: scale [out, in / group_size], min likewise, both fp32; torch's kernels:
    # scale [in / group_size, out, 2] (scale, zero), the activation dtype, and no min
    scale: torch.Tensor
    minimum: torch.Tensor | None
    group_size: int
    out_features: int
    kernel: ctypes.CDLL | None  # quant_matmul.c; None: torch's int4 kernels

    @classmethod
    def from_weight(cls, weight: torch.Tensor, dtype: torch.dtype, group_size: int) -> Int4Weight:
        _check_device(weight, "int4")
        q, scale, minimum = quantize_int4(weight, group_size)
        device, n = weight.device, q.shape[0]
        s, m = scale.to(device=device, dtype=torch.float32), minimum.to(device, torch.float32)
        kernel = _cpu_kernel(weight, dtype)
        if kernel is not None:
            packed = quant_matmul.pack_int4(q.to(device))
            return cls(packed, s.contiguous(), m.contiguous(), group_size, n, kernel)
        scale_and_zero = torch.stack([s, m + _INT4_MID * s], dim=-1)
        codes = q.to(device=device, dtype=torch.int32)
        # both torch kernels take whole tiles of output rows: pad with zero rows, sliced off
        pad = -n % _ROW_TILE
        if pad:
            codes = F.pad(codes, (0, 0, 0, pad))
            scale_and_zero = F.pad(scale_and_zero, (0, 0, 0, 0, 0, pad))
        scale_and_zero = scale_and_zero.transpose(0, 1)  # [in / group_size, out, 2]
        if device.type == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        else:
            if dtype != torch.bfloat16:
                raise QuantizationError("int4 on CUDA runs tinygemm, which takes bfloat16 only")
            k = codes.shape[1]
            tiles = [t for t in _INNER_K_TILES if k % (t * 16) == 0]
            if not tiles:
                raise QuantizationError(f"int4 on CUDA needs in % 32 == 0, not {k}")
            nibbles = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack(nibbles, tiles[0])
        return cls(packed, scale_and_zero.to(dtype).contiguous(), None, group_size, n, None)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.packed, self.scale, *([] if self.minimum is None else [self.minimum]))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, in] -> [num_tokens, out]
        if self.kernel is not None and self.minimum is not None:
            x = x if x.stride(1) == 1 else x.contiguous()
            args = (self.kernel, self.packed, self.scale, self.minimum, self.group_size)
            if x.shape[0] >= DENSE_MIN_TOKENS:
                return F.linear(x, quant_matmul.int4_dequantize(*args))
            return quant_matmul.int4_matmul(self.kernel, x, *args[1:])
        if x.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, self.packed, self.group_size, self.scale
            )
        else:
            y = torch.ops.aten._weight_int4pack_mm(x, self.packed, self.group_size, self.scale)
        return y if y.shape[1] == self.out_features else y[:, : self.out_features]


QuantizedWeight = Int8Weight | Int4Weight


def quantize_weight(
    weight: torch.Tensor, mode: str, dtype: torch.dtype, group_size: int = 32
) -> QuantizedWeight:
    """``weight: [out, in]`` (on its device) packed for ``mode``'s kernel."""
    if mode == "int8":
        return Int8Weight.from_weight(weight, dtype)
    if mode == "int4":
        return Int4Weight.from_weight(weight, dtype, group_size)
    raise QuantizationError(f"quantization must be int8 or int4 here, not {mode!r}")


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
