"""`loramux bench engine`: our engine vs transformers' generate vs the matmul bound.

One seeded workload, all requests submitted at once, greedy, fixed output length.
The matmul bound replays the engine's own step shapes (tokens through the model,
rows through the LM head) as bare weight matmuls: the time the linear layers alone
need for the same batches, the practical limit on a CPU.

``--contend N`` then runs the engine and transformers again beside N one-core busy
loops (a sidecar, a noisy neighbour): with N of C cores taken, (C - N) / C of the quiet
throughput is what the CPU left allows.

The single-stream case decodes one request alone (what a user at low load feels): ms per
output token against the memory bound, the bytes a decode step reads (every projection
weight, the LM head, the keys and values so far) over the read bandwidth measured in the
same run with the engine's thread count (bandwidth.py: the better of a pass just before
and one just after the run); speculative decoding off, so every step reads the weights for
one token.

The same run also measures the engine's memory (engine_memory.py): chat answers stopping at
EOS on a 64 MiB KV budget, and a tenant's shared 1,024-token system prompt with prefix
caching on and off.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any

import torch

from loramux.bench.common import (
    SystemResult,
    Workload,
    busy_loops,
    format_table,
    write_report,
)
from loramux.bench.engine_memory import describe, run_memory_cases
from loramux.commands.output import CommandFailed

FULL = Workload(num_requests=64, min_prompt_tokens=16, max_prompt_tokens=256, output_tokens=64)
QUICK = Workload(num_requests=8, min_prompt_tokens=8, max_prompt_tokens=32, output_tokens=8)
HF_BATCH = {FULL: 16, QUICK: 4}
SINGLE_STREAM_TOKENS = {FULL: 128, QUICK: 16}
# torch's own team, read before any engine runs: the engine resizes the team of the thread
# that steps it, and transformers is measured as it runs by default.
TORCH_DEFAULT_THREADS = torch.get_num_threads()


def resolve_model_dir(model: str | None) -> Path:
    from loramux.base_models import resolve_model
    from loramux.settings import get_settings

    settings = get_settings()
    return resolve_model(model or settings.model, settings.models_dir)


def run_engine(
    model_dir: Path,
    prompts: list[list[int]],
    output_tokens: int,
    adapters: list[Any] | None = None,
    warm_adapters: list[Any] | None = None,
    **config: Any,
) -> tuple[SystemResult, Any, list[tuple[int, int]], list[int]]:
    """Returns the result, the engine, each step's (num_tokens, num_sampled), first-token steps.

    ``adapters`` gives each prompt's AdapterRef (None: base model); ``warm_adapters`` are
    made resident before the clock starts; ``config`` goes to EngineConfig.
    """
    from loramux_engine import EngineConfig, LLMEngine, SamplingParams

    config.setdefault("max_num_seqs", len(prompts))
    engine = LLMEngine(EngineConfig(str(model_dir), dtype="float32", **config))
    params = SamplingParams(temperature=0.0, max_tokens=output_tokens, ignore_eos=True)
    warm = warm_adapters or [None]
    warm_params = SamplingParams(temperature=0.0, max_tokens=2)
    engine.generate([prompts[0][:8]] * len(warm), warm_params, adapters=warm)  # warm-up
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params, adapter=adapters[i] if adapters else None)
    steps: list[tuple[int, int]] = []
    first_step: dict[str, int] = {}
    ttft: dict[str, float] = {}
    num_tokens = 0
    steps_before = engine.stats().num_steps_total
    start = time.perf_counter()
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter() - start
        stats = engine.stats()
        if stats.num_steps_total - steps_before > len(steps):  # the step ran the model
            steps.append((stats.last_step_num_tokens, stats.last_step_num_sampled))
        for out in outputs:
            if out.error is not None:
                raise out.error
            num_tokens += len(out.new_token_ids)
            if out.new_token_ids and out.request_id not in ttft:
                ttft[out.request_id] = now
                first_step[out.request_id] = len(steps) - 1
    elapsed = time.perf_counter() - start
    result = SystemResult.from_run(
        num_tokens,
        elapsed,
        list(ttft.values()),
        elapsed_s=elapsed,
        num_steps=len(steps),
        threads=engine.threads.num_threads,  # the team at the end of the run
    )
    return result, engine, steps, [first_step[str(i)] for i in range(len(prompts))]


def run_single_stream(
    model_dir: Path, prompt: list[int], output_tokens: int
) -> tuple[SystemResult, dict[str, Any]]:
    """One request alone, greedy, ``output_tokens`` long: ms per output token of its decode
    steps against the bytes they read over the measured read bandwidth."""
    from loramux.bench.bandwidth import (
        DecodeStep,
        decode_bound,
        read_bandwidth,
        weight_bytes_per_step,
    )
    from loramux_engine import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine(
        EngineConfig(str(model_dir), dtype="float32", max_num_seqs=1, speculative="off")
    )
    engine.generate([prompt[:8]], SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
    # the read bandwidth just before the run and just after it, the better of the two
    # measured with the team the run ended with
    before = engine.threads.num_threads, read_bandwidth(engine.threads.num_threads)
    params = SamplingParams(temperature=0.0, max_tokens=output_tokens, ignore_eos=True)
    engine.add_request("single", prompt, params)
    seconds: list[float] = []  # each step's
    generated = 0
    start = time.perf_counter()
    while engine.has_unfinished():
        step_start = time.perf_counter()
        outputs = engine.step()
        seconds.append(time.perf_counter() - step_start)
        for out in outputs:
            if out.error is not None:
                raise out.error
            generated += len(out.new_token_ids)
    elapsed = time.perf_counter() - start
    if generated != output_tokens or len(seconds) != output_tokens:
        raise RuntimeError(f"single stream: {generated} tokens in {len(seconds)} steps")
    threads = engine.threads.num_threads
    args, itemsize = engine.model_args, engine.dtype.itemsize
    engine.close()
    del engine
    gc.collect()
    bandwidths = [read_bandwidth(threads), *([before[1]] if before[0] == threads else [])]
    bandwidth = max(bandwidths, key=lambda b: b["bytes_per_s"])
    # step 0 computes the prompt and samples token 1; step i > 0 decodes token i + 1 over
    # the prompt and the i tokens before it, its own key and value included
    decode = [
        DecodeStep(seconds=s, num_seqs=1, kv_tokens=len(prompt) + i)
        for i, s in enumerate(seconds[1:], start=1)
    ]
    bound = decode_bound(
        decode,
        weight_bytes_per_step(args, itemsize),
        args.kv_bytes_per_token * itemsize,
        bandwidth["bytes_per_s"],
    )
    ms_per_token = 1e3 * bound["measured_s"] / len(decode)
    result = SystemResult.from_run(
        output_tokens,
        elapsed,
        [seconds[0]],
        elapsed_s=elapsed,
        prompt_tokens=len(prompt),
        output_tokens=output_tokens,
        threads=threads,
        ms_per_output_token=ms_per_token,
        bound_ms_per_output_token=1e3 * bound["bound_s"] / len(decode),
    )
    details = {
        **bound,
        **{k: v for k, v in bandwidth.items() if k != "bytes_per_s"},
        "threads": threads,
        "speculative": "off",
    }
    return result, details


def _time_matmuls(
    linears: list[Any], lm_head: Any, device: torch.device, num_tokens: int, num_sampled: int
) -> float:
    inputs = {m.in_features: torch.randn(num_tokens, m.in_features, device=device) for m in linears}
    head_in = torch.randn(num_sampled, lm_head.in_features, device=device)
    best = float("inf")
    for _ in range(2):
        sync(device)
        start = time.perf_counter()
        for m in linears:
            m.matmul(inputs[m.in_features])
        if num_sampled:
            lm_head.matmul(head_in)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


@torch.inference_mode()
def run_matmul_bound(
    engine: Any, steps: list[tuple[int, int]], first_steps: list[int], num_tokens: int
) -> SystemResult:
    from loramux_engine.layers.linear import Linear

    model = engine.runner.model
    linears = [m for m in model.modules() if isinstance(m, Linear) and m is not model.lm_head]
    seconds: dict[tuple[int, int], float] = {}
    cumulative, total = [], 0.0
    for shape in steps:
        if shape not in seconds:
            seconds[shape] = _time_matmuls(linears, model.lm_head, engine.device, *shape)
        total += seconds[shape]
        cumulative.append(total)
    decode_batch = max(sampled for _, sampled in steps)
    decode_s = seconds.get((decode_batch, decode_batch)) or _time_matmuls(
        linears, model.lm_head, engine.device, decode_batch, decode_batch
    )
    return SystemResult.from_run(
        num_tokens,
        total,
        [cumulative[s] for s in first_steps],
        elapsed_s=total,
        decode_batch_size=decode_batch,
        decode_only_tokens_per_s=decode_batch / decode_s,
    )


def run_transformers(
    model_dir: Path, prompts: list[list[int]], output_tokens: int, batch_size: int
) -> SystemResult:
    return run_hf_generate(load_hf_model(model_dir), prompts, output_tokens, batch_size)


def load_hf_model(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.to(device).eval()


@torch.inference_mode()
def run_hf_generate(
    model: Any,
    prompts: list[list[int]],
    output_tokens: int,
    batch_size: int,
    adapter_names: list[str] | None = None,
) -> SystemResult:
    """transformers' (or PEFT's, with per-row ``adapter_names``) generate, batch by batch."""
    from transformers import GenerationConfig, StoppingCriteria

    torch.set_num_threads(TORCH_DEFAULT_THREADS)
    device = model.device
    pad = model.generation_config.pad_token_id
    pad = pad if isinstance(pad, int) else 0
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=output_tokens,
        min_new_tokens=output_tokens,
        pad_token_id=pad,
        eos_token_id=model.generation_config.eos_token_id,
    )

    class FirstToken(StoppingCriteria):  # called once per generated token
        at: float | None = None

        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            if self.at is None:
                self.at = time.perf_counter()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def generate(batch: list[list[int]], stop: list[Any], names: list[str] | None) -> int:
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        extra = {} if names is None else {"adapter_names": names}
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            generation_config=config,
            stopping_criteria=stop,
            **extra,
        )
        return int(out.shape[0] * (out.shape[1] - width))

    generate([prompts[0][:8]], [], None if adapter_names is None else adapter_names[:1])
    ttfts: list[float] = []
    num_tokens = 0
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        first = FirstToken()
        batch = prompts[i : i + batch_size]
        names = None if adapter_names is None else adapter_names[i : i + batch_size]
        num_tokens += generate(batch, [first], names)
        ttfts += [(first.at or time.perf_counter()) - start] * len(batch)
    elapsed = time.perf_counter() - start
    return SystemResult.from_run(
        num_tokens, elapsed, ttfts, elapsed_s=elapsed, batch_size=batch_size
    )


def main(args: argparse.Namespace) -> int:
    workload = QUICK if args.quick else FULL
    contend = getattr(args, "contend", 0)
    if contend < 0:
        raise CommandFailed("--contend takes a number of busy loops, 0 or more")
    model_dir = resolve_model_dir(args.model)
    print(f"model {model_dir}, {torch.get_num_threads()} threads", file=sys.stderr)
    systems: dict[str, SystemResult] = {}
    prompts = workload.prompts(vocab_size(model_dir))
    engine_result, engine, steps, first_steps = run_engine(
        model_dir, prompts, workload.output_tokens
    )
    systems["engine"] = engine_result
    num_tokens = workload.num_requests * workload.output_tokens
    systems["matmul_bound"] = run_matmul_bound(engine, steps, first_steps, num_tokens)
    del engine
    gc.collect()
    systems["transformers"] = run_transformers(
        model_dir, prompts, workload.output_tokens, HF_BATCH[workload]
    )
    ratios: dict[str, float | None] = {
        "engine_vs_transformers": engine_result.tokens_per_s / systems["transformers"].tokens_per_s,
        "engine_vs_matmul_bound": engine_result.tokens_per_s / systems["matmul_bound"].tokens_per_s,
    }
    gc.collect()
    single, single_stream = run_single_stream(model_dir, prompts[0], SINGLE_STREAM_TOKENS[workload])
    systems["single_stream"] = single
    ratios["single_stream_vs_bandwidth_bound"] = (
        single_stream["bound_s"] / single_stream["measured_s"]
    )
    gc.collect()
    memory_systems, memory_ratios, cases = run_memory_cases(model_dir, args.quick)
    systems |= memory_systems
    ratios |= memory_ratios
    if contend:
        ratios |= run_contended(systems, model_dir, prompts, workload, contend)
    details = {
        **workload.as_dict(),
        "model_dir": str(model_dir),
        "dtype": "float32",
        "greedy": True,
        "threads": TORCH_DEFAULT_THREADS,
        "transformers_batch_size": HF_BATCH[workload],
        "busy_loops": contend,
    }
    print(format_table(systems))
    print(describe(systems, cases))
    for name, value in ratios.items():
        print(f"{name}: " + ("n/a (no request waited)" if value is None else f"{value:.2f}"))
    print(
        f"single stream: {single.extra['ms_per_output_token']:.1f} ms per output token, "
        f"bound {single.extra['bound_ms_per_output_token']:.1f} ms "
        f"({single_stream['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s read, "
        f"{single_stream['threads']} threads)"
    )
    write_report(
        args.json_path, details, systems, ratios, cases=cases | {"single_stream": single_stream}
    )
    return 0


def run_contended(
    systems: dict[str, SystemResult],
    model_dir: Path,
    prompts: list[list[int]],
    workload: Workload,
    busy: int,
) -> dict[str, float]:
    """The engine and transformers again, each built afresh beside ``busy`` busy loops."""
    gc.collect()
    with busy_loops(busy):
        engine_result, engine, _, _ = run_engine(model_dir, prompts, workload.output_tokens)
        systems["engine_contended"] = engine_result
        engine.close()
        del engine
        gc.collect()
        systems["transformers_contended"] = run_transformers(
            model_dir, prompts, workload.output_tokens, HF_BATCH[workload]
        )
    return {
        name + "_contended_vs_quiet": (
            systems[name + "_contended"].tokens_per_s / systems[name].tokens_per_s
        )
        for name in ("engine", "transformers")
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def vocab_size(model_dir: Path) -> int:
    from loramux_engine.models.config import load_model_args

    return load_model_args(str(model_dir)).vocab_size
