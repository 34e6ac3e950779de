"""On the real SmolLM2-135M-Instruct (fp32) greedy tokens equal transformers' greedy generate.

Eight prompts of different lengths join at different steps under a small token
budget, so prefill chunks and decodes of different requests share batches.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from loramux_engine import EngineConfig, LLMEngine, SamplingParams

MAX_NEW_TOKENS = 16
TEXTS = [
    "Hi",
    "The capital of France is",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why each is prime.",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "Translate to French: The weather is nice today and we are going to the park.",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old "
    "clockmaker who",
    "Summarise the following in one sentence. " + "Solar panels turn sunlight into power. " * 12,
]


@pytest.mark.slow
def test_greedy_tokens_equal_transformers(smollm2_dir: Path, device: str) -> None:
    engine = LLMEngine(
        EngineConfig(
            str(smollm2_dir),
            device=device,
            dtype="float32",
            max_model_len=512,
            max_num_batched_tokens=96,
        )
    )
    tokenizer = engine.tokenizer
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False
        )
        if i % 2
        else t
        for i, t in enumerate(TEXTS)
    ]
    prompt_ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    assert len({len(p) for p in prompt_ids}) == len(prompt_ids)

    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS)
    got: dict[str, list[int]] = {}
    pending = list(enumerate(prompt_ids))
    max_batch = 0
    while pending or engine.has_unfinished():
        if pending:  # one new request per step
            i, ids = pending.pop(0)
            engine.add_request(str(i), ids, params)
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
        max_batch = max(max_batch, engine.stats().num_running)
    assert max_batch >= 4

    reference = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    for i, ids in enumerate(prompt_ids):
        with torch.no_grad():
            expected = reference.generate(
                torch.tensor([ids]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False
            )[0, len(ids) :].tolist()
        assert got[str(i)] == expected, f"prompt {i}: {prompts[i]!r}"
