"""Mixed-adapter continuous batches give, for every request, PEFT's greedy tokens.

Eight random adapters (ranks 4..64, different targets, rslora, rank and alpha patterns)
and requests without an adapter join one continuous batch a few per step; each
request's tokens must equal PEFT generating with that adapter alone (fp32, greedy),
and each adapter must change the output, so the test cannot pass by ignoring them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from loramux_engine import EngineConfig, LLMEngine, SamplingParams
from loramux_engine.lora import AdapterRef, DirectorySource
from tests.engine.peft_reference import load_base, peft_greedy, publish_dir, save_random_adapter

ADAPTERS: list[dict[str, Any]] = [
    {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
    {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    {"r": 16, "lora_alpha": 8, "target_modules": "all-linear", "use_rslora": True},
    {"r": 32, "lora_alpha": 32, "target_modules": ["o_proj", "down_proj"]},
    {"r": 64, "lora_alpha": 64, "target_modules": ["gate_proj", "up_proj", "down_proj"]},
    {
        "r": 16,
        "lora_alpha": 16,
        "target_modules": "all-linear",
        "rank_pattern": {"q_proj": 4, "down_proj": 32},
        "alpha_pattern": {"v_proj": 64},
    },
    {
        "r": 8,
        "lora_alpha": 4,
        "target_modules": ["k_proj", "o_proj", "up_proj"],
        "use_rslora": True,
        "rank_pattern": {"layers.0.self_attn.k_proj": 64},
    },
    {"r": 32, "lora_alpha": 8, "target_modules": "all-linear"},
]


def _check_mixed_batch(
    model_dir: Path,
    tmp_path: Path,
    prompts: list[list[int]],
    std: float,
    max_new_tokens: int,
    device: str,
) -> None:
    base = load_base(model_dir)
    root = tmp_path / "source"
    refs: list[AdapterRef | None] = [None]
    expected: dict[tuple[int, int], list[int]] = {}
    base_tokens, base = peft_greedy(base, None, prompts, max_new_tokens)
    for p, tokens in enumerate(base_tokens):
        expected[(0, p)] = tokens
    for a, lora in enumerate(ADAPTERS, start=1):
        adapter_dir, base = save_random_adapter(base, tmp_path / f"a{a}", seed=a, std=std, **lora)
        refs.append(publish_dir(root, adapter_dir, f"adapter-{a}"))
        tokens_list, base = peft_greedy(base, adapter_dir, prompts, max_new_tokens)
        for p, tokens in enumerate(tokens_list):
            expected[(a, p)] = tokens
            assert tokens != base_tokens[p], f"adapter {a} does not change prompt {p}'s output"

    engine = LLMEngine(
        EngineConfig(
            str(model_dir),
            device=device,
            dtype="float32",
            max_model_len=256,
            max_num_batched_tokens=96,
            max_loras=len(ADAPTERS),
            adapter_source=DirectorySource(root),
            adapter_cache_dir=str(tmp_path / "cache"),
        )
    )
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=True)
    pending = [(a, p) for p in range(len(prompts)) for a in range(len(refs))]
    got: dict[tuple[int, int], list[int]] = {}
    ids = {f"{a}-{p}": (a, p) for a, p in pending}
    max_adapters = 0
    while pending or engine.has_unfinished():
        for a, p in pending[:3]:  # a few new requests join every step
            engine.add_request(f"{a}-{p}", prompts[p], params, adapter=refs[a])
        del pending[:3]
        for out in engine.step():
            assert out.error is None
            got.setdefault(ids[out.request_id], []).extend(out.new_token_ids)
        running = engine.scheduler.running
        max_adapters = max(max_adapters, len({s.adapter_slot for s in running if s.adapter_slot}))
    engine.close()
    assert max_adapters >= 6, "the adapters never shared a batch"
    for key, tokens in expected.items():
        assert got[key] == tokens, f"adapter {key[0]}, prompt {key[1]}"


def test_mixed_adapters_equal_peft_tiny(tiny_llama_dir: Path, tmp_path: Path, device: str) -> None:
    prompts = [[5 + (i * 7 + j * 13) % 250 for j in range(n)] for i, n in enumerate([3, 21, 40])]
    _check_mixed_batch(tiny_llama_dir, tmp_path, prompts, std=0.3, max_new_tokens=10, device=device)


@pytest.mark.slow
def test_mixed_adapters_equal_peft_smollm2(smollm2_dir: Path, tmp_path: Path, device: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    texts = ["The capital of France is", "def fibonacci(n):\n    "]
    prompts = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    _check_mixed_batch(smollm2_dir, tmp_path, prompts, std=0.1, max_new_tokens=8, device=device)
