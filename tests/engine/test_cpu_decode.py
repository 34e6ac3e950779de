"""The C decoder path for CPU steps of few tokens (models/cpu_decode.py, kernels/cpu_layer.c)
against the torch path it replaces: the same logits within fp32 rounding and the same
greedy tokens, for the base model and mixed adapters, speculative steps and prompt chunks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from loramux_engine import EngineConfig, LLMEngine, SamplingParams
from loramux_engine.lora import AdapterRef, DirectorySource
from loramux_engine.models.cpu_decode import CPUDecodePath
from loramux_engine.utils.context import Context, reset_context, set_context
from tests.engine.peft_reference import load_base, publish_dir, save_random_adapter

ADAPTERS: list[dict[str, Any]] = [
    {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
    {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    {"r": 16, "lora_alpha": 8, "target_modules": ["k_proj", "o_proj", "gate_proj", "up_proj"]},
]


def _engine(model_dir: Path, tmp_path: Path, **overrides: Any) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            str(model_dir),
            dtype="float32",
            max_model_len=256,
            kv_block_size=8,
            max_num_batched_tokens=48,
            max_loras=len(ADAPTERS),
            adapter_source=DirectorySource(tmp_path / "source"),
            adapter_cache_dir=str(tmp_path / "cache"),
            **overrides,
        )
    )


def _adapters(model_dir: Path, tmp_path: Path) -> list[AdapterRef | None]:
    base = load_base(model_dir)
    refs: list[AdapterRef | None] = [None]
    for i, lora in enumerate(ADAPTERS, start=1):
        adapter_dir, base = save_random_adapter(base, tmp_path / f"a{i}", seed=i, std=0.3, **lora)
        refs.append(publish_dir(tmp_path / "source", adapter_dir, f"adapter-{i}"))
    return refs


def _run(engine: LLMEngine, refs: list[AdapterRef | None], speculative: str) -> dict[str, list]:
    prompts = [[3 + (i * 11 + j * 5) % 240 for j in range(n)] for i, n in enumerate([5, 30, 70])]
    params = SamplingParams(
        temperature=0.0, max_tokens=12, ignore_eos=True, speculative=speculative == "on"
    )
    for p, prompt in enumerate(prompts):
        for a, ref in enumerate(refs):  # a repeated prompt: drafts get accepted
            engine.add_request(f"{a}-{p}", prompt * 2, params, adapter=ref)
    got: dict[str, list] = {}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    return got


def _count_calls(engine: LLMEngine) -> list[int]:
    path = engine.runner.cpu_decode
    assert isinstance(path, CPUDecodePath)
    calls = [0]
    forward = path.forward

    def counted(*args: Any) -> torch.Tensor:
        calls[0] += 1
        return forward(*args)

    path.forward = counted  # type: ignore[method-assign]
    return calls


@pytest.mark.parametrize(
    ("speculative", "quantization"),
    [("off", "none"), ("on", "none"), ("off", "int8"), ("off", "int4")],
)
def test_c_path_gives_torch_path_tokens(
    tiny_llama_dir: Path, tmp_path: Path, speculative: str, quantization: str
) -> None:
    refs = _adapters(tiny_llama_dir, tmp_path)
    fast = _engine(tiny_llama_dir, tmp_path, quantization=quantization)
    calls = _count_calls(fast)
    plain = _engine(tiny_llama_dir, tmp_path, quantization=quantization)
    plain.runner.model.model.cpu_decode = None  # the torch path, same kernels otherwise
    expected = _run(plain, refs, speculative)
    got = _run(fast, refs, speculative)
    assert calls[0] > 10, "the C path never ran"
    assert got == expected
    if speculative == "on":
        assert fast.stats().spec_decode_num_accepted_tokens_total > 0


def test_c_path_logits_match_torch_path(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Mixed adapters in one step of ragged sequences: every row's logits."""
    refs = _adapters(tiny_llama_dir, tmp_path)
    engine = _engine(tiny_llama_dir, tmp_path)
    _count = _count_calls(engine)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    for a, ref in enumerate(refs):  # four sequences of different lengths, decoding together
        engine.add_request(str(a), list(range(7, 7 + 9 * (a + 1))), params, adapter=ref)
    while engine.has_unfinished():
        engine.step()
        seqs = engine.scheduler.running
        if len(seqs) == len(refs) and all(s.num_computed_tokens > 0 for s in seqs):
            break
    seqs = list(engine.scheduler.running)
    assert len(seqs) == len(refs) and any(s.adapter_slot for s in seqs)
    for s in seqs:  # score one more token of each (not committed: logits only)
        s.num_scheduled_tokens = 1
    runner = engine.runner
    fast_logits = runner.logits(seqs)
    runner.model.model.cpu_decode = None
    torch_logits = runner.logits(seqs)
    assert _count[0] >= 1
    torch.testing.assert_close(fast_logits, torch_logits, rtol=1e-4, atol=1e-4)


def test_c_path_rejects_a_position_past_the_table(tiny_llama_dir: Path, tmp_path: Path) -> None:
    engine = _engine(tiny_llama_dir, tmp_path)
    model = engine.runner.model.model
    ids = torch.tensor([1, 2], dtype=torch.long)
    rows = torch.tensor([0, 1], dtype=torch.long)
    set_context(
        Context(
            cache_positions=rows,
            segments=[],
            block_ids=torch.tensor([0]),
            token_table_starts=torch.zeros(2, dtype=torch.long),
            token_kv_lens=rows + 1,
        )  # fmt: skip
    )
    try:
        with pytest.raises(RuntimeError, match="out of range"):
            model(ids, torch.tensor([0, 10**9], dtype=torch.long))
        with pytest.raises(RuntimeError, match="out of range"):
            model(ids, torch.tensor([0, -1], dtype=torch.long))
    finally:
        reset_context()
