"""Microbenchmark of the LoRA op kernels on SmolLM2-135M shapes (not a test).

Times the 210 projections of one forward (30 layers x q/k/v/o/gate/up/down): the base
matmuls alone, then base plus each kernel, with rank-16 adapters on every projection in a
pool padded to max_rank. Run: ``python -m loramux_engine.lora.bench_ops [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F

from loramux_engine.lora.adapter import LoRAAdapter, LoRAWeights
from loramux_engine.lora.ops import Kernel, LoRABatch, add_lora
from loramux_engine.lora.peft_config import ProjectionTarget, ResolvedLoRAConfig
from loramux_engine.lora.pool import LoRASlotPool
from loramux_engine.lora.shape import PROJECTIONS, BaseModelShape

SMOLLM2 = BaseModelShape(
    num_layers=30, hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3, head_dim=64
)


def random_adapter(shape: BaseModelShape, rank: int, generator: torch.Generator) -> LoRAAdapter:
    weights = {}
    for layer, projection, _ in shape.projection_keys():
        in_features, out_features = shape.features(projection)
        a = torch.randn(rank, in_features, generator=generator) / in_features**0.5
        b = torch.randn(out_features, rank, generator=generator) / rank**0.5
        weights[(layer, projection)] = LoRAWeights(a=a, b=b, scale=2.0)
    targets = {key: ProjectionTarget(rank=rank, scale=2.0) for key in weights}
    config = ResolvedLoRAConfig(targets=targets, r=rank, lora_alpha=2.0 * rank, use_rslora=False)
    return LoRAAdapter(config=config, weights=weights, num_bytes=0)


def slot_ids_for(num_tokens: int, num_adapters: int, grouped: bool) -> list[int]:
    """Tokens spread evenly over slots 1..num_adapters, grouped by slot or round-robin."""
    ids = [1 + i % num_adapters for i in range(num_tokens)]
    return sorted(ids) if grouped else ids


def _forward(
    base: dict[tuple[int, str], torch.Tensor],
    xs: dict[str, torch.Tensor],
    pool: LoRASlotPool,
    batch: LoRABatch | None,
) -> list[float]:
    """Every projection of one forward (the same input per projection kind is enough here);
    returns each layer's seconds."""
    seconds = []
    for layer in range(pool.shape.num_layers):
        start = time.perf_counter()
        for projection in PROJECTIONS:
            y = F.linear(xs[projection], base[(layer, projection)])
            if batch is not None:
                add_lora(y, xs[projection], pool.stack(layer, projection), batch)
        seconds.append(time.perf_counter() - start)
    return seconds


def _best_seconds(fns: Sequence[Callable[[], list[float]]], repeats: int) -> list[float]:
    """Each fn's forward time as the sum over layers of the best of `repeats` runs.

    The machine is shared: taking the minimum per layer (a few ms each) rather than per
    forward keeps other processes' time slices out of the figures. The fns run in turns so
    that every layer's weights come from memory, as in a real forward.
    """
    best = [[float("inf")] * len(fn()) for fn in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            best[i] = [min(b, s) for b, s in zip(best[i], fn(), strict=True)]
    return [sum(layers) for layers in best]


def run(
    token_counts: tuple[int, ...] = (16, 64, 256),
    adapter_counts: tuple[int, ...] = (1, 4, 16),
    rank: int = 16,
    max_rank: int = 64,
    repeats: int = 5,
) -> list[dict[str, object]]:
    shape = SMOLLM2
    generator = torch.Generator().manual_seed(0)
    pool = LoRASlotPool(shape, num_slots=max(adapter_counts) + 1, max_rank=max_rank)
    for slot in range(1, pool.num_slots):
        pool.load(slot, random_adapter(shape, rank, generator))
    base = {
        (layer, p): torch.randn(shape.features(p)[1], shape.features(p)[0], generator=generator)
        for layer in range(shape.num_layers)
        for p in PROJECTIONS
    }
    rows: list[dict[str, object]] = []
    for num_tokens in token_counts:
        xs = {p: torch.randn(num_tokens, shape.features(p)[0]) for p in PROJECTIONS}

        cases: list[tuple[str, Kernel, bool]] = [
            ("sgmv_grouped", "sgmv", True),
            ("sgmv_interleaved", "sgmv", False),
            ("bmm_grouped", "bmm", True),
            ("bgmv", "bgmv", True),
        ]
        with torch.inference_mode():
            for num_adapters in adapter_counts:
                batches = [
                    LoRABatch.build(slot_ids_for(num_tokens, num_adapters, grouped), "cpu", kernel)
                    for _, kernel, grouped in cases
                ]
                fns = [partial(_forward, base, xs, pool, b) for b in (None, *batches)]
                base_s, *lora_s = _best_seconds(fns, repeats)
                row: dict[str, object] = {
                    "num_tokens": num_tokens,
                    "num_adapters": num_adapters,
                    "base_ms": round(base_s * 1e3, 1),
                }
                for (name, _, _), seconds in zip(cases, lora_s, strict=True):
                    row[f"{name}_ms"] = round((seconds - base_s) * 1e3, 1)
                    row[f"{name}_pct"] = round(100 * (seconds - base_s) / base_s, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(repeats=args.repeats)
    if args.json:
        with open(args.json, "w") as out:
            workload = {"shape": "SmolLM2-135M projections", "threads": torch.get_num_threads()}
            json.dump({"workload": workload, "rows": rows}, out)


if __name__ == "__main__":
    main()
