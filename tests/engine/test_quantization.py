"""Weight-only int8 / int4: the quantizers, the kernels, and engines against an fp32 reference.

The reference for a quantized engine is the plain fp32 engine over a model directory whose
projection and LM head weights were replaced by their fp32 dequantization (the embedding
stays as shipped, so the tied LM head is written out separately): the kernels are exact to
their own quantization, so both give the same greedy tokens, with adapters in the batch too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loramux_engine import EngineConfig, LLMEngine, SamplingParams
from loramux_engine.errors import EngineConfigError
from loramux_engine.kernels import quant_matmul
from loramux_engine.layers.linear import Linear
from loramux_engine.layers.quant import (
    Int4Weight,
    Int8Weight,
    QuantizationError,
    dequantize_int4,
    dequantize_int8,
    fake_quantize,
    quantize_int4,
    quantize_int8,
)
from loramux_engine.lora import AdapterRef, DirectorySource
from tests.engine.peft_reference import load_base, publish_dir, save_random_adapter

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_int8_round_trip_within_half_a_step() -> None:
    w = torch.randn(37, 80, generator=torch.Generator().manual_seed(0))
    w[3] = 0.0  # an all-zero row stays exactly zero
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (37,)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    error = (dequantize_int8(q, scale) - w).abs()
    assert torch.all(error <= scale[:, None] / 2 * (1 + 1e-5))
    assert torch.equal(dequantize_int8(q, scale)[3], torch.zeros(80))
    # every nonzero row's largest weight is represented exactly up to rounding of the scale
    rows = torch.arange(37)[scale > 0]
    top = w.abs().argmax(dim=1)[rows]
    torch.testing.assert_close(dequantize_int8(q, scale)[rows, top], w[rows, top])


@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_round_trip_per_group(group_size: int) -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(5, 4 * group_size, generator=gen)
    # groups of very different magnitudes: each must be quantized on its own range
    magnitudes = torch.tensor([1e-3, 1.0, 30.0, 0.1])
    w = w * magnitudes.repeat_interleave(group_size)
    w[1, :group_size] = 0.25  # a constant group is exact
    q, scale, minimum = quantize_int4(w, group_size)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    assert scale.shape == minimum.shape == (5, 4) and scale.dtype == torch.float16
    back = dequantize_int4(q, scale, minimum, group_size)
    groups_error = (back - w).abs().view(5, 4, group_size).amax(dim=-1)
    groups_range = w.view(5, 4, group_size).abs().amax(dim=-1)
    # half a step, plus the fp16 rounding of the scale and the minimum
    bound = scale.float() / 2 + groups_range * 2.0**-10
    assert torch.all(groups_error <= bound)
    assert torch.equal(back[1, :group_size], w[1, :group_size])
    # the small group's error follows its own scale, not its neighbours'
    assert groups_error[:, 0].max() < 1e-3


def test_int4_refuses_widths_its_groups_do_not_divide() -> None:
    with pytest.raises(QuantizationError, match=r"do not divide the input width 48"):
        quantize_int4(torch.randn(4, 48), 32)
    with pytest.raises(QuantizationError, match=r"group sizes that divide it: \[32, 64\]"):
        quantize_int4(torch.randn(4, 576), 128)
    with pytest.raises(QuantizationError, match="group size must be one of"):
        quantize_int4(torch.randn(4, 96), 48)
    with pytest.raises(QuantizationError, match="non-finite"):
        quantize_int8(torch.tensor([[1.0, float("nan")]]))


def test_int4_gives_back_q4_1_weights_exactly() -> None:
    """Weights decoded from Q4_1 blocks (fp16 d and m, d * q + m, each block holding q = 0
    and q = 15 as llama.cpp's quantizer makes it) quantize back to the same codes, scales
    and minimums, and dequantize to the same fp32 values bit for bit."""
    gen = torch.Generator().manual_seed(2)
    out, blocks = 48, 6
    d = (torch.rand(out, blocks, generator=gen) * 0.01 + 1e-4).half()
    m = (-torch.rand(out, blocks, generator=gen) * 0.1).half()
    codes = torch.randint(0, 16, (out, blocks, 32), generator=gen)
    codes[..., 0], codes[..., 31] = 0, 15
    w = (d.float()[..., None] * codes + m.float()[..., None]).view(out, blocks * 32)
    q, scale, minimum = quantize_int4(w, 32)
    assert torch.equal(q.view(out, blocks, 32).long(), codes)
    assert torch.equal(scale, d) and torch.equal(minimum, m)
    assert torch.equal(dequantize_int4(q, scale, minimum, 32), w)


@pytest.mark.parametrize("num_tokens", [1, 3, 4, 9, 130])
@pytest.mark.parametrize(("out", "inp"), [(1, 32), (7, 96), (259, 64), (64, 256)])
def test_kernels_equal_the_fp32_reference(num_tokens: int, out: int, inp: int) -> None:
    """Odd row counts (the tails of four-row blocks, torch's 16-row tiles), token counts
    around the kernels' four-token blocks and past the dense threshold."""
    gen = torch.Generator().manual_seed(out * 1000 + inp)
    w = torch.randn(out, inp, generator=gen) * 0.05
    x = torch.randn(num_tokens, inp, generator=gen)
    for weight, mode in ((Int8Weight.from_weight(w, torch.float32), "int8"),
                         (Int4Weight.from_weight(w, torch.float32, 32), "int4")):  # fmt: skip
        expected = x @ fake_quantize(w, mode, 32).T
        got = weight.matmul(x)
        assert got.shape == (num_tokens, out)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_cpu_kernels_refuse_operands_they_would_read_past() -> None:
    library = quant_matmul.load()
    if library is None:
        pytest.skip("no C compiler here")
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    q8, scale8 = quantize_int8(w)
    q4, scale4, minimum4 = quantize_int4(w, 32)
    packed, scale4, minimum4 = quant_matmul.pack_int4(q4), scale4.float(), minimum4.float()
    narrow, strided = torch.randn(2, 32), torch.randn(64, 2).t()
    for x in (narrow, strided, torch.randn(2, 64, dtype=torch.float64)):
        with pytest.raises(ValueError):
            quant_matmul.int8_matmul(library, x, q8, scale8)
        with pytest.raises(ValueError):
            quant_matmul.int4_matmul(library, x, packed, scale4, minimum4, 32)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError):
        quant_matmul.int8_matmul(library, x, q8, scale8[:8])
    with pytest.raises(ValueError):
        quant_matmul.int4_matmul(library, x, packed, scale4, minimum4[:, :1], 32)
    with pytest.raises(ValueError):
        quant_matmul.int4_matmul(library, x, packed, scale4, minimum4, 48)
    assert quant_matmul.int8_matmul(library, x, q8, scale8).shape == (2, 16)


def test_cpu_kernel_rebuilds_int4_weights_bit_for_bit() -> None:
    library = quant_matmul.load()
    if library is None:
        pytest.skip("no C compiler here")
    w = torch.randn(40, 128, generator=torch.Generator().manual_seed(3))
    q, scale, minimum = quantize_int4(w, 64)
    dense = quant_matmul.int4_dequantize(
        library, quant_matmul.pack_int4(q), scale.float(), minimum.float(), 64
    )
    assert torch.equal(dense, dequantize_int4(q, scale, minimum, 64))
    q8, scale8 = quantize_int8(w)
    assert torch.equal(
        quant_matmul.int8_dequantize(library, q8, scale8), dequantize_int8(q8, scale8)
    )


def write_dequantized_model(model_dir: Path, out_dir: Path, mode: str, group_size: int) -> Path:
    """``model_dir`` with every projection and the LM head replaced by its fp32 dequantization;
    a tied LM head is written out on its own, the embedding left as it was."""
    out_dir.mkdir(parents=True)
    for path in model_dir.iterdir():
        if path.suffix != ".safetensors" and path.is_file():
            shutil.copy(path, out_dir / path.name)
    weights = load_file(model_dir / "model.safetensors")
    config = json.loads((model_dir / "config.json").read_text())
    if "lm_head.weight" not in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
        config["tie_word_embeddings"] = False
        (out_dir / "config.json").write_text(json.dumps(config))
    for name, tensor in weights.items():
        if name == "lm_head.weight" or name.split(".")[-2] in PROJECTIONS:
            weights[name] = fake_quantize(tensor, mode, group_size).contiguous()
    save_file(weights, out_dir / "model.safetensors")
    return out_dir


def _greedy(engine: LLMEngine, prompts: list[list[int]], refs: list[AdapterRef | None],
            max_tokens: int) -> dict[tuple[int, int], tuple[list[int], list[float]]]:  # fmt: skip
    """Every (adapter, prompt) pair in one continuous batch, joining three per step."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=True)
    pending = [(a, p) for p in range(len(prompts)) for a in range(len(refs))]
    ids = {f"{a}-{p}": (a, p) for a, p in pending}
    got: dict[tuple[int, int], tuple[list[int], list[float]]] = {}
    while pending or engine.has_unfinished():
        for a, p in pending[:3]:
            engine.add_request(f"{a}-{p}", prompts[p], params, adapter=refs[a])
        del pending[:3]
        for out in engine.step():
            assert out.error is None
            tokens, logprobs = got.setdefault(ids[out.request_id], ([], []))
            tokens.extend(out.new_token_ids)
            logprobs.extend(out.logprobs or [])
    engine.close()
    return got


@pytest.mark.parametrize(("mode", "group_size"), [("int8", 32), ("int4", 32)])
def test_quantized_engine_equals_dequantized_reference(
    tiny_llama_dir: Path, tmp_path: Path, mode: str, group_size: int
) -> None:
    base = load_base(tiny_llama_dir)
    root = tmp_path / "source"
    refs: list[AdapterRef | None] = [None]
    for a, lora in enumerate(
        [
            {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
            {"r": 16, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        ],
        start=1,
    ):
        adapter_dir, base = save_random_adapter(base, tmp_path / f"a{a}", seed=a, std=0.3, **lora)
        refs.append(publish_dir(root, adapter_dir, f"adapter-{a}"))
    reference_dir = write_dequantized_model(tiny_llama_dir, tmp_path / "ref", mode, group_size)
    prompts = [[5 + (i * 7 + j * 13) % 250 for j in range(n)] for i, n in enumerate([3, 21, 40])]

    def run(model_dir: Path, quantization: str, cache: str) -> dict:
        config = EngineConfig(
            str(model_dir),
            dtype="float32",
            max_model_len=128,
            max_num_batched_tokens=64,
            quantization=quantization,
            quantization_group_size=group_size,
            adapter_source=DirectorySource(root),
            adapter_cache_dir=str(tmp_path / cache),
        )
        return _greedy(LLMEngine(config), prompts, refs, max_tokens=10)

    quantized = run(tiny_llama_dir, mode, "c1")
    reference = run(reference_dir, "none", "c2")
    full = run(tiny_llama_dir, "none", "c3")
    for key, (tokens, logprobs) in reference.items():
        assert quantized[key][0] == tokens, f"adapter {key[0]}, prompt {key[1]}"
        torch.testing.assert_close(quantized[key][1], logprobs, atol=1e-4, rtol=0)
    # the reference really differs from fp32: the test would catch kernels that ignore codes
    assert any(full[k] != reference[k] for k in reference)
    for a in (1, 2):
        assert quantized[(a, 0)][0] != quantized[(0, 0)][0], f"adapter {a} changed nothing"


def test_quantized_lm_head_leaves_the_tied_embedding(tiny_llama_dir: Path) -> None:
    engine = LLMEngine(EngineConfig(str(tiny_llama_dir), quantization="int4"))
    model = engine.runner.model
    shipped = load_file(tiny_llama_dir / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(model.embed_tokens.weight, shipped)
    assert model.lm_head.quantized is not None and model.lm_head.weight.numel() == 0
    assert model.model.layers[0].mlp.down_proj.quantized is not None
    engine.close()


def test_lm_head_can_stay_unquantized(tiny_llama_dir: Path) -> None:
    config = EngineConfig(str(tiny_llama_dir), quantization="int8", quantize_lm_head=False)
    engine = LLMEngine(config)
    model = engine.runner.model
    assert model.lm_head.quantized is None
    assert all(
        m.quantized is not None
        for m in model.modules()
        if isinstance(m, Linear) and m is not model.lm_head
    )
    engine.close()


def test_bad_quantization_settings_fail_at_start(tiny_llama_dir: Path) -> None:
    with pytest.raises(EngineConfigError, match="quantization must be one of none, int8, int4"):
        EngineConfig(str(tiny_llama_dir), quantization="int3")
    with pytest.raises(EngineConfigError, match="quantization_group_size must be one of"):
        EngineConfig(str(tiny_llama_dir), quantization="int4", quantization_group_size=48)
    # hidden 64: groups of 128 fit no projection's input
    config = EngineConfig(str(tiny_llama_dir), quantization="int4", quantization_group_size=128)
    with pytest.raises(EngineConfigError, match=r"cannot quantize .*q_proj to int4: .*divide"):
        LLMEngine(config)


def test_settings_refuse_bad_quantization(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from loramux.settings import Settings

    monkeypatch.setenv("LORAMUX_QUANTIZATION", "int4")
    monkeypatch.setenv("LORAMUX_QUANTIZATION_GROUP_SIZE", "64")
    settings = Settings()
    assert (settings.quantization, settings.quantization_group_size) == ("int4", 64)
    monkeypatch.setenv("LORAMUX_QUANTIZATION", "fp8")
    with pytest.raises(ValidationError, match="quantization"):
        Settings()
    monkeypatch.setenv("LORAMUX_QUANTIZATION", "int8")
    monkeypatch.setenv("LORAMUX_QUANTIZATION_GROUP_SIZE", "48")
    with pytest.raises(ValidationError, match="must be 32, 64, 128 or 256"):
        Settings()


@pytest.mark.slow
def test_int4_reproduces_smollm2_shipped_weights(smollm2_dir: Path) -> None:
    """The shipped GGUF holds every projection as Q4_1: int4 at group size 32 gives back the
    converted fp32 weights bit for bit. (The embedding, the tied LM head, ships as Q8_0.)"""
    weights = load_file(smollm2_dir / "model.safetensors")
    projections = [n for n in weights if n.split(".")[-2] in PROJECTIONS]
    assert len(projections) == 7 * 30
    for name in projections:
        w = weights[name]
        assert torch.equal(fake_quantize(w, "int4", 32), w), name
