"""The C decoder path for CPU steps of few tokens (models/cpu_decode.py, kernels/cpu_layer.c)
against the torch path it replaces: the same logits within fp32 rounding and the same
greedy tokens, for the base model and mixed adapters, speculative steps and prompt chunks."""

from __future__ import annotations

import time
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
    # long enough that none finishes while the adapters load (in the background)
    params = SamplingParams(temperature=0.0, max_tokens=150, ignore_eos=True)
    for a, ref in enumerate(refs):  # four sequences of different lengths, decoding together
        engine.add_request(str(a), list(range(7, 7 + 9 * (a + 1))), params, adapter=ref)
    for _ in range(150):
        engine.step()
        seqs = engine.scheduler.running
        if len(seqs) == len(refs) and all(s.num_computed_tokens > 0 for s in seqs):
            break
        time.sleep(0.01)
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


def test_c_path_without_adapters_and_with_biases_untied_head_odd_width(
    make_tiny_llama: Any, tmp_path: Path
) -> None:
    """Base requests only (every layer in one C call), on a model with q/k/v/o and MLP
    biases (random, so they count), an untied LM head and an intermediate width that is not
    a multiple of 16 (SiLU's scalar tail)."""
    model_dir = make_tiny_llama(
        seed=3, attention_bias=True, mlp_bias=True, tie_word_embeddings=False, intermediate_size=136
    )
    engines = [_engine(model_dir, tmp_path) for _ in range(2)]
    generator = torch.Generator().manual_seed(0)
    for engine in engines:  # the same random biases in both
        for name, param in sorted(engine.runner.model.named_parameters()):
            if name.endswith(".bias"):
                param.data.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        generator.manual_seed(0)
    fast, plain = engines
    assert fast.runner.cpu_decode is not None
    assert fast.runner.model.lm_head.weight.data_ptr() != (
        fast.runner.model.model.embed_tokens.weight.data_ptr()
    )
    calls = {"all_layers": 0}
    library = fast.runner.cpu_decode.library

    class Counting:
        def __getattr__(self, name: str) -> Any:
            if name in calls:
                calls[name] += 1
            return getattr(library, name)

    fast.runner.cpu_decode.library = Counting()  # type: ignore[assignment]
    plain.runner.model.model.cpu_decode = None
    expected, got = _run(plain, [None], "off"), _run(fast, [None], "off")
    assert calls["all_layers"] > 10
    assert got == expected


def test_c_path_refuses_rows_outside_the_cache(tiny_llama_dir: Path, tmp_path: Path) -> None:
    engine = _engine(tiny_llama_dir, tmp_path)
    model = engine.runner.model.model
    rows = engine.runner.kv_cache.shape[3]
    ids, positions = torch.tensor([1, 2]), torch.tensor([0, 1])

    def run(cache_positions: list[int], block_ids: list[int], lens: list[int]) -> None:
        set_context(
            Context(
                cache_positions=torch.tensor(cache_positions),
                segments=[],
                block_ids=torch.tensor(block_ids),
                token_table_starts=torch.zeros(2, dtype=torch.long),
                token_kv_lens=torch.tensor(lens),
            )
        )
        try:
            model(ids, positions)
        finally:
            reset_context()

    run([0, 1], [0], [1, 2])  # in range: runs
    for bad in (
        ([0, rows], [0], [1, 2]),  # a cache row past the end
        ([0, -1], [0], [1, 2]),
        ([0, 1], [rows], [1, 2]),  # a block past the cache
        ([0, 1], [0], [1, 10**6]),  # more keys than the table holds
    ):
        with pytest.raises(RuntimeError, match="out of range"):
            run(*bad)
