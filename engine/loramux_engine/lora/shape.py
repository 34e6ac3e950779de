"""The base model's projections that LoRA may target, and their shapes.

Module keys follow Hugging Face's LLaMA family (Llama, Mistral, Qwen2), because PEFT
adapters name their tensors and patterns after them: ``model.layers.3.self_attn.q_proj``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS


def module_key(layer: int, projection: str) -> str:
    parent = "self_attn" if projection in ATTENTION_PROJECTIONS else "mlp"
    return f"model.layers.{layer}.{parent}.{projection}"


@dataclass(frozen=True, slots=True)
class BaseModelShape:
    """What an adapter's shapes are checked against: a LLaMA-family decoder."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        for name in self.__slots__:
            if getattr(self, name) <= 0:
                raise ValueError(f"BaseModelShape.{name} must be positive")

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> BaseModelShape:
        """Read a Hugging Face ``config.json`` dict (head_dim defaults to hidden / heads)."""
        num_heads = int(config["num_attention_heads"])
        head_dim = config.get("head_dim") or int(config["hidden_size"]) // num_heads
        return cls(
            num_layers=int(config["num_hidden_layers"]),
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]),
            num_heads=num_heads,
            num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
        )

    def features(self, projection: str) -> tuple[int, int]:
        """(in_features, out_features) of a projection, as nn.Linear has them."""
        hidden, inter = self.hidden_size, self.intermediate_size
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "q_proj": (hidden, q_out),
            "k_proj": (hidden, kv_out),
            "v_proj": (hidden, kv_out),
            "o_proj": (q_out, hidden),
            "gate_proj": (hidden, inter),
            "up_proj": (hidden, inter),
            "down_proj": (inter, hidden),
        }[projection]

    @property
    def max_adapter_tensors(self) -> int:
        """Every projection of every layer adapted, an A and a B for each."""
        return 2 * len(PROJECTIONS) * self.num_layers

    def projection_keys(self) -> Iterator[tuple[int, str, str]]:
        """Every LoRA-capable projection as (layer, projection, module key)."""
        for layer in range(self.num_layers):
            for projection in PROJECTIONS:
                yield layer, projection, module_key(layer, projection)

    def other_module_keys(self) -> Iterator[str]:
        """Modules PEFT's matching also sees but that we never adapt (names as in HF)."""
        yield from ("model", "model.embed_tokens", "model.layers", "model.norm", "lm_head")
        yield "model.rotary_emb"
        for layer in range(self.num_layers):
            prefix = f"model.layers.{layer}"
            yield from (prefix, f"{prefix}.self_attn", f"{prefix}.mlp", f"{prefix}.mlp.act_fn")
            yield from (f"{prefix}.input_layernorm", f"{prefix}.post_attention_layernorm")
