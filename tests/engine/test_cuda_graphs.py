"""Decode steps over the static, bucket-padded buffers of engine/cuda_graphs.py.

On a CPU the static-buffer step runs eagerly (``capture=False``) with the C attention
kernel, which reads the same per-token block tables as the Triton kernel: tokens and
logits must equal the plain path's for mixed adapters, ragged lengths and every bucket.
With CUDA the same checks run with graphs captured and replayed.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from collections.abc import Sequence as Seq
from pathlib import Path

import pytest
import torch

from loramux_engine import EngineConfig, LLMEngine, SamplingParams
from loramux_engine.engine.cuda_graphs import DecodeGraphs, buckets, is_decode_step, slot_runs
from loramux_engine.engine.sequence import Sequence
from loramux_engine.lora import AdapterRef, DirectorySource
from tests.engine.peft_reference import load_base, publish_dir, save_random_adapter

REPO = Path(__file__).resolve().parents[2]

ADAPTERS = [
    {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
    {"r": 64, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    {"r": 3, "lora_alpha": 6, "target_modules": ["o_proj", "gate_proj", "up_proj"]},
]
PROMPT_LENS = [1, 5, 17, 16, 33, 2, 40]  # ragged, across block boundaries (block size 4)


def test_buckets() -> None:
    assert buckets(1) == [1]
    assert buckets(2) == [1, 2]
    assert buckets(16) == [1, 2, 4, 8, 16]
    assert buckets(20) == [1, 2, 4, 8, 16, 20]
    assert buckets(64) == [1, 2, 4, 8, 16, 32, 64]


def test_slot_runs_leave_out_slot_zero() -> None:
    assert slot_runs([]) == []
    assert slot_runs([0, 0]) == []
    assert slot_runs([2, 2, 0, 1, 1, 1, 2, 0]) == [(2, 0, 2), (1, 3, 6), (2, 6, 7)]


def test_only_pure_decode_steps_qualify() -> None:
    params = SamplingParams()
    decode = Sequence("a", [1, 2, 3], params, 10)
    decode.num_computed_tokens, decode.num_scheduled_tokens = 2, 1
    prompt = Sequence("b", [1, 2, 3], params, 10)
    prompt.num_computed_tokens, prompt.num_scheduled_tokens = 0, 3
    chunk = Sequence("c", [1, 2, 3], params, 10)  # one token of a prompt, not its last
    chunk.num_computed_tokens, chunk.num_scheduled_tokens = 1, 1
    assert is_decode_step([decode])
    assert not is_decode_step([])
    assert not is_decode_step([decode, prompt])
    assert not is_decode_step([decode, chunk])


def test_blocks_past_the_token_are_not_copied(tiny_llama_dir: Path) -> None:
    """A decode row's table is cut at its token's block: a sequence holding more blocks
    (a speculative step's) still fits the fixed stride of max_model_len's blocks."""
    engine = LLMEngine(EngineConfig(str(tiny_llama_dir), max_model_len=16, kv_block_size=4))
    graphs = engine.runner.make_decode_graphs(4, capture=False)
    assert graphs.max_blocks_per_seq == 4
    seq = Sequence("a", list(range(3, 19)), SamplingParams(), 16)  # 16 tokens: 4 blocks
    seq.num_computed_tokens, seq.num_scheduled_tokens = 15, 1
    seq.block_table = [7, 2, 5, 1, 0, 3]  # two past the token's
    logits = graphs.run([seq])
    assert logits is not None and logits.shape == (1, engine.model_args.vocab_size)
    assert graphs.block_ids[0].tolist() == [7, 2, 5, 1]
    assert graphs.rows[:, 0].tolist() == [18, 15, 1 * 4 + 3, 16, 0]


@pytest.fixture(scope="module")
def adapters(
    tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[AdapterRef | None]]:
    tmp = tmp_path_factory.mktemp("graph-adapters")
    base = load_base(tiny_llama_dir)
    refs: list[AdapterRef | None] = [None]
    for i, lora in enumerate(ADAPTERS, start=1):
        adapter_dir, base = save_random_adapter(base, tmp / f"a{i}", seed=i, std=0.3, **lora)
        refs.append(publish_dir(tmp / "source", adapter_dir, f"adapter-{i}"))
    return tmp / "source", refs


def make_engine(model_dir: Path, source: Path, device: str, **overrides: object) -> LLMEngine:
    config = EngineConfig(
        str(model_dir),
        device=device,
        dtype="float32",
        max_num_seqs=8,
        max_model_len=128,
        kv_block_size=4,
        max_num_batched_tokens=64,
        max_loras=len(ADAPTERS),
        adapter_source=DirectorySource(source),
        speculative="off",  # every decode step one token per sequence: the graph's steps
        **overrides,  # type: ignore[arg-type]
    )
    return LLMEngine(config)


def run_steps(
    engine: LLMEngine,
    refs: Seq[AdapterRef | None],
    prompt_lens: Seq[int] = PROMPT_LENS,
    max_tokens: int = 12,
) -> dict[str, list[int]]:
    """Requests joining one per step, greedy, each asking one token more than the one before,
    so that they finish one per step and decode batches of every size occur."""
    prompts = [[3 + (i * 11 + j * 7) % 250 for j in range(n)] for i, n in enumerate(prompt_lens)]
    got: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    while pending or engine.has_unfinished():
        if pending:
            i, prompt = pending.pop(0)
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens + i, ignore_eos=True)
            engine.add_request(str(i), prompt, params, adapter=refs[i % len(refs)])
        for out in engine.step():
            assert out.error is None, out.error
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    return got


@pytest.fixture(scope="module")
def plain_tokens(
    tiny_llama_dir: Path, adapters: tuple[Path, list[AdapterRef | None]]
) -> dict[str, list[int]]:
    source, refs = adapters
    engine = make_engine(tiny_llama_dir, source, "cpu", cuda_graphs=False)
    assert engine.runner.decode_graphs is None
    try:
        return run_steps(engine, refs)
    finally:
        engine.close()


def static_engine(model_dir: Path, source: Path, device: str) -> tuple[LLMEngine, DecodeGraphs]:
    engine = make_engine(model_dir, source, device)
    if device == "cuda":
        graphs = engine.runner.decode_graphs
        if graphs is None:
            engine.close()
            pytest.skip("CUDA graphs run with the Triton kernels, and triton is not installed")
        assert graphs.capture
    else:
        assert engine.runner.decode_graphs is None  # cuda_graphs is ignored on a CPU
        graphs = engine.runner.make_decode_graphs(engine.config.max_num_seqs, capture=False)
        engine.runner.decode_graphs = graphs
        # what a capture at start runs, on padding rows alone: it writes the scratch block only
        kv = engine.runner.kv_cache
        graphs.capture_all(lora=False)
        graphs.capture_all(lora=True)
        scratch = graphs.scratch_block * graphs.block_size
        assert kv[..., scratch, :].abs().sum() > 0
        assert kv[..., :scratch, :].abs().sum() == 0 == kv[..., scratch + 1 :, :].abs().sum()
    return engine, graphs


def check_static_steps(
    engine: LLMEngine,
    graphs: DecodeGraphs,
    refs: Seq[AdapterRef | None],
    prompt_lens: Seq[int] = PROMPT_LENS,
    max_tokens: int = 12,
) -> tuple[dict[str, list[int]], list[tuple[int, int, torch.Tensor, torch.Tensor]]]:
    """The workload through the static path; with each decode step (its size, its number of
    distinct slots), its logits from the plain path (``runner.logits``, which never goes
    through the static buffers; it writes the same keys and values first) and the static."""
    steps: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []
    run = graphs.run

    def checked_run(seqs: Seq[Sequence]) -> torch.Tensor | None:
        expected = engine.runner.logits(list(seqs))
        logits = run(seqs)
        assert logits is not None
        num_slots = len({s.adapter_slot for s in seqs})
        steps.append((len(seqs), num_slots, expected.cpu(), logits.float().cpu()))
        return logits

    graphs.run = checked_run  # type: ignore[method-assign]
    try:
        return run_steps(engine, refs, prompt_lens, max_tokens), steps
    finally:
        engine.close()


def test_static_decode_equals_plain_path(
    tiny_llama_dir: Path,
    adapters: tuple[Path, list[AdapterRef | None]],
    plain_tokens: dict[str, list[int]],
    device: str,
) -> None:
    """Tokens equal the plain engine's; each decode step's logits equal the plain path's."""
    source, refs = adapters
    engine, graphs = static_engine(tiny_llama_dir, source, device)
    got, steps = check_static_steps(engine, graphs, refs)
    assert got == plain_tokens
    sizes = [n for n, _, _, _ in steps]
    assert {graphs.bucket(n) for n in sizes} == {1, 2, 4, 8}  # every bucket, padded in some
    assert any(graphs.bucket(n) != n for n in sizes)
    assert max(sizes) == len(PROMPT_LENS)
    assert max(k for _, k, _, _ in steps) == len(ADAPTERS) + 1  # the base and every adapter
    # cuBLAS may pick another algorithm for the padded batch: the last bits may differ
    atol = 1e-4 if device == "cuda" else 1e-5
    for _, _, expected, logits in steps:
        torch.testing.assert_close(logits, expected, rtol=0, atol=atol)
    if device == "cuda":
        assert graphs.enabled and graphs.num_captures >= 4
        assert graphs.num_replays == len(steps)


# The CUDA path's Python on a CPU: every kernel the CUDA path launches (attention over the
# graph's fixed-stride tables, LoRA over its padded tile table, the fused norms, SiLU and
# RoPE) run through Triton's interpreter in a subprocess, where the dispatch is told to
# take Triton on the CPU. A smaller workload: the interpreter runs a program at a time.
_INTERPRETED = textwrap.dedent(
    """
    import pickle, sys
    from pathlib import Path
    import torch
    from loramux_engine.kernels import lora_runs
    from loramux_engine.layers import activation, attention, layernorm, rotary_embedding
    from loramux_engine.lora import ops
    from tests.engine import test_cuda_graphs as t

    for module in (activation, attention, layernorm, rotary_embedding, ops):
        module.use_triton = lambda device_type: True
    lora_runs.load = lambda: None  # else "auto" takes the CPU's runs kernel
    model_dir, source, refs_path, out = map(Path, sys.argv[1:])
    refs = pickle.loads(open(refs_path, "rb").read())
    engine = t.make_engine(model_dir, source, "cpu", cuda_graphs=False, cpu_decode_kernel=False)
    assert engine.runner.attention_backend == "triton"
    graphs = engine.runner.make_decode_graphs(engine.config.max_num_seqs, capture=False)
    assert graphs.triton_lora
    engine.runner.decode_graphs = graphs
    got, steps = t.check_static_steps(engine, graphs, refs, t.SMALL_PROMPT_LENS, t.SMALL_MAX_TOKENS)
    torch.save({"tokens": got, "steps": steps}, out)
    """
)
SMALL_PROMPT_LENS = [1, 9, 5, 17, 2]
SMALL_MAX_TOKENS = 4


def test_static_decode_through_the_triton_kernels_interpreted(
    tiny_llama_dir: Path, adapters: tuple[Path, list[AdapterRef | None]], tmp_path: Path
) -> None:
    pytest.importorskip("triton")
    source, refs = adapters
    engine = make_engine(tiny_llama_dir, source, "cpu", cuda_graphs=False)
    try:
        expected = run_steps(engine, refs, SMALL_PROMPT_LENS, SMALL_MAX_TOKENS)
    finally:
        engine.close()
    (tmp_path / "refs.pkl").write_bytes(pickle.dumps(refs))
    out = tmp_path / "out.pt"
    done = subprocess.run(
        [sys.executable, "-c", _INTERPRETED, str(tiny_llama_dir), str(source)]
        + [str(tmp_path / "refs.pkl"), str(out)],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = torch.load(out)
    assert result["tokens"] == expected  # the C kernels' tokens, from the Triton kernels
    steps = result["steps"]
    assert 3 in {n for n, _, _, _ in steps}  # padded to 4
    assert max(k for _, k, _, _ in steps) == len(ADAPTERS) + 1
    for _, _, plain, static in steps:
        torch.testing.assert_close(static, plain, rtol=0, atol=1e-5)
