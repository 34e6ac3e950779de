"""`loramux bench gpu`: the engine on one GPU against transformers, PEFT and the HBM bound.

It makes everything it measures on the machine it runs on, so that a bare GPU machine with
no network runs it from the repo's tree (infra/gpu/run_bench.sh): python3 with torch,
triton, transformers, peft, safetensors and numpy, plus cachetools carried as a wheel.

- Shapes: SmolLM2-135M's, then Llama-3-8B's (CUDA only). Each is a random-weight LLaMA that
  transformers makes on the device in bf16, written as a model directory the engine loads
  (config.json and safetensors; no tokenizer: the prompts are token ids).
- Adapters: 16 random rank-16 all-linear LoRAs; PEFT gives the layout, each adapter its own
  random tensors; the engine reads them through a DirectorySource, PEFT loads the same files.
- Workload: 64 prompts of 128 to 512 random tokens, 128 greedy output tokens each, all
  submitted to the engine at once; transformers and PEFT generate them as one batch of 64.

Systems per shape: engine (no adapters), engine_lora (request i on adapter i mod 16, all
resident; the same engine), engine_eager (engine again with its CUDA graphs put aside: every
step eager), transformers (``generate``), peft (``generate`` with ``adapter_names=``).
Ratios: engine_vs_transformers, lora_vs_base (engine_lora over engine), lora_vs_peft,
graphs_vs_eager (engine over engine_eager; 1 give or take noise where there are no graphs,
on a CPU), and decode_vs_bandwidth_bound: over the engine's decode-only steps, the time
the bytes they must read take at the memory bandwidth (every weight once, lm_head included,
and each sequence's keys and values), over the time they took. The bandwidth is the H200's
4.8 TB/s on CUDA, and on a CPU the best of a few copies of a 256 MiB tensor (bytes read and
written). ``ratios`` holds the largest shape measured (Llama-3-8B's on CUDA); ``shapes`` every
shape's, with its seconds per phase. The JSON is rewritten after each shape, so a run cut
short keeps the shapes it finished (``complete`` false).

``--quick``: each shape cut to 2 layers, 16 prompts of 8 to 32 tokens, 8 output tokens.
``--device cpu`` measures SmolLM2-135M's shape only. ``--device cpu --quick`` is a dry run
of the whole command in a minute or two, not a figure of anything.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from loramux.bench.bandwidth import (
    H200_HBM_BYTES_PER_S,
    DecodeStep,
    copy_bandwidth,
    decode_bound,
    weight_bytes_per_step,
)
from loramux.bench.common import SystemResult, Workload, format_table, write_report
from loramux.bench.engine import run_hf_generate, sync
from loramux.bench.gpu_models import DTYPE, RANK, SHAPES, build_model, make_adapters
from loramux.commands.output import CommandFailed

CUDA_ONLY = frozenset({"llama3-8b"})
FULL = Workload(num_requests=64, min_prompt_tokens=128, max_prompt_tokens=512, output_tokens=128)
QUICK = Workload(num_requests=16, min_prompt_tokens=8, max_prompt_tokens=32, output_tokens=8)
QUICK_LAYERS = 2  # --quick keeps each shape's widths, heads and vocabulary, not its depth
NUM_ADAPTERS = 16
NUM_WARM_PROMPTS = 16
WARM_PROMPT_TOKENS = 64
WARM_OUTPUT_TOKENS = 8
ADAPTER_HOST_BYTES = 8 << 30
# What issue 15 aims at on an H200, for the Llama-3-8B shape: each ratio this or more.
TARGET_SHAPE = "llama3-8b"
TARGETS = {
    "engine_vs_transformers": 5.0,
    "lora_vs_base": 0.9,
    "lora_vs_peft": 10.0,
    "decode_vs_bandwidth_bound": 0.6,
}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CommandFailed("--device cuda, but torch sees no CUDA device")
    return torch.device(name)


def warm_up(engine: Any, vocab_size: int, adapters: list[Any]) -> None:
    """Prompts of 1 to 64 tokens and 1 to 8 output tokens, none from the workload: every
    kernel compiled for the batch shapes a run meets, the adapters resident."""
    from loramux_engine import SamplingParams

    prompts = Workload(len(adapters), 1, WARM_PROMPT_TOKENS, 1, seed=1).prompts(vocab_size)
    params = [
        SamplingParams(temperature=0.0, max_tokens=1 + i % WARM_OUTPUT_TOKENS, ignore_eos=True)
        for i in range(len(prompts))
    ]
    for out in engine.generate(prompts, params, adapters):
        if out.error is not None:
            raise out.error


def run_engine(
    engine: Any, prompts: list[list[int]], output_tokens: int, adapters: list[Any], name: str
) -> tuple[SystemResult, list[DecodeStep]]:
    """All prompts at once, greedy, ``output_tokens`` each; the decode-only steps kept apart.

    The clock runs during ``engine.step()`` only (with the device synchronized after it), not
    while this loop reads the engine's stats.
    """
    from loramux_engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{name}-{i}", prompt, params, adapter=adapters[i])
    prompt_len = {f"{name}-{i}": len(p) for i, p in enumerate(prompts)}
    emitted: dict[str, int] = {}
    ttft: dict[str, float] = {}
    decode: list[DecodeStep] = []
    elapsed = 0.0
    steps_before = engine.stats().num_steps_total
    while engine.has_unfinished():
        start = time.perf_counter()
        outputs = engine.step()
        sync(engine.device)
        seconds = time.perf_counter() - start
        elapsed += seconds
        kv_tokens = 0
        for out in outputs:
            if out.error is not None:
                raise out.error
            if out.new_token_ids:
                count = emitted.get(out.request_id, 0) + len(out.new_token_ids)
                emitted[out.request_id] = count
                kv_tokens += prompt_len[out.request_id] + count - 1
                ttft.setdefault(out.request_id, elapsed)
        stats = engine.stats()
        ran, steps_before = stats.num_steps_total > steps_before, stats.num_steps_total
        # decode only: every token through the model was sampled, one per sequence
        if ran and stats.last_step_num_tokens == stats.last_step_num_sampled > 0:
            decode.append(DecodeStep(seconds, stats.last_step_num_sampled, kv_tokens))
    result = SystemResult.from_run(
        sum(emitted.values()),
        elapsed,
        list(ttft.values()),
        elapsed_s=elapsed,
        num_decode_steps=len(decode),
    )
    return result, decode


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_shape(
    shape: str,
    fields: dict[str, Any],
    device: torch.device,
    workload: Workload,
    tmp: Path,
    bandwidth: float,
) -> tuple[dict[str, SystemResult], dict[str, float], dict[str, Any]]:
    from loramux_engine import EngineConfig, LLMEngine
    from loramux_engine.lora import DirectorySource
    from loramux_engine.models.config import load_model_args

    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[phase] = now - clock
        clock = now
        print(f"{shape}: {phase} {seconds[phase]:.1f} s", file=sys.stderr)

    model_dir, root = tmp / shape / "model", tmp / shape / "adapters"
    n, out_tokens = workload.num_requests, workload.output_tokens
    model = build_model(fields, device, model_dir)
    args = load_model_args(str(model_dir))
    prompts = workload.prompts(args.vocab_size)
    lap("model")
    systems = {"transformers": run_hf_generate(model, prompts, out_tokens, n)}
    lap("transformers")
    peft_model, refs = make_adapters(model, root, NUM_ADAPTERS)
    lap("adapters")
    names = [refs[i % NUM_ADAPTERS].id for i in range(n)]
    systems["peft"] = run_hf_generate(peft_model, prompts, out_tokens, n, names)
    del model, peft_model
    free(device)
    lap("peft")

    itemsize = DTYPE.itemsize
    kv_bytes_per_token = args.kv_bytes_per_token * itemsize
    max_len = max(workload.max_prompt_tokens + out_tokens, WARM_PROMPT_TOKENS + WARM_OUTPUT_TOKENS)
    engine = LLMEngine(
        EngineConfig(
            str(model_dir),
            device=str(device),
            dtype="bfloat16",
            max_num_seqs=n,
            max_model_len=max_len,
            # every request's whole context at once, and the warm-up's: no preemption
            kv_cache_bytes=2 * (n + NUM_WARM_PROMPTS) * max_len * kv_bytes_per_token,
            adapter_source=DirectorySource(root),
            max_loras=NUM_ADAPTERS,
            adapter_host_bytes=ADAPTER_HOST_BYTES,
            adapter_cache_dir=str(tmp / shape / "adapter-cache"),
            # one token per sequence per step: what the decode-step and bandwidth figures
            # describe (random weights would reject prompt-lookup drafts anyway)
            speculative="off",
        )
    )
    lap("engine_load")
    try:
        warm_up(engine, args.vocab_size, [None] * NUM_WARM_PROMPTS)
        systems["engine"], decode = run_engine(engine, prompts, out_tokens, [None] * n, "base")
        warm_up(engine, args.vocab_size, refs)
        assigned = [refs[i % NUM_ADAPTERS] for i in range(n)]
        systems["engine_lora"], _ = run_engine(engine, prompts, out_tokens, assigned, "lora")
        backend = engine.runner.attention_backend
        graphs = engine.runner.decode_graphs
        engine.runner.decode_graphs = None  # every step eager, as without CUDA graphs
        try:
            systems["engine_eager"], eager = run_engine(
                engine, prompts, out_tokens, [None] * n, "eager"
            )
        finally:
            engine.runner.decode_graphs = graphs
        cuda_graphs = {
            "enabled": graphs is not None and graphs.enabled,
            "num_captures": graphs.num_captures if graphs is not None else 0,
            "num_replays": graphs.num_replays if graphs is not None else 0,
            "decode_step_p50_s": statistics.median(d.seconds for d in decode),
            "eager_decode_step_p50_s": statistics.median(d.seconds for d in eager),
        }
    finally:
        engine.close()
    del engine
    shutil.rmtree(tmp / shape)  # the 8B shape's 16 GB, in memory when TMPDIR is /dev/shm
    free(device)
    lap("engine")

    bound = decode_bound(
        decode, weight_bytes_per_step(args, itemsize), kv_bytes_per_token, bandwidth
    )
    tokens_per_s = {name: r.tokens_per_s for name, r in systems.items()}
    ratios = {
        "engine_vs_transformers": tokens_per_s["engine"] / tokens_per_s["transformers"],
        "lora_vs_base": tokens_per_s["engine_lora"] / tokens_per_s["engine"],
        "lora_vs_peft": tokens_per_s["engine_lora"] / tokens_per_s["peft"],
        "decode_vs_bandwidth_bound": bound["bound_s"] / bound["measured_s"],
        "graphs_vs_eager": tokens_per_s["engine"] / tokens_per_s["engine_eager"],
    }
    section = {
        "model": {k: v for k, v in fields.items() if not k.endswith("token_id")},
        "attention_backend": backend,
        "cuda_graphs": cuda_graphs,
        "decode": bound,
        "ratios": ratios,
        "seconds": seconds,
    }
    return systems, ratios, section


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in ("torch", "triton", "transformers", "peft", "safetensors"):
        try:
            found[name] = importlib.import_module(name).__version__
        except ImportError:
            found[name] = None
    return found


def main(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    asked = set(args.shapes or SHAPES)
    unknown = sorted(asked - set(SHAPES))
    if unknown:
        raise CommandFailed(f"unknown shape {unknown[0]!r}; known: {', '.join(SHAPES)}")
    shapes = [shape for shape in SHAPES if shape in asked]  # smallest first
    workload = QUICK if args.quick else FULL
    copy = copy_bandwidth(device)
    if args.bandwidth is not None:
        bandwidth, source = args.bandwidth, "--bandwidth"
    elif device.type == "cuda":
        bandwidth, source = H200_HBM_BYTES_PER_S, "H200 HBM3e datasheet"
    else:
        bandwidth, source = copy, "measured tensor copy"
    device_info = {
        "type": device.type,
        "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "copy_bandwidth_bytes_per_s": copy,
        "bandwidth_bytes_per_s": bandwidth,
        "bandwidth_source": source,
        "versions": versions(),
    }
    print(f"device {device_info['name']}, bandwidth {bandwidth / 1e9:.0f} GB/s ({source})")
    details = {
        **workload.as_dict(),
        "dtype": "bfloat16",
        "greedy": True,
        "batch_size": workload.num_requests,
        "num_adapters": NUM_ADAPTERS,
        "adapter_rank": RANK,
        "adapter_targets": "all-linear",
        "shapes": shapes,
    }
    systems: dict[str, SystemResult] = {}
    sections: dict[str, Any] = {}
    ratios: dict[str, float] = {}
    start = time.perf_counter()

    def report(complete: bool) -> None:
        write_report(
            args.json_path,
            details,
            systems,
            ratios,
            shapes=sections,
            targets={"shape": TARGET_SHAPE, "ratios": TARGETS},
            device=device_info,
            total_s=time.perf_counter() - start,
            complete=complete,
        )

    with tempfile.TemporaryDirectory(prefix="loramux-bench-gpu-") as tmp:
        for shape in shapes:
            if shape in CUDA_ONLY and device.type != "cuda":
                sections[shape] = {"skipped": f"runs on CUDA only, not on {device.type}"}
                continue
            fields = SHAPES[shape] | ({"num_hidden_layers": QUICK_LAYERS} if args.quick else {})
            try:
                measured = bench_shape(shape, fields, device, workload, Path(tmp), bandwidth)
            except Exception as error:  # the next shape still runs: one GPU call, all it can
                traceback.print_exc()
                sections[shape] = {"failed": f"{type(error).__name__}: {error}"}
            else:
                shape_systems, ratios, sections[shape] = measured
                systems |= {f"{shape}/{name}": r for name, r in shape_systems.items()}
                details["headline_shape"] = shape
            free(device)
            report(complete=False)
    failed = [shape for shape, section in sections.items() if "failed" in section]
    report(complete=not failed)
    print(format_table(systems))
    for shape, section in sections.items():
        if "decode" not in section:
            print(f"{shape}: {section.get('skipped') or 'failed: ' + section['failed']}")
            continue
        d = section["decode"]
        print(
            f"{shape}: decode step p50 {d['step_p50_s'] * 1000:.2f} ms at batch "
            f"{d['mean_batch_size']:.0f}, reading {d['achieved_bytes_per_s'] / 1e9:.0f} GB/s"
        )
        g = section["cuda_graphs"]
        print(
            f"  CUDA graphs {'on' if g['enabled'] else 'off'}: decode step p50 "
            f"{g['decode_step_p50_s'] * 1000:.2f} ms, every step eager "
            f"{g['eager_decode_step_p50_s'] * 1000:.2f} ms"
        )
        for name, value in section["ratios"].items():
            aim = f" (aim: {TARGETS[name]:g} or more)" if shape == TARGET_SHAPE else ""
            print(f"  {name}: {value:.2f}{aim}")
    if failed:
        raise CommandFailed(f"shape {', '.join(failed)} failed (its traceback is above)")
    if not ratios:
        raise CommandFailed(f"nothing measured: {', '.join(shapes)} run on CUDA only")
    return 0
