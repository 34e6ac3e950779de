"""Merged adaptation: one LoRA adapter folded into the base weights, as PEFT merges it.

Semantics, per adapted projection (layer l, projection p) with its PEFT scale s
(``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA, ``rank_pattern`` / ``alpha_pattern``
applied: peft_config.py)::

    W[l, p] <- W[l, p] + (B @ A) * s        # W: [out, in], B: [out, r], A: [r, in]

in float32, rounded once to the weight's own dtype: PEFT's ``merge_and_unload`` for a
LLaMA-family model (``fan_in_fan_out`` is False there). The adapter is parsed and checked
by the same code as a served one (``read_adapter_dir``), so it means the same here.

Two users: the engine loading its base with one adapter merged
(``EngineConfig.merged_adapter``: no slot, no LoRA op in the step), and
``write_merged_model``, which writes a standard Hugging Face directory (the platform's
merge job).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loramux_engine.lora.adapter import LoRAAdapter, LoRAWeights, read_adapter_dir
from loramux_engine.lora.errors import UnsupportedAdapterError
from loramux_engine.lora.shape import BaseModelShape, module_key

# The non-weight files of a Hugging Face model directory a merged copy keeps; anything
# else (a manifest, pickles, code) stays behind.
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
Progress = Callable[[float], None]


def read_adapter_for_model(
    model_dir: str | Path, adapter_dir: str | Path, max_rank: int
) -> LoRAAdapter:
    """The adapter in ``adapter_dir``, parsed and checked against the model in ``model_dir``."""
    config = json.loads(Path(model_dir, "config.json").read_text())
    return read_adapter_dir(Path(adapter_dir), BaseModelShape.from_hf_config(config), max_rank)


class WeightMerger:
    """``merger(name, weight)``: the weight with the adapter merged if it adapts ``name``.

    Names are the checkpoint's (``model.layers.3.self_attn.q_proj.weight``).
    ``check_complete`` afterwards refuses an adapter some of whose targets were never seen.
    """

    def __init__(self, adapter: LoRAAdapter) -> None:
        self._targets: dict[str, LoRAWeights] = {
            f"{module_key(layer, projection)}.weight": lora
            for (layer, projection), lora in adapter.weights.items()
        }
        self.merged: set[str] = set()

    def __call__(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        lora = self._targets.get(name)
        if lora is None:
            return weight
        want = (lora.b.shape[0], lora.a.shape[1])
        if tuple(weight.shape) != want:
            raise UnsupportedAdapterError(
                f"unsupported adapter: {name} has shape {list(weight.shape)}, the adapter "
                f"needs {list(want)}"
            )
        delta = (lora.b.float() @ lora.a.float()) * lora.scale
        self.merged.add(name)
        return (weight.float() + delta).to(weight.dtype)

    def check_complete(self) -> None:
        missing = sorted(set(self._targets) - self.merged)
        if missing:
            raise UnsupportedAdapterError(
                f"unsupported adapter: {len(missing)} adapted weights are not in the base "
                f"checkpoint, e.g. {missing[0]!r}"
            )


def write_merged_model(
    model_dir: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    max_rank: int,
    progress: Progress | None = None,
) -> list[Path]:
    """Write the base in ``model_dir`` with the adapter merged, as a Hugging Face directory.

    Every ``*.safetensors`` file is rewritten under its own name with the same tensors,
    dtypes and metadata (one file in memory at a time); the config, generation config and
    tokenizer files are copied. Returns the files written, sorted by name.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    merger = WeightMerger(read_adapter_for_model(model_dir, adapter_dir, max_rank))
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, shard in enumerate(shards):
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {name: merger(name, f.get_tensor(name)) for name in f.keys()}  # noqa: SIM118
        save_file(tensors, str(out_dir / shard.name), metadata=metadata)
        del tensors
        written.append(out_dir / shard.name)
        if progress is not None:
            progress((i + 1) / len(shards))
    merger.check_complete()
    for name in MODEL_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out_dir / name)
            written.append(out_dir / name)
    return sorted(written)
