"""Merged adaptation gives PEFT's greedy tokens: the exported directory read by transformers,
and the engine loading the base with the adapter merged (EngineConfig.merged_adapter).

The adapter uses rsLoRA, a rank pattern and an alpha pattern, so each scaling rule is in
the merged weights; it must change the output, so the test cannot pass by ignoring it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from loramux_engine import EngineConfig, LLMEngine, SamplingParams
from loramux_engine.errors import EngineConfigError
from loramux_engine.lora import DirectorySource
from loramux_engine.lora.merge import write_merged_model
from tests.engine.peft_reference import greedy, load_base, peft_greedy, quiet, save_random_adapter

LORA: dict[str, Any] = {
    "r": 8,
    "lora_alpha": 16,
    "target_modules": "all-linear",
    "use_rslora": True,
    "rank_pattern": {"q_proj": 4, "down_proj": 16},
    "alpha_pattern": {"v_proj": 32},
}
PROMPTS = [[5 + (i * 7 + j * 13) % 250 for j in range(n)] for i, n in enumerate([3, 17, 40])]
MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def peft_case(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A random adapter, PEFT's greedy tokens with it (unmerged), the base's, and PEFT's own
    merge_and_unload weights."""
    tmp = tmp_path_factory.mktemp("merge")
    base = load_base(tiny_llama_dir)
    base_tokens, base = peft_greedy(base, None, PROMPTS, MAX_NEW_TOKENS)
    adapter_dir, base = save_random_adapter(base, tmp / "adapter", seed=3, std=0.3, **LORA)
    tokens, base = peft_greedy(base, adapter_dir, PROMPTS, MAX_NEW_TOKENS)
    for with_adapter, without in zip(tokens, base_tokens, strict=True):
        assert with_adapter != without, "the adapter does not change the output"
    from peft import PeftModel

    with quiet():
        peft_merged = PeftModel.from_pretrained(load_base(tiny_llama_dir), adapter_dir)
        merged_state = {
            k: v.clone() for k, v in peft_merged.merge_and_unload().state_dict().items()
        }
    return {"adapter_dir": adapter_dir, "tokens": tokens, "peft_merged": merged_state, "tmp": tmp}


def test_merged_export_loaded_by_transformers_gives_peft_tokens(
    tiny_llama_dir: Path, peft_case: dict[str, Any]
) -> None:
    out = peft_case["tmp"] / "export"
    progress: list[float] = []
    files = write_merged_model(tiny_llama_dir, peft_case["adapter_dir"], out, 64, progress.append)
    names = {f.name for f in files}
    assert {"model.safetensors", "config.json", "generation_config.json"} <= names
    assert {"tokenizer.json", "tokenizer_config.json"} <= names
    assert progress[-1] == 1.0
    # same tensors, names and dtypes as the base; each adapted weight as PEFT merges it
    base_weights = load_file(tiny_llama_dir / "model.safetensors")
    merged_weights = load_file(out / "model.safetensors")
    assert set(merged_weights) == set(base_weights)
    changed = 0
    for name, weight in merged_weights.items():
        assert weight.dtype == base_weights[name].dtype
        torch.testing.assert_close(weight, peft_case["peft_merged"][name], rtol=0, atol=1e-6)
        changed += not torch.equal(weight, base_weights[name])
    assert changed == 4 * 7  # every projection of every layer ("all-linear")
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (tiny_llama_dir / "config.json").read_text()
    )

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert [greedy(model, p, MAX_NEW_TOKENS) for p in PROMPTS] == peft_case["tokens"]
    assert AutoTokenizer.from_pretrained(out)("hi").input_ids  # the tokenizer came along


def test_engine_with_merged_adapter_gives_peft_tokens(
    tiny_llama_dir: Path, peft_case: dict[str, Any]
) -> None:
    engine = LLMEngine(
        EngineConfig(
            str(tiny_llama_dir), dtype="float32", merged_adapter=str(peft_case["adapter_dir"])
        )
    )
    assert engine.adapters is None  # no slot pool, no LoRA op in the step
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    outputs = engine.generate(PROMPTS, params)
    assert [o.new_token_ids for o in outputs] == peft_case["tokens"]


def test_merged_adapter_refuses_an_adapter_source_and_a_missing_dir(
    tiny_llama_dir: Path, tmp_path: Path, peft_case: dict[str, Any]
) -> None:
    with pytest.raises(EngineConfigError, match="exclude each other"):
        EngineConfig(
            str(tiny_llama_dir),
            merged_adapter=str(peft_case["adapter_dir"]),
            adapter_source=DirectorySource(tmp_path),
        )
    with pytest.raises(EngineConfigError, match="no adapter_config.json"):
        EngineConfig(str(tiny_llama_dir), merged_adapter=str(tmp_path))
