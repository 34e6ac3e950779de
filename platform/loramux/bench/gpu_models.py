"""Random-weight models and LoRA adapters, made on the device: `bench gpu` downloads nothing.

A model is a LLaMA of a real model's shape that transformers builds on the device in bf16
and writes as a directory the engine loads (config.json and safetensors, no tokenizer).
Adapters are PEFT LoRAs with random tensors, laid out as a DirectorySource reads them.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

# LlamaConfig fields of SmolLM2-135M-Instruct and Meta-Llama-3-8B (their config.json).
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "llama3-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
}
DTYPE = torch.bfloat16
RANK = 16
WEIGHT_STD = 0.02


def build_model(fields: dict[str, Any], device: torch.device, model_dir: Path) -> Any:
    """A random-weight LLaMA made on ``device``, written where the engine will load it."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device(device):
        model: Any = AutoModelForCausalLM.from_config(LlamaConfig(**fields), dtype=DTYPE)
    model.save_pretrained(model_dir)
    return model.eval()


def make_adapters(model: Any, root: Path, count: int, seed: int = 0) -> tuple[Any, list[Any]]:
    """``count`` random rank-16 all-linear adapters under ``root`` as DirectorySource reads
    them, and ``model`` wrapped by PEFT with all of them loaded (named by their ref ids).

    PEFT saves one as the template; the others vary its tensors. ``model`` is changed in place.
    """
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save

    from loramux_engine.lora import AdapterRef, adapter_sha256
    from loramux_engine.lora.files import CONFIG_NAME, WEIGHTS_NAME

    template = root / "template"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT and transformers deprecation notices
        peft_model = get_peft_model(
            model,
            LoraConfig(
                r=RANK, lora_alpha=2 * RANK, target_modules="all-linear", init_lora_weights=False
            ),
        )
        peft_model.save_pretrained(str(template))
    config = (template / CONFIG_NAME).read_bytes()
    tensors = load_file(template / WEIGHTS_NAME, device=str(model.device))
    generator = torch.Generator(model.device).manual_seed(seed)
    refs = []
    for i in range(count):
        random_tensors = {
            name: (
                torch.randn(t.shape, generator=generator, device=t.device, dtype=torch.float32)
                * WEIGHT_STD
            )
            .to(t.dtype)
            .cpu()
            for name, t in tensors.items()
        }
        weights = save(random_tensors, {"format": "pt"})
        ref = AdapterRef(f"bench-{i}", adapter_sha256(config, weights))
        (root / ref.sha256).mkdir(parents=True)
        (root / ref.sha256 / CONFIG_NAME).write_bytes(config)
        (root / ref.sha256 / WEIGHTS_NAME).write_bytes(weights)
        refs.append(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for ref in refs:
            peft_model.load_adapter(str(root / ref.sha256), adapter_name=ref.id)
    return peft_model.eval(), refs
