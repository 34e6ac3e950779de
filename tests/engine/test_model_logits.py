"""The forward matches transformers' logits on a tiny random LLaMA (fp32, GQA).

Prompts are fed through the scheduler in chunks under a small token budget, so
later chunks attend to keys written in earlier steps and sequences share batches.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from loramux_engine import EngineConfig, LLMEngine, SamplingParams
from tests.engine.conftest import DEVICES

PROMPT_LENS = [40, 13, 70, 1]
NUM_CONTINUATION = 6


def _check_against_transformers(
    model_dir: Path, cpu_decode_kernel: bool = True, device: str = "cpu"
) -> None:
    config = EngineConfig(
        str(model_dir),
        device=device,
        dtype="float32",
        max_num_batched_tokens=32,
        cpu_decode_kernel=cpu_decode_kernel,
    )
    engine = LLMEngine(config)
    reference = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(1)
    vocab = engine.model_args.vocab_size
    full = {
        f"r{i}": torch.randint(2, vocab, (n + NUM_CONTINUATION,), generator=gen).tolist()
        for i, n in enumerate(PROMPT_LENS)
    }
    with torch.no_grad():
        expected = {rid: reference(torch.tensor([ids])).logits[0] for rid, ids in full.items()}
    scheduler = engine.scheduler
    for i, (rid, ids) in enumerate(full.items()):
        engine.add_request(rid, ids[: PROMPT_LENS[i]], SamplingParams(max_tokens=NUM_CONTINUATION))
    checked = 0
    while scheduler.running or scheduler.waiting:
        seqs = scheduler.schedule()
        logits = engine.runner.logits(seqs).cpu()
        row, next_tokens = 0, []
        for seq in seqs:
            start, n = seq.num_computed_tokens, seq.num_scheduled_tokens
            want = expected[seq.request_id][start : start + n]
            torch.testing.assert_close(logits[row : row + n], want, atol=1e-4, rtol=0)
            row, checked = row + n, checked + n
            at_end = start + n == len(seq)
            next_tokens.append(full[seq.request_id][len(seq)] if at_end else None)
        scheduler.postprocess(seqs, next_tokens)
        for seq in list(scheduler.running):
            if len(seq) == len(full[seq.request_id]):
                scheduler.finish(seq, "length")
    assert checked == sum(PROMPT_LENS) + len(PROMPT_LENS) * (NUM_CONTINUATION - 1)


# (device, cpu_decode_kernel): the CPU with its C kernel and with SDPA; CUDA when present
BACKENDS = [("cpu", True), ("cpu", False), *[(d, True) for d in DEVICES if d != "cpu"]]


@pytest.mark.parametrize(
    ("device", "cpu_decode_kernel"),
    BACKENDS,
    ids=[d if d != "cpu" else ("cpu-kernel" if k else "cpu-sdpa") for d, k in BACKENDS],
)
def test_logits_match_transformers(
    tiny_llama_dir: Path, device: str, cpu_decode_kernel: bool
) -> None:
    _check_against_transformers(tiny_llama_dir, cpu_decode_kernel, device)


def test_untied_lm_head_matches_transformers(
    make_tiny_llama: Callable[..., Path], device: str
) -> None:
    _check_against_transformers(make_tiny_llama(seed=1, tie_word_embeddings=False), device=device)


@pytest.mark.parametrize(
    "rope_scaling",
    [
        {"rope_type": "linear", "factor": 2.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ],
    ids=["linear", "llama3"],
)
def test_rope_scaling_matches_transformers(
    make_tiny_llama: Callable[..., Path], rope_scaling: dict[str, object], device: str
) -> None:
    _check_against_transformers(make_tiny_llama(rope_scaling=rope_scaling), device=device)
