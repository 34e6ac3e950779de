"""`loramux bench engine --quick` runs end to end on a tiny model and writes the contract JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loramux.bench.engine import main


def test_quick_bench_writes_contract_json(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = argparse.Namespace(json_path=str(out), model=str(tiny_llama_dir), quick=True)
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert report["workload"]["num_requests"] > 0
    assert set(report["systems"]) == {"engine", "transformers", "matmul_bound"}
    for system in report["systems"].values():
        for key in ("tokens_per_s", "ttft_p50_s", "ttft_p95_s"):
            assert system[key] > 0
    assert set(report["ratios"]) == {"engine_vs_transformers", "engine_vs_matmul_bound"}
    assert all(value > 0 for value in report["ratios"].values())
