"""Build the model on the meta device and load safetensors weights into it by name."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable

import torch
from safetensors import safe_open

from loramux_engine.errors import EngineConfigError, ModelLoadError
from loramux_engine.layers.linear import Linear
from loramux_engine.layers.quant import QuantizationError
from loramux_engine.layers.rotary_embedding import RotaryEmbedding, rope_inv_freq
from loramux_engine.lora.adapter import LoRAAdapter
from loramux_engine.lora.merge import WeightMerger
from loramux_engine.models.config import ModelArgs
from loramux_engine.models.llama import LlamaForCausalLM


def _read_weights(
    model_dir: str,
    dtype: torch.dtype,
    device: torch.device,
    merge: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise ModelLoadError(f"no *.safetensors files in {model_dir!r}")
    weights: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensor = f.get_tensor(name)
                if merge is not None:  # in the checkpoint's dtype, before any cast
                    tensor = merge(name, tensor)
                weights[name] = tensor.to(device=device, dtype=dtype)
    return weights


def load_model(
    model_dir: str,
    args: ModelArgs,
    max_model_len: int,
    dtype: torch.dtype,
    device: torch.device,
    merged_adapter: LoRAAdapter | None = None,
    quantization: str = "none",
    quantization_group_size: int = 32,
    quantize_lm_head: bool = True,
) -> LlamaForCausalLM:
    """The model; with ``merged_adapter``, its weights hold that adapter merged (lora/merge.py).

    With ``quantization`` int8 or int4 every projection and (unless ``quantize_lm_head`` is
    False) the LM head hold their weights quantized (layers/quant.py), after any merge; a
    tied embedding stays as loaded.
    """
    inv_freq = rope_inv_freq(
        args.head_dim,
        args.rope_theta,
        args.rope_scaling,
        max_model_len,
        args.max_position_embeddings,
    )
    rotary = RotaryEmbedding(inv_freq, max_model_len).to(device)
    with torch.device("meta"):
        model = LlamaForCausalLM(args, rotary)
    merger = WeightMerger(merged_adapter) if merged_adapter is not None else None
    weights = _read_weights(model_dir, dtype, device, merger)
    if merger is not None:
        merger.check_complete()
    if "lm_head.weight" not in weights:
        if not args.tie_word_embeddings:
            raise ModelLoadError("checkpoint has no lm_head.weight and does not tie embeddings")
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    expected = set(model.state_dict())
    missing = sorted(expected - set(weights))
    unexpected = sorted(n for n in set(weights) - expected if "rotary_emb" not in n)
    if missing or unexpected:
        raise ModelLoadError(
            f"checkpoint does not match a {args.model_type} model: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_state_dict({n: weights[n] for n in expected}, strict=True, assign=True)
    del weights
    if quantization != "none":
        for name, module in model.named_modules():
            if isinstance(module, Linear) and (quantize_lm_head or module.projection != "lm_head"):
                try:
                    module.quantize(quantization, quantization_group_size)
                except QuantizationError as exc:
                    raise EngineConfigError(
                        f"cannot quantize {name} to {quantization}: {exc}"
                    ) from None
    return model.eval()
