"""The one check of an adapter's values: finite, and small enough for every serving dtype.

Finite in the file is not enough: lora_alpha 1e300 or an f64 weight of 1e300 is finite
there but infinite once the pool casts it to fp32 or bf16, and an infinity in a slot
turns into NaN wherever a kernel touches that slot (inf * 0 is NaN), including work it
does beside other tenants' tokens. So an adapter is served only when, per adapted
projection with rank r and scale s (lora_alpha / r, or / sqrt(r) with rsLoRA):

- every weight is finite and |w| <= MAX_LORA_WEIGHT,
- |s| <= MAX_LORA_SCALE,
- s * r * max|A| * max|B| <= MAX_LORA_DELTA, which bounds every entry of the update
  s * B @ A, so that no token's delta exceeds MAX_LORA_DELTA times its activations' L1.

The bounds sit far below float16's largest value (65504, the smallest of the engine's
serving dtypes), so an adapter that passes stays finite in whichever dtype the pool holds,
and the platform's validator and the engine's loader agree without knowing that dtype.
Real adapters are orders of magnitude inside them: PEFT's A starts near 1/sqrt(in) and B
at 0, scales are 0.25 to 16, and a rank-64 adapter trained hard has s * r * max|A| * max|B|
around 10.

The check is split so that its callers keep their memory bound: ``tensor_absmax`` per
tensor (the platform's validator reads one at a time with safe_open), then
``check_lora_values`` with the maxima; ``adapter.check_values`` puts the two together.
It uses numpy on the raw bits, not a torch reduction: it runs on the adapter cache's
loader threads, and a torch reduction there gives a loader thread an OpenMP team of its
own, which slows every engine step after it (see AsyncLLMEngine.from_config).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from loramux_engine.lora.errors import UnsupportedAdapterError
from loramux_engine.lora.peft_config import ResolvedLoRAConfig
from loramux_engine.lora.shape import module_key

MAX_LORA_WEIGHT = 4096.0
MAX_LORA_SCALE = 1024.0
MAX_LORA_DELTA = 4096.0

# The magnitude bits of each float dtype (all but the sign) as a signed int of its width:
# magnitudes order like these integers, and NaN and +-inf are exactly those at or above the
# exponent mask.
_MAGNITUDE_BITS = {
    torch.float16: (torch.int16, 0x7FFF, 0x7C00),
    torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80),
    torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800000),
    torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000),
}


def _refuse(reason: str) -> UnsupportedAdapterError:
    return UnsupportedAdapterError(f"unsupported adapter: {reason}")


def tensor_absmax(name: str, tensor: torch.Tensor) -> float:
    """The largest |value| of one weight tensor; refuses NaN, infinities and huge values."""
    bits_dtype = _MAGNITUDE_BITS.get(tensor.dtype)
    if bits_dtype is None:
        raise _refuse(f"{name!r} has dtype {tensor.dtype}, not a float dtype")
    int_dtype, magnitude_mask, exponent_mask = bits_dtype
    if tensor.numel() == 0:
        return 0.0
    bits = tensor.contiguous().view(int_dtype).numpy()
    largest = int((bits & magnitude_mask).max())
    if largest >= exponent_mask:
        raise _refuse(f"{name!r} contains NaN or infinite values")
    # One element back to its float value: no reduction, so torch is fine here.
    absmax = float(torch.tensor([largest], dtype=int_dtype).view(tensor.dtype).item())
    if absmax > MAX_LORA_WEIGHT:
        raise _refuse(
            f"{name!r} holds a weight of magnitude {absmax:.3g}, over the bound "
            f"{MAX_LORA_WEIGHT:g} for LoRA weights"
        )
    return absmax


def _scale_rule(resolved: ResolvedLoRAConfig) -> str:
    return "lora_alpha / sqrt(r)" if resolved.use_rslora else "lora_alpha / r"


def check_lora_scales(resolved: ResolvedLoRAConfig) -> None:
    """Every adapted projection's scale, from the config alone (before any weight is read)."""
    for (layer, projection), target in sorted(resolved.targets.items()):
        if not math.isfinite(target.scale) or abs(target.scale) > MAX_LORA_SCALE:
            raise _refuse(
                f"the LoRA scale of {module_key(layer, projection)} ({_scale_rule(resolved)}, "
                f"with alpha_pattern and rank_pattern) is {target.scale:.3g}, outside "
                f"+-{MAX_LORA_SCALE:g}"
            )


def check_lora_values(
    resolved: ResolvedLoRAConfig, maxima: Mapping[tuple[int, str], tuple[float, float]]
) -> None:
    """Each projection's scale and update bound (see the module docstring).

    ``maxima`` maps each adapted (layer, projection) to ``tensor_absmax`` of its A and B.
    """
    check_lora_scales(resolved)
    for key, target in sorted(resolved.targets.items()):
        max_a, max_b = maxima[key]
        delta = abs(target.scale) * target.rank * max_a * max_b
        if delta > MAX_LORA_DELTA:
            raise _refuse(
                f"the update of {module_key(*key)} is too large: scale {target.scale:.3g} x "
                f"rank {target.rank} x max|A| {max_a:.3g} x max|B| {max_b:.3g} = "
                f"{delta:.3g}, over the bound {MAX_LORA_DELTA:g}"
            )
