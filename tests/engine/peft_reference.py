"""PEFT as the oracle: random adapters saved by PEFT, and PEFT's greedy tokens for each alone.

Adapters for a real model directory are written with PEFT over that model, published in
the layout DirectorySource reads (<root>/<sha256>/...), and then generated with by PEFT
loading the saved files, so the engine and the oracle read the same bytes.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from loramux_engine.lora.ref import AdapterRef
from tests.engine.lora.adapters import publish, read_files


@contextmanager
def quiet() -> Iterator[None]:
    # PEFT and transformers warn about configs and deprecations that do not concern us.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def load_base(model_dir: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def save_random_adapter(
    base: Any, out_dir: Path, seed: int, std: float, **lora: Any
) -> tuple[Path, Any]:
    """A PEFT LoRA with every A and B drawn N(0, std^2); returns (dir, the base unpatched)."""
    with quiet():
        model = get_peft_model(base, LoraConfig(init_lora_weights=False, **lora))
        generator = torch.Generator().manual_seed(seed)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = torch.randn(param.shape, generator=generator) * std
        model.save_pretrained(out_dir)
        return out_dir, model.unload()


def publish_dir(root: Path, adapter_dir: Path, adapter_id: str) -> AdapterRef:
    config, weights = read_files(adapter_dir)
    return publish(root, config, weights, adapter_id)


@torch.no_grad()
def greedy(model: Any, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return list(out[0, len(prompt) :].tolist())


def peft_greedy(
    base: Any, adapter_dir: Path | None, prompts: list[list[int]], max_new_tokens: int
) -> tuple[list[list[int]], Any]:
    """PEFT's greedy tokens with the saved adapter alone (or the base); returns the base too."""
    with quiet():
        if adapter_dir is None:
            return [greedy(base, p, max_new_tokens) for p in prompts], base
        model = PeftModel.from_pretrained(base, adapter_dir).eval()
        tokens = [greedy(model, p, max_new_tokens) for p in prompts]
        return tokens, model.unload()
