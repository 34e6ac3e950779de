"""`loramux bench spec`: speculative decoding by prompt lookup, on against off.

Two workloads, each request alone (the low load most users see), greedy, stopping at
EOS: a copy-heavy one (rewrite or edit a given passage: bench/data/spec_passages.json)
and the ordinary chat one (bench/data/chat_prompts.json). Each request runs three ways
on one engine, in rotation so that a shared host's drift touches all three alike: with
speculation off (the request's ``speculative: false``), forced on (``true``), and left
to the engine's "auto" policy. Greedy outputs must be identical across the three; the
report says whether they are.

A step-cost sweep beside it times decode steps of B sequences (B tokens, each sampled,
as a verifying step's 1 + k rows are) against B = 1: where that cost stays near flat,
drafts are nearly free; where it grows with B, a batch already pays for every token,
which is what "auto" 's draft cost and step-size limit (spec_decode.py) are set from.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch

from loramux.bench.common import SystemResult, format_table, write_report
from loramux.bench.engine import resolve_model_dir

MODES: dict[str, bool | None] = {"off": False, "on": True, "auto": None}


@dataclass(frozen=True, slots=True)
class SpecWorkload:
    num_copy: int  # passages to rewrite
    num_chat: int  # chat prompts
    max_tokens: int
    step_batches: tuple[int, ...]  # B for the step-cost sweep
    step_tokens: int = 8  # decode steps per B


FULL = SpecWorkload(num_copy=8, num_chat=12, max_tokens=128, step_batches=(1, 2, 4, 8, 16, 32, 64))
QUICK = SpecWorkload(num_copy=2, num_chat=2, max_tokens=16, step_batches=(1, 4))


@dataclass(slots=True)
class ModeRun:
    outputs: list[list[int]] = field(default_factory=list)
    seconds: float = 0.0
    ttfts: list[float] = field(default_factory=list)
    num_drafts: int = 0
    num_accepted: int = 0
    num_steps: int = 0

    def result(self) -> SystemResult:
        num_tokens = sum(len(o) for o in self.outputs)
        return SystemResult.from_run(
            num_tokens,
            self.seconds,
            self.ttfts,
            num_requests=len(self.outputs),
            num_output_tokens=num_tokens,
            ms_per_output_token=1000 * self.seconds / max(1, num_tokens),
            tokens_per_step=num_tokens / max(1, self.num_steps),
            num_draft_tokens=self.num_drafts,
            num_accepted_tokens=self.num_accepted,
            acceptance_rate=self.num_accepted / self.num_drafts if self.num_drafts else None,
        )


def _data(name: str) -> Any:
    return json.loads(resources.files("loramux.bench").joinpath("data", name).read_text())


def chat_prompt(tokenizer: Any, content: str) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True
    )
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def workload_prompts(tokenizer: Any, workload: SpecWorkload) -> dict[str, list[list[int]]]:
    passages = _data("spec_passages.json")[: workload.num_copy]
    chats = _data("chat_prompts.json")[: workload.num_chat]
    return {
        "copy": [chat_prompt(tokenizer, f"{p['instruction']}\n\n{p['passage']}") for p in passages],
        "chat": [chat_prompt(tokenizer, c) for c in chats],
    }


def _one(engine: Any, request_id: str, prompt: list[int], params: Any, run: ModeRun) -> None:
    speculator = engine.speculator
    spec_before = speculator.num_draft_tokens_total, speculator.num_accepted_tokens_total
    steps_before = engine.stats().num_steps_total
    tokens: list[int] = []
    start = time.perf_counter()
    engine.add_request(request_id, prompt, params)
    first: float | None = None
    while engine.has_unfinished():
        for out in engine.step():
            if out.error is not None:
                raise out.error
            if out.new_token_ids and first is None:
                first = time.perf_counter() - start
            tokens += out.new_token_ids
    run.seconds += time.perf_counter() - start
    run.ttfts.append(first if first is not None else float("nan"))
    run.outputs.append(tokens)
    run.num_steps += engine.stats().num_steps_total - steps_before
    run.num_drafts += speculator.num_draft_tokens_total - spec_before[0]
    run.num_accepted += speculator.num_accepted_tokens_total - spec_before[1]


def run_workload(engine: Any, prompts: list[list[int]], max_tokens: int) -> dict[str, ModeRun]:
    """Each prompt alone, the three modes in rotation (the starting mode moves each time)."""
    from loramux_engine import SamplingParams

    runs = {mode: ModeRun() for mode in MODES}
    names = list(MODES)
    for i, prompt in enumerate(prompts):
        for j in range(len(names)):
            mode = names[(i + j) % len(names)]
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, speculative=MODES[mode])
            _one(engine, f"{mode}-{i}", prompt, params, runs[mode])
    return runs


def step_cost(engine: Any, batches: tuple[int, ...], num_steps: int) -> dict[str, Any]:
    """Median decode-step seconds with B sequences (speculation off), and each over B = 1."""
    from loramux_engine import SamplingParams

    params = SamplingParams(
        temperature=0.0, max_tokens=num_steps + 1, ignore_eos=True, speculative=False
    )
    vocab = engine.model_args.vocab_size
    seconds: dict[int, float] = {}
    for b in batches:
        for i in range(b):
            prompt = [(100 + 7 * i + j) % vocab for j in range(16)]
            engine.add_request(f"step-{b}-{i}", prompt, params)
        times = []
        while engine.has_unfinished():
            start = time.perf_counter()
            engine.step()
            elapsed = time.perf_counter() - start
            stats = engine.stats()
            if stats.last_step_num_tokens == stats.last_step_num_sampled == b:  # all decoding
                times.append(elapsed)
        seconds[b] = statistics.median(times) if times else float("nan")
    return {
        "step_seconds": {str(b): s for b, s in seconds.items()},
        "cost_vs_one": {str(b): s / seconds[batches[0]] for b, s in seconds.items()},
    }


def main(args: argparse.Namespace) -> int:
    from loramux_engine import EngineConfig, LLMEngine, SamplingParams

    workload = QUICK if args.quick else FULL
    model_dir = resolve_model_dir(args.model)
    print(f"model {model_dir}, {torch.get_num_threads()} threads", file=sys.stderr)
    engine = LLMEngine(EngineConfig(str(model_dir), dtype="float32", speculative="auto"))
    if engine.tokenizer is None:
        raise RuntimeError(f"bench spec needs a tokenizer in {model_dir}")
    prompts = workload_prompts(engine.tokenizer, workload)
    engine.generate([prompts["chat"][0]], SamplingParams(temperature=0.0, max_tokens=4))  # warm
    systems: dict[str, SystemResult] = {}
    identical: dict[str, bool] = {}
    ratios: dict[str, float | None] = {}
    for name, case in prompts.items():
        runs = run_workload(engine, case, workload.max_tokens)
        for mode, run in runs.items():
            systems[f"{name}_{mode}"] = run.result()
        off = runs["off"].outputs
        identical[name] = runs["on"].outputs == off and runs["auto"].outputs == off
        base = systems[f"{name}_off"].tokens_per_s
        ratios[f"spec_speedup_{name}"] = systems[f"{name}_auto"].tokens_per_s / base
        ratios[f"spec_speedup_{name}_forced"] = systems[f"{name}_on"].tokens_per_s / base
        ratios[f"acceptance_rate_{name}"] = systems[f"{name}_on"].extra["acceptance_rate"]
    cost = step_cost(engine, workload.step_batches, workload.step_tokens)
    speculator = engine.speculator
    details = {
        "model_dir": str(model_dir),
        "dtype": "float32",
        "greedy": True,
        "batch_size": 1,
        "num_copy_prompts": workload.num_copy,
        "num_chat_prompts": workload.num_chat,
        "max_tokens": workload.max_tokens,
        "stop_at_eos": True,
        "num_speculative_tokens": speculator.num_speculative_tokens,
        "auto_draft_cost": speculator.draft_cost,
        "auto_max_batch_tokens": speculator.max_batch_tokens,
        "threads": engine.threads.num_threads,
    }
    print(format_table(systems))
    for name, system in systems.items():
        e = system.extra
        rate = e["acceptance_rate"]
        print(
            f"{name}: {e['ms_per_output_token']:.1f} ms/token, {e['tokens_per_step']:.2f} "
            f"tokens/step, acceptance {'n/a' if rate is None else f'{rate:.2f}'}"
        )
    for name, same in identical.items():
        print(f"{name}: greedy outputs identical on/auto/off: {same}")
    for name, value in ratios.items():
        print(f"{name}: " + ("n/a" if value is None else f"{value:.2f}"))
    print("decode step cost vs one sequence: " + ", ".join(
        f"B={b}: {c:.2f}" for b, c in cost["cost_vs_one"].items()
    ))  # fmt: skip
    write_report(
        args.json_path,
        details,
        systems,
        ratios,
        checks={"outputs_identical": identical},
        step_cost=cost,
    )
    return 0
