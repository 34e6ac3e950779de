"""Shared benchmark pieces: seeded workloads, busy neighbours, latencies, the table, the JSON."""

from __future__ import annotations

import contextlib
import json
import math
import random
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class Workload:
    num_requests: int
    min_prompt_tokens: int
    max_prompt_tokens: int
    output_tokens: int
    seed: int = 0

    def prompts(self, vocab_size: int) -> list[list[int]]:
        """Random token ids, seeded; low ids are skipped as they hold special tokens."""
        rng = random.Random(self.seed)
        low = 100 if vocab_size > 1000 else 3
        return [
            [rng.randrange(low, vocab_size) for _ in range(n)]
            for n in (
                rng.randint(self.min_prompt_tokens, self.max_prompt_tokens)
                for _ in range(self.num_requests)
            )
        ]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class SystemResult:
    tokens_per_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_run(
        cls, num_tokens: int, seconds: float, ttfts: Sequence[float], **extra: Any
    ) -> SystemResult:
        return cls(
            tokens_per_s=num_tokens / seconds,
            ttft_p50_s=percentile(ttfts, 50),
            ttft_p95_s=percentile(ttfts, 95),
            extra=dict(extra),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "tokens_per_s": self.tokens_per_s,
            "ttft_p50_s": self.ttft_p50_s,
            "ttft_p95_s": self.ttft_p95_s,
            **self.extra,
        }


BUSY_LOOP = "while True: pass"
BUSY_START_S = 0.5  # time for every loop's interpreter to start and begin spinning


@contextlib.contextmanager
def busy_loops(count: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` one-core busy loops beside the benchmark, as a sidecar would be: separate
    processes, pinned nowhere (they inherit this process's affinity), killed on the way out.
    """
    loops: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count):
            loops.append(subprocess.Popen([sys.executable, "-c", BUSY_LOOP]))
        time.sleep(BUSY_START_S)
        yield loops
    finally:
        for loop in loops:
            loop.kill()
        for loop in loops:
            loop.wait()


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def format_table(systems: dict[str, SystemResult]) -> str:
    width = max([20, *map(len, systems)])
    header = f"{'system':<{width}} {'tokens/s':>10} {'TTFT p50 (s)':>13} {'TTFT p95 (s)':>13}"
    lines = [header, "-" * len(header)]
    for name, r in systems.items():
        lines.append(
            f"{name:<{width}} {r.tokens_per_s:>10.1f} {r.ttft_p50_s:>13.3f} {r.ttft_p95_s:>13.3f}"
        )
    return "\n".join(lines)


def write_report(
    path: str | None,
    workload: dict[str, Any],
    systems: dict[str, SystemResult],
    ratios: Mapping[str, float | None],
    **sections: Any,
) -> dict[str, Any]:
    """The contract JSON; ``sections`` are further top-level objects a benchmark adds.
    A ratio is None (JSON null) where its case had nothing to measure."""
    report = {
        "workload": workload,
        "systems": {name: r.as_dict() for name, r in systems.items()},
        "ratios": dict(ratios),
        **sections,
    }
    if path:
        Path(path).write_text(json.dumps(report, indent=2) + "\n")
    return report
