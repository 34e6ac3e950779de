"""`loramux bench quant`: weight-only int8 and int4 against the fp32 base model, in one run.

Four engines on the same model, fp32 activations, greedy, speculation off: LORAMUX_QUANTIZATION
none, int8 and int4, and int4 with the LM head left in fp32 (LORAMUX_QUANTIZE_LM_HEAD=false),
each measured the same ways:

- speed: one request alone (a 32-token prompt; ms per output token after the first) and a
  batch of requests decoding together; the engines take turns, repeated, and the median
  counts, so that a shared host's drift touches all three alike;
- memory: the bytes the model's weights hold (everything, and the projections with the LM
  head, the part quantization changes);
- quality: perplexity of a shipped text (bench/data/quant_text.json: about 2,200 tokens written
  for loramux)
  in non-overlapping windows, and agreement with fp32's greedy answers to the 64 chat
  prompts (bench/data/chat_prompts.json): the share of answers identical token for token,
  and the mean share of each answer before its first differing token.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from loramux.bench.common import SystemResult, format_table, write_report
from loramux.bench.engine import resolve_model_dir
from loramux.bench.engine_memory import Prompts, load_data

# name -> (LORAMUX_QUANTIZATION, LORAMUX_QUANTIZE_LM_HEAD)
MODES: dict[str, tuple[str, bool]] = {
    "none": ("none", True),
    "int8": ("int8", True),
    "int4": ("int4", True),
    "int4_fp32_head": ("int4", False),
}


@dataclass(frozen=True, slots=True)
class QuantWorkload:
    single_prompt_tokens: int
    single_output_tokens: int
    batch_size: int
    batch_output_tokens: int
    repeats: int
    perplexity_tokens: int  # scored from the text, at most
    perplexity_window: int
    num_agreement_prompts: int
    agreement_tokens: int
    group_size: int = 32


FULL = QuantWorkload(
    single_prompt_tokens=32,
    single_output_tokens=64,
    batch_size=16,
    batch_output_tokens=32,
    repeats=3,
    perplexity_tokens=4096,
    perplexity_window=512,
    num_agreement_prompts=64,
    agreement_tokens=32,
)
QUICK = QuantWorkload(
    single_prompt_tokens=16,
    single_output_tokens=8,
    batch_size=4,
    batch_output_tokens=8,
    repeats=1,
    perplexity_tokens=128,
    perplexity_window=64,
    num_agreement_prompts=4,
    agreement_tokens=8,
)


def _engine(model_dir: Path, mode: str, workload: QuantWorkload) -> Any:
    from loramux_engine import EngineConfig, LLMEngine, SamplingParams

    quantization, quantize_lm_head = MODES[mode]
    config = EngineConfig(
        str(model_dir),
        dtype="float32",
        quantization=quantization,
        quantize_lm_head=quantize_lm_head,
        quantization_group_size=workload.group_size,
        speculative="off",
        enable_prefix_caching=False,
        max_num_seqs=max(workload.batch_size, workload.num_agreement_prompts),
        max_num_batched_tokens=max(2048, workload.perplexity_window),
    )
    engine = LLMEngine(config)
    engine.generate([[engine.model_args.vocab_size // 2] * 8], SamplingParams(max_tokens=2))
    return engine


def weight_bytes(engine: Any) -> tuple[int, int]:
    """(every weight the model holds, the projections and LM head alone), in bytes."""
    from loramux_engine.layers.linear import Linear

    total = linear = 0
    for module in engine.runner.model.modules():
        if isinstance(module, Linear):
            if module.quantized is not None:
                held = module.quantized.nbytes
            else:
                held = module.in_features * module.out_features * engine.dtype.itemsize
            held += (
                module.bias.numel() * module.bias.element_size() if module.bias is not None else 0
            )
            linear += held
            total += held
        else:
            for p in module.parameters(recurse=False):
                total += p.numel() * p.element_size()
    return total, linear


def _decode(engine: Any, prompts: list[list[int]], max_tokens: int, ignore_eos: bool) -> Any:
    """All prompts submitted at once; (outputs, seconds, time to each first token)."""
    from loramux_engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos)
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    outputs: list[list[int]] = [[] for _ in prompts]
    ttfts: list[float] = [0.0] * len(prompts)
    while engine.has_unfinished():
        for out in engine.step():
            i = int(out.request_id)
            if not outputs[i] and out.new_token_ids:
                ttfts[i] = time.perf_counter() - start
            outputs[i].extend(out.new_token_ids)
    return outputs, time.perf_counter() - start, ttfts


def perplexity(engine: Any, token_ids: list[int], window: int) -> float:
    """exp of the mean next-token loss over non-overlapping windows of the text."""
    from loramux_engine import SamplingParams

    nll, count = 0.0, 0
    for w, start in enumerate(range(0, len(token_ids) - 1, window)):
        chunk = token_ids[start : start + window]
        if len(chunk) < 2:
            break
        rid = f"ppl-{w}"
        engine.add_request(rid, chunk, SamplingParams(max_tokens=1))
        seqs = engine.scheduler.schedule()
        if [s.num_scheduled_tokens for s in seqs] != [len(chunk)]:
            raise RuntimeError("a perplexity window was not scheduled whole")
        logits = engine.runner.logits(seqs)
        engine.abort(rid, emit_output=False)
        target = torch.tensor(chunk[1:])
        loss = torch.nn.functional.cross_entropy(logits[:-1], target, reduction="sum")
        nll, count = nll + float(loss), count + len(chunk) - 1
    return math.exp(nll / count)


def agreement(reference: list[list[int]], outputs: list[list[int]]) -> tuple[float, float]:
    """(share of answers identical, mean share of an answer before its first difference)."""
    exact, prefix = 0, 0.0
    for ref, out in zip(reference, outputs, strict=True):
        exact += ref == out
        same = next(
            (i for i, (a, b) in enumerate(zip(ref, out, strict=False)) if a != b),
            min(len(ref), len(out)),
        )
        prefix += same / max(len(ref), len(out), 1)
    return exact / len(reference), prefix / len(reference)


def _text_tokens(prompts: Prompts, limit: int) -> list[int]:
    return prompts.encode(load_data("quant_text.json")["text"])[:limit]


def run(model_dir: Path, workload: QuantWorkload) -> dict[str, Any]:
    prompts = Prompts(model_dir)
    engines = {mode: _engine(model_dir, mode, workload) for mode in MODES}
    vocab = engines["none"].model_args.vocab_size
    text = _text_tokens(prompts, workload.perplexity_tokens)
    chat = prompts.chat(load_data("chat_prompts.json")[: workload.num_agreement_prompts])
    single = [text[: workload.single_prompt_tokens]]
    batch = [
        text[i * 8 : i * 8 + workload.single_prompt_tokens] or [vocab // 2]
        for i in range(workload.batch_size)
    ]
    single_runs: dict[str, list[tuple[float, float, float]]] = {m: [] for m in MODES}
    batch_runs: dict[str, list[tuple[float, float, list[float]]]] = {m: [] for m in MODES}
    for _ in range(workload.repeats):  # in rotation
        for mode, engine in engines.items():
            outs, seconds, ttfts = _decode(engine, single, workload.single_output_tokens, True)
            n = len(outs[0])
            per_token = (seconds - ttfts[0]) / max(n - 1, 1)
            single_runs[mode].append((n / seconds, per_token, ttfts[0]))
            outs, seconds, ttfts = _decode(engine, batch, workload.batch_output_tokens, True)
            batch_runs[mode].append((sum(map(len, outs)) / seconds, seconds, ttfts))
    systems: dict[str, SystemResult] = {}
    quality: dict[str, dict[str, float]] = {}
    memory: dict[str, dict[str, int]] = {}
    answers: dict[str, list[list[int]]] = {}
    for mode, engine in engines.items():
        runs = sorted(single_runs[mode])
        tps, per_token, ttft = runs[len(runs) // 2]
        systems[f"{mode}_single"] = SystemResult(
            tokens_per_s=tps,
            ttft_p50_s=ttft,
            ttft_p95_s=ttft,
            extra={
                "ms_per_output_token": per_token * 1e3,
                "runs_tokens_per_s": [r[0] for r in single_runs[mode]],
            },
        )
        runs_b = sorted(batch_runs[mode], key=lambda r: r[0])
        tps, _, ttfts = runs_b[len(runs_b) // 2]
        systems[f"{mode}_batch"] = SystemResult(
            tokens_per_s=tps,
            ttft_p50_s=statistics.median(ttfts),
            ttft_p95_s=max(ttfts),
            extra={"runs_tokens_per_s": [r[0] for r in batch_runs[mode]]},
        )
        total, linear = weight_bytes(engine)
        memory[mode] = {"weight_bytes": total, "projection_and_head_bytes": linear}
        answers[mode], _, _ = _decode(engine, chat, workload.agreement_tokens, False)
        quality[mode] = {"perplexity": perplexity(engine, text, workload.perplexity_window)}
        engine.close()
    for mode in MODES:
        exact, prefix = agreement(answers["none"], answers[mode])
        quality[mode] |= {"greedy_identical": exact, "greedy_prefix_agreement": prefix}
    ratios: dict[str, float] = {}
    for mode in list(MODES)[1:]:
        ratios[f"{mode}_vs_fp32"] = (
            systems[f"{mode}_single"].tokens_per_s / systems["none_single"].tokens_per_s
        )
        ratios[f"{mode}_vs_fp32_batch"] = (
            systems[f"{mode}_batch"].tokens_per_s / systems["none_batch"].tokens_per_s
        )
        ratios[f"{mode}_weight_memory_vs_fp32"] = (
            memory[mode]["weight_bytes"] / memory["none"]["weight_bytes"]
        )
        ratios[f"{mode}_projection_memory_vs_fp32"] = (
            memory[mode]["projection_and_head_bytes"] / memory["none"]["projection_and_head_bytes"]
        )
        ratios[f"{mode}_perplexity_vs_fp32"] = (
            quality[mode]["perplexity"] / quality["none"]["perplexity"]
        )
        ratios[f"{mode}_greedy_identical"] = quality[mode]["greedy_identical"]
    return {
        "workload": {
            **asdict(workload),
            "model": str(model_dir),
            "perplexity_tokens_scored": len(text),
            "threads": torch.get_num_threads(),
        },
        "systems": systems,
        "ratios": ratios,
        "quality": quality,
        "memory": memory,
    }


def describe(result: dict[str, Any]) -> str:
    lines = [format_table(result["systems"]), ""]
    header = f"{'mode':<14} {'ms/token':>9} {'weights MB':>11} {'proj+head MB':>13} "
    header += f"{'perplexity':>11} {'identical':>10} {'prefix agr.':>12}"
    lines += [header, "-" * len(header)]
    for mode in MODES:
        single = result["systems"][f"{mode}_single"]
        mem, q = result["memory"][mode], result["quality"][mode]
        lines.append(
            f"{mode:<14} {single.extra['ms_per_output_token']:>9.1f} "
            f"{mem['weight_bytes'] / 1e6:>11.1f} {mem['projection_and_head_bytes'] / 1e6:>13.1f} "
            f"{q['perplexity']:>11.3f} {q['greedy_identical']:>10.2f} "
            f"{q['greedy_prefix_agreement']:>12.2f}"
        )
    lines.append("")
    lines += [f"{name}: {value:.3f}" for name, value in result["ratios"].items()]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    model_dir = resolve_model_dir(args.model)
    result = run(model_dir, QUICK if args.quick else FULL)
    print(describe(result))
    write_report(
        args.json_path,
        result["workload"],
        result["systems"],
        result["ratios"],
        quality=result["quality"],
        memory=result["memory"],
    )
    if args.json_path:
        print(f"wrote {args.json_path}", file=sys.stderr)
    return 0
