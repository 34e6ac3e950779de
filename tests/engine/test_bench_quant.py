"""`loramux bench quant --quick` runs end to end on a tiny model and writes the contract JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loramux.bench.quant import MODES, agreement, main


def test_quick_bench_writes_contract_json(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = argparse.Namespace(json_path=str(out), model=str(tiny_llama_dir), quick=True)
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert report["workload"]["perplexity_tokens_scored"] > 0
    assert set(report["systems"]) == {f"{m}_{case}" for m in MODES for case in ("single", "batch")}
    for system in report["systems"].values():
        assert system["tokens_per_s"] > 0 and system["ttft_p50_s"] > 0
    for mode in ("int8", "int4", "int4_fp32_head"):
        for key in ("vs_fp32", "vs_fp32_batch"):
            assert report["ratios"][f"{mode}_{key}"] > 0
        # the quantized weights really are smaller: about 1/4 and 1/8 of fp32 plus scales
        assert 0 < report["ratios"][f"{mode}_projection_memory_vs_fp32"] < 0.3
        assert 0 < report["ratios"][f"{mode}_weight_memory_vs_fp32"] < 1
        assert 0 <= report["ratios"][f"{mode}_greedy_identical"] <= 1
        assert report["ratios"][f"{mode}_perplexity_vs_fp32"] > 0
    memory = {mode: m["projection_and_head_bytes"] for mode, m in report["memory"].items()}
    assert memory["int4"] < memory["int8"] < memory["none"]
    assert memory["int4"] < memory["int4_fp32_head"] < memory["none"]
    fp32 = report["quality"]["none"]
    assert fp32["greedy_identical"] == fp32["greedy_prefix_agreement"] == 1.0
    assert fp32["perplexity"] > 1


def test_agreement_counts_identical_answers_and_shared_prefixes() -> None:
    reference = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10]]
    outputs = [[1, 2, 3, 4], [5, 9], [7, 8, 9]]
    exact, prefix = agreement(reference, outputs)
    assert exact == 1 / 3
    assert prefix == (1.0 + 0.5 + 0.75) / 3
