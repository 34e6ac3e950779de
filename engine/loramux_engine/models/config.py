"""The model hyperparameters the forward needs, read from a Hugging Face config."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from transformers import AutoConfig

from loramux_engine.errors import ModelLoadError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(slots=True, frozen=True)
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any]
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    eos_token_ids: tuple[int, ...] = field(default=())

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes one token takes across all layers, per byte of dtype."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


def _rope(cfg: Any) -> tuple[float, dict[str, Any]]:
    # transformers 5 folds theta and scaling into rope_parameters; 4.x keeps them apart.
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        return float(params["rope_theta"]), scaling
    return float(getattr(cfg, "rope_theta", 10000.0)), dict(
        getattr(cfg, "rope_scaling", None) or {}
    )


def _eos_ids(model_dir: str, cfg: Any) -> tuple[int, ...]:
    ids: list[int] = []
    sources: list[Any] = [getattr(cfg, "eos_token_id", None)]
    gen_path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path) as f:
            sources.append(json.load(f).get("eos_token_id"))
    for source in sources:
        for token in source if isinstance(source, list) else [source]:
            if isinstance(token, int) and token not in ids:
                ids.append(token)
    return tuple(ids)


def load_model_args(model_dir: str) -> ModelArgs:
    cfg = AutoConfig.from_pretrained(model_dir)
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"model_type {cfg.model_type!r} is not supported; expected one of "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ModelLoadError(f"hidden_act {cfg.hidden_act!r} is not supported (SwiGLU needs silu)")
    theta, scaling = _rope(cfg)
    attention_bias = bool(getattr(cfg, "attention_bias", False))
    num_heads = cfg.num_attention_heads
    return ModelArgs(
        model_type=cfg.model_type,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_layers=cfg.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or num_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads,
        rms_norm_eps=float(cfg.rms_norm_eps),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(cfg.max_position_embeddings),
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        # Qwen2 always biases q/k/v and nothing else.
        qkv_bias=attention_bias or cfg.model_type == "qwen2",
        o_bias=attention_bias,
        mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
        eos_token_ids=_eos_ids(model_dir, cfg),
    )
