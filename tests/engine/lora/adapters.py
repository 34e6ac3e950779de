"""Helpers for the LoRA tests: tiny PEFT adapters written by PEFT itself over a tiny LLaMA."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save
from transformers import LlamaConfig, LlamaForCausalLM

from loramux_engine.lora.adapter import CONFIG_NAME, WEIGHTS_NAME
from loramux_engine.lora.ref import AdapterRef, adapter_sha256
from loramux_engine.lora.shape import BaseModelShape

TINY = BaseModelShape(
    num_layers=2, hidden_size=32, intermediate_size=48, num_heads=4, num_kv_heads=2, head_dim=8
)
MAX_RANK = 16


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=TINY.hidden_size,
        intermediate_size=TINY.intermediate_size,
        num_hidden_layers=TINY.num_layers,
        num_attention_heads=TINY.num_heads,
        num_key_value_heads=TINY.num_kv_heads,
        head_dim=TINY.head_dim,
    )
    return LlamaForCausalLM(config).eval()


MakeAdapter = Callable[..., tuple[Path, PeftModel]]


def adapter_maker(root: Path) -> MakeAdapter:
    """Save PEFT adapters with random (non-zero) A and B; make returns (dir, the PeftModel)."""
    counter = iter(range(1000))

    def make(seed: int = 0, **lora: Any) -> tuple[Path, PeftModel]:
        lora.setdefault("r", 4)
        lora.setdefault("lora_alpha", 8)
        lora.setdefault("target_modules", "all-linear")
        path = root / f"adapter-{next(counter)}"
        with warnings.catch_warnings():
            # PEFT warns about the odd configs the refusal tests build on purpose, and
            # transformers 5 deprecates an attribute PEFT still reads.
            warnings.simplefilter("ignore")
            model = get_peft_model(tiny_llama(), LoraConfig(init_lora_weights=False, **lora))
            torch.manual_seed(seed)
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.data = torch.randn_like(param) * 0.5
            model.save_pretrained(path)
        return path, model.eval()

    return make


def read_files(path: Path) -> tuple[bytes, bytes]:
    return (path / CONFIG_NAME).read_bytes(), (path / WEIGHTS_NAME).read_bytes()


def variant_weights(path: Path, factor: float) -> bytes:
    """The adapter's weights scaled by `factor`: a new content (and sha256), same config."""
    tensors = load_file(path / WEIGHTS_NAME)
    return save({name: tensor * factor for name, tensor in tensors.items()}, {"format": "pt"})


def publish(root: Path, config: bytes, weights: bytes, adapter_id: str) -> AdapterRef:
    """Store an adapter as a DirectorySource holds it and return its reference."""
    ref = AdapterRef(id=adapter_id, sha256=adapter_sha256(config, weights))
    (root / ref.sha256).mkdir(parents=True, exist_ok=True)
    (root / ref.sha256 / CONFIG_NAME).write_bytes(config)
    (root / ref.sha256 / WEIGHTS_NAME).write_bytes(weights)
    return ref
