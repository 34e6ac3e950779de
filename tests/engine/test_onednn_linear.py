"""Projections through oneDNN (CPU, fp32) against torch's plain F.linear and transformers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from loramux_engine import LLMEngine, SamplingParams
from loramux_engine.layers.linear import Linear, onednn_available

pytestmark = pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
PROMPTS = [[7 + (i * 11 + j * 5) % 240 for j in range(n)] for i, n in enumerate([2, 33, 70])]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("in_features", "out_features"), [(64, 64), (24, 40), (576, 1536)])
@pytest.mark.parametrize("num_tokens", [1, 5, 130])
def test_packed_matmul_equals_f_linear(
    bias: bool, in_features: int, out_features: int, num_tokens: int
) -> None:
    gen = torch.Generator().manual_seed(in_features + num_tokens)
    layer = Linear(in_features, out_features, bias, "q_proj")
    layer.weight.data = torch.randn(out_features, in_features, generator=gen)
    if layer.bias is not None:
        layer.bias.data = torch.randn(out_features, generator=gen)
    x = torch.randn(num_tokens, in_features, generator=gen)
    expected = F.linear(x, layer.weight, layer.bias)

    layer.pack_for_onednn()

    assert layer.weight.numel() == 0  # the plain copy is gone: one copy of the weights
    got = layer.matmul(x)
    assert got.shape == expected.shape
    # fp32 both ways, summed in another order: differences in the last bits only
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * in_features**0.5)
    assert not torch.equal(layer.matmul(x + 1), got)  # it really computes from its input


@pytest.mark.parametrize(("onednn", "gemv"), [(True, False), (False, False), (True, True)])
def test_every_cpu_matmul_path_gives_transformers_greedy_tokens(
    onednn: bool, gemv: bool, make_engine: Callable[..., LLMEngine], tiny_llama_dir: Path
) -> None:
    # gemv: few-token steps through kernels/gemv.c, larger ones oneDNN on the plain weight
    engine = make_engine(cpu_onednn_matmul=onednn, cpu_gemv_kernel=gemv, max_num_batched_tokens=48)
    assert engine.runner.onednn_matmul is onednn
    assert engine.runner.gemv_matmul is gemv
    head = engine.runner.model.lm_head
    assert (head.onednn_weight is not None) is (onednn and not gemv)
    assert (head.gemv is not None) is gemv
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    for prompt, out in zip(PROMPTS, engine.generate(PROMPTS, GREEDY), strict=True):
        with torch.no_grad():
            ids = reference.generate(
                torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None
            )
        assert out.new_token_ids == ids[0, len(prompt) :].tolist()


def test_tied_embedding_keeps_its_weight(make_engine: Callable[..., LLMEngine]) -> None:
    model = make_engine(cpu_gemv_kernel=False).runner.model
    assert model.lm_head.weight.numel() == 0
    assert model.embed_tokens.weight.shape == (model.args.vocab_size, model.args.hidden_size)


def test_gemv_lm_head_reads_the_tied_embedding(make_engine: Callable[..., LLMEngine]) -> None:
    model = make_engine().runner.model  # gemv on by default: one copy of the tied weight
    assert model.lm_head.gemv is not None and model.lm_head.onednn_weight is None
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
