"""`loramux bench lora`: the engine with 16 adapters vs without, vs PEFT, and under thrash.

The engine benchmark's workload, each request given one of 16 random rank-16 all-linear
adapters (request i gets adapter i mod 16), fed to the engine through a DirectorySource
on local disk:

- engine_base: no adapters; engine_lora: the 16 adapters, all resident (warmed);
- peft: PEFT ``generate`` with ``adapter_names=`` in batches of 16;
- engine_lora_thrash: 64 adapters drawn with Zipf popularity over 8 device slots (the
  8 most popular warmed), against engine_lora as the all-resident case;
- cold load: on an idle engine, the extra time to first token of an adapter that is in
  no memory tier over a resident one: read from the local disk tier, parsed and written
  to a slot (the headline figure); and of one never seen, fetched from the source
  (here a local directory), sha256-verified and committed to the disk tier first;
- modular or merged, for a single-adapter workload (every request on one adapter):
  engine_single_modular, the shared engine applying it through its LoRA slot, against
  engine_single_merged, an engine that loaded the base with it merged
  (EngineConfig.merged_adapter: a dedicated deployment), the two run in lockstep (a step
  of each in turn, each timed on its own clock); with what each costs in memory
  (one base and a slot pool for every adapter, or one base per merged adapter), the time
  a merged export takes (lora/merge.py) and what merging adds to an engine's load.

engine_base and engine_lora are measured alternately (base, lora, lora, base, base, lora),
REPEATS runs each, and each reports its median run (every run's tokens/s is in the JSON):
their ratio is the one a noisy, shared machine moves most.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from loramux.bench.common import SystemResult, format_table, write_report
from loramux.bench.engine import (
    FULL,
    HF_BATCH,
    QUICK,
    load_hf_model,
    resolve_model_dir,
    run_engine,
    run_hf_generate,
    vocab_size,
)

NUM_ADAPTERS = 16
RANK = 16
NUM_THRASH_ADAPTERS = 64
NUM_THRASH_SLOTS = 8
ZIPF_EXPONENT = 1.0
NUM_COLD_SAMPLES = 5
WEIGHT_STD = 0.02
REPEATS = 3


def make_adapters(model_dir: Path, root: Path, count: int, seed: int = 0) -> list[Any]:
    """`count` random rank-16 all-linear adapters: PEFT saves one, the rest vary its tensors.

    Laid out as DirectorySource reads them; returns their AdapterRefs.
    """
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save

    from loramux_engine.lora import AdapterRef, adapter_sha256
    from loramux_engine.lora.files import CONFIG_NAME, WEIGHTS_NAME

    template = root / "template"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT and transformers deprecation notices
        model = get_peft_model(
            load_hf_model(model_dir).cpu(),
            LoraConfig(
                r=RANK, lora_alpha=2 * RANK, target_modules="all-linear", init_lora_weights=False
            ),
        )
        model.save_pretrained(str(template))
    config = (template / CONFIG_NAME).read_bytes()
    tensors = load_file(template / WEIGHTS_NAME)
    generator = torch.Generator().manual_seed(seed)
    refs = []
    for i in range(count):
        weights = save(
            {n: torch.randn(t.shape, generator=generator) * WEIGHT_STD for n, t in tensors.items()},
            {"format": "pt"},
        )
        ref = AdapterRef(f"bench-{i}", adapter_sha256(config, weights))
        (root / ref.sha256).mkdir(parents=True)
        (root / ref.sha256 / CONFIG_NAME).write_bytes(config)
        (root / ref.sha256 / WEIGHTS_NAME).write_bytes(weights)
        refs.append(ref)
    return refs


def run_peft(
    model_dir: Path,
    root: Path,
    refs: list[Any],
    prompts: list[list[int]],
    output_tokens: int,
    batch_size: int,
) -> SystemResult:
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(
            load_hf_model(model_dir), root / refs[0].sha256, adapter_name=refs[0].id
        )
        for ref in refs[1:]:
            model.load_adapter(root / ref.sha256, adapter_name=ref.id)
        names = [refs[i % len(refs)].id for i in range(len(prompts))]
        return run_hf_generate(model.eval(), prompts, output_tokens, batch_size, names)


def cold_load_extra_ttft(engine: Any, cold: list[Any], warm: Any, prompt: list[int]) -> float:
    """Median over `cold` of TTFT(cold adapter) - TTFT(resident adapter), same prompt."""
    from loramux_engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1)

    def ttft(adapter: Any) -> float:
        start = time.perf_counter()
        engine.add_request(f"cold-{time.monotonic_ns()}", prompt, params, adapter=adapter)
        while engine.has_unfinished():
            for out in engine.step():
                if out.error is not None:
                    raise out.error
        return time.perf_counter() - start

    extras = []
    for ref in cold:
        cold_s = ttft(ref)
        extras.append(cold_s - min(ttft(warm) for _ in range(2)))
    return statistics.median(extras)


def run_lockstep(
    engines: dict[str, Any],
    prompts: list[list[int]],
    output_tokens: int,
    adapters: dict[str, list[Any] | None],
) -> dict[str, SystemResult]:
    """The same requests through each engine, one step of each in turn, each timed on its own
    clock (the sum of its steps): a shared machine whose speed drifts weighs on all alike."""
    from loramux_engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_tokens, ignore_eos=True)
    busy = dict.fromkeys(engines, 0.0)
    tokens = dict.fromkeys(engines, 0)
    ttft: dict[str, dict[str, float]] = {name: {} for name in engines}
    for name, engine in engines.items():
        assigned = adapters[name]
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, params, adapter=assigned[i] if assigned else None)
    while any(engine.has_unfinished() for engine in engines.values()):
        for name, engine in engines.items():
            if not engine.has_unfinished():
                continue
            start = time.perf_counter()
            outputs = engine.step()
            busy[name] += time.perf_counter() - start
            for out in outputs:
                if out.error is not None:
                    raise out.error
                tokens[name] += len(out.new_token_ids)
                if out.new_token_ids:
                    ttft[name].setdefault(out.request_id, busy[name])
    return {
        name: SystemResult.from_run(
            tokens[name], busy[name], list(ttft[name].values()), elapsed_s=busy[name],
            threads=engine.threads.num_threads, lockstep=True,
        )
        for name, engine in engines.items()
    }  # fmt: skip


def merge_at_load_extra_s(model_dir: Path, adapter_dir: Path) -> float:
    from safetensors import safe_open

    from loramux_engine.lora.merge import WeightMerger, read_adapter_for_model

    def read(merge: bool) -> float:
        start = time.perf_counter()
        merger = WeightMerger(read_adapter_for_model(model_dir, adapter_dir, 64)) if merge else None
        for shard in sorted(model_dir.glob("*.safetensors")):
            with safe_open(str(shard), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    tensor = f.get_tensor(name)
                    if merger is not None:
                        merger(name, tensor)
        return time.perf_counter() - start

    read(False)  # the page cache warm for both
    return read(True) - read(False)


def merged_or_modular(
    model_dir: Path,
    root: Path,
    ref: Any,
    prompts: list[list[int]],
    output_tokens: int,
    cache_dir: Path,
) -> tuple[dict[str, SystemResult], dict[str, Any]]:
    """Every request on the adapter ``ref``: through the shared engine's LoRA slot, and from
    an engine that merged it into the base, in lockstep; plus what each costs in memory and
    time."""
    from loramux_engine import EngineConfig, LLMEngine, SamplingParams
    from loramux_engine.lora import DirectorySource
    from loramux_engine.lora.files import WEIGHTS_NAME
    from loramux_engine.lora.merge import write_merged_model
    from loramux_engine.lora.pool import bytes_per_slot
    from loramux_engine.lora.shape import BaseModelShape
    from loramux_engine.models.config import load_model_args

    adapter_dir = root / ref.sha256
    modular, merged = "engine_single_modular", "engine_single_merged"
    configs: dict[str, dict[str, Any]] = {
        modular: {
            "adapter_source": DirectorySource(root),
            "max_loras": NUM_ADAPTERS,
            "adapter_cache_dir": str(cache_dir),
        },
        merged: {"merged_adapter": str(adapter_dir)},
    }
    engines = {
        name: LLMEngine(
            EngineConfig(str(model_dir), dtype="float32", max_num_seqs=len(prompts), **config)
        )
        for name, config in configs.items()
    }
    warm_params = SamplingParams(temperature=0.0, max_tokens=2)
    engines[modular].generate([prompts[0][:8]], warm_params, [ref])  # resident, paths warm
    engines[merged].generate([prompts[0][:8]], warm_params)
    assigned = {modular: [ref] * len(prompts), merged: None}
    systems = run_lockstep(engines, prompts, output_tokens, assigned)
    for engine in engines.values():
        engine.close()
    engines.clear()
    gc.collect()
    with tempfile.TemporaryDirectory(prefix="loramux-bench-merge-") as out:
        start = time.perf_counter()
        write_merged_model(model_dir, adapter_dir, out, RANK)
        export_s = time.perf_counter() - start
    args = load_model_args(str(model_dir))
    shape = BaseModelShape(
        args.num_layers, args.hidden_size, args.intermediate_size,
        args.num_heads, args.num_kv_heads, args.head_dim,
    )  # fmt: skip
    base_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    slot_bytes = bytes_per_slot(shape, 64, torch.float32)  # the engine's pool rank (>= 64)
    section = {
        "adapter": {"rank": RANK, "targets": "all-linear"},
        "adapter_file_bytes": (adapter_dir / WEIGHTS_NAME).stat().st_size,
        "base_weight_bytes": base_bytes,
        "lora_slot_bytes": slot_bytes,
        "num_adapters": NUM_ADAPTERS,
        # weights (and LoRA pool) for NUM_ADAPTERS adapters: one shared engine with a slot
        # each, or one merged deployment each (KV caches come on top, one per engine)
        f"weight_bytes_for_{NUM_ADAPTERS}_adapters_modular": base_bytes
        + (NUM_ADAPTERS + 1) * slot_bytes,
        f"weight_bytes_for_{NUM_ADAPTERS}_adapters_merged": NUM_ADAPTERS * base_bytes,
        "merged_export_s": export_s,
        # what merging adds to an engine's load: reading the checkpoint with the adapter
        # parsed and merged, over reading it plainly (both from a warm page cache)
        "merge_at_load_extra_s": merge_at_load_extra_s(model_dir, adapter_dir),
    }
    return systems, section


def median_run(results: list[SystemResult]) -> SystemResult:
    """The run with the median tokens/s (the upper middle of an even count)."""
    return sorted(results, key=lambda r: r.tokens_per_s)[len(results) // 2]


def zipf_assignment(refs: list[Any], num_requests: int, seed: int) -> list[Any]:
    weights = [1 / (k + 1) ** ZIPF_EXPONENT for k in range(len(refs))]
    return random.Random(seed).choices(refs, weights, k=num_requests)


def main(args: argparse.Namespace) -> int:
    from loramux_engine import EngineConfig, LLMEngine, SamplingParams
    from loramux_engine.lora import DirectorySource

    workload = QUICK if args.quick else FULL
    model_dir = resolve_model_dir(args.model)
    print(f"model {model_dir}, {torch.get_num_threads()} threads", file=sys.stderr)
    prompts = workload.prompts(vocab_size(model_dir))
    n, out_tokens = workload.num_requests, workload.output_tokens
    systems: dict[str, SystemResult] = {}
    with tempfile.TemporaryDirectory(prefix="loramux-bench-lora-") as tmp:
        root = Path(tmp) / "source"
        refs = make_adapters(model_dir, root, NUM_ADAPTERS + NUM_THRASH_ADAPTERS + NUM_COLD_SAMPLES)
        hot, thrash_refs = refs[:NUM_ADAPTERS], refs[NUM_ADAPTERS:-NUM_COLD_SAMPLES]
        cold = refs[-NUM_COLD_SAMPLES:]
        source = DirectorySource(root)

        assigned = [hot[i % NUM_ADAPTERS] for i in range(n)]
        runs: dict[str, list[SystemResult]] = {"engine_base": [], "engine_lora": []}
        lora_config = {
            "adapter_source": source,
            "max_loras": NUM_ADAPTERS,
            "adapter_cache_dir": str(Path(tmp) / "cache-lora"),
        }
        # base, lora, lora, base, base, lora: a machine that drifts slower or faster
        # during the runs weighs on both systems alike
        for repeat in range(1 if args.quick else REPEATS):
            order = ["engine_base", "engine_lora"][:: 1 if repeat % 2 == 0 else -1]
            for name in order:
                if name == "engine_base":
                    result, engine, _, _ = run_engine(model_dir, prompts, out_tokens)
                else:
                    result, engine, _, _ = run_engine(
                        model_dir, prompts, out_tokens, assigned, hot, **lora_config
                    )
                runs[name].append(result)
                engine.close()
                del engine
        for name, results in runs.items():
            systems[name] = median_run(results)

        zipf = zipf_assignment(thrash_refs, n, workload.seed)
        thrash_config: dict[str, Any] = {
            "adapter_source": source,
            "max_loras": NUM_THRASH_SLOTS,
            "adapter_cache_dir": str(Path(tmp) / "cache-thrash"),
        }
        systems["engine_lora_thrash"], engine, _, _ = run_engine(
            model_dir, prompts, out_tokens, zipf, thrash_refs[:NUM_THRASH_SLOTS], **thrash_config
        )
        thrash = systems["engine_lora_thrash"]
        thrash.extra["num_adapters"] = NUM_THRASH_ADAPTERS
        thrash.extra["num_device_slots"] = NUM_THRASH_SLOTS
        thrash.extra["num_distinct_adapters_requested"] = len({r.sha256 for r in zipf})
        thrash.extra["adapter_cache"] = engine.stats().extra
        cold_prompt = prompts[0][:16]
        from_source = cold_load_extra_ttft(engine, cold, zipf[0], cold_prompt)
        engine.close()
        del engine
        gc.collect()
        # A fresh engine over the same disk tier: the cold adapters are on disk, in no
        # memory tier.
        engine = LLMEngine(EngineConfig(str(model_dir), dtype="float32", **thrash_config))
        engine.generate([cold_prompt[:8]], SamplingParams(temperature=0.0, max_tokens=2), [zipf[0]])
        before = engine.stats().extra
        from_disk = cold_load_extra_ttft(engine, cold, zipf[0], cold_prompt)
        after = engine.stats().extra
        engine.close()
        del engine
        gc.collect()

        systems["peft"] = run_peft(model_dir, root, hot, prompts, out_tokens, HF_BATCH[workload])
        gc.collect()
        single_systems, merged_section = merged_or_modular(
            model_dir, root, hot[0], prompts, out_tokens, Path(tmp) / "cache-single"
        )
        systems |= single_systems
    lora, base = systems["engine_lora"].tokens_per_s, systems["engine_base"].tokens_per_s
    ratios = {
        "lora_vs_base": lora / base,
        "lora_vs_peft": lora / systems["peft"].tokens_per_s,
        "thrash_vs_resident": thrash.tokens_per_s / lora,
        "merged_vs_modular": systems["engine_single_merged"].tokens_per_s
        / systems["engine_single_modular"].tokens_per_s,
        "merged_vs_base": systems["engine_single_merged"].tokens_per_s / base,
        f"merged_vs_modular_weight_bytes_{NUM_ADAPTERS}_adapters": merged_section[
            f"weight_bytes_for_{NUM_ADAPTERS}_adapters_merged"
        ]
        / merged_section[f"weight_bytes_for_{NUM_ADAPTERS}_adapters_modular"],
    }
    details = {
        **workload.as_dict(),
        "model_dir": str(model_dir),
        "dtype": "float32",
        "greedy": True,
        "threads": torch.get_num_threads(),
        "num_adapters": NUM_ADAPTERS,
        "adapter_rank": RANK,
        "adapter_targets": "all-linear",
        "peft_batch_size": HF_BATCH[workload],
        "engine_repeats": 1 if args.quick else REPEATS,
        "single_adapter": "engine_single_*: every request on one adapter, run in lockstep",
        "thrash": {
            "num_adapters": NUM_THRASH_ADAPTERS,
            "num_device_slots": NUM_THRASH_SLOTS,
            "zipf_exponent": ZIPF_EXPONENT,
        },
    }
    for name, results in runs.items():
        systems[name].extra["runs_tokens_per_s"] = [r.tokens_per_s for r in results]
    cold_load = {
        "extra_ttft_p50_s": from_disk,
        "tier": "disk",
        # what the fresh engine's cache did for the cold adapters: every one a disk hit
        **{
            f"disk_{name}": after[f"adapter_cache_disk_{name}"]
            - before[f"adapter_cache_disk_{name}"]
            for name in ("hits", "misses")
        },
        "from_source_extra_ttft_p50_s": from_source,
        "num_samples": NUM_COLD_SAMPLES,
        "rank": RANK,
    }
    print(format_table(systems))
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    print(f"cold adapter load, extra TTFT p50: {from_disk * 1000:.0f} ms from the local disk tier")
    print(f"  ({from_source * 1000:.0f} ms when first fetched from the source and verified)")
    print(
        f"merged export {merged_section['merged_export_s']:.1f} s; merging adds "
        f"{merged_section['merge_at_load_extra_s']:.1f} s to an engine's load"
    )
    write_report(
        args.json_path, details, systems, ratios,
        cold_adapter_load=cold_load, merged=merged_section,
    )  # fmt: skip
    return 0
