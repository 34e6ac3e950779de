"""`loramux bench lora --quick` runs end to end on a tiny model and writes the contract JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loramux.bench.lora import main


def test_quick_bench_writes_contract_json(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = argparse.Namespace(json_path=str(out), model=str(tiny_llama_dir), quick=True)
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert report["workload"]["num_requests"] > 0
    assert set(report["systems"]) == {
        "engine_base",
        "engine_lora",
        "engine_lora_thrash",
        "peft",
        "engine_single_modular",
        "engine_single_merged",
    }
    for system in report["systems"].values():
        for key in ("tokens_per_s", "ttft_p50_s", "ttft_p95_s"):
            assert system[key] > 0
    assert set(report["ratios"]) == {
        "lora_vs_base",
        "lora_vs_peft",
        "thrash_vs_resident",
        "merged_vs_modular",
        "merged_vs_base",
        "merged_vs_modular_weight_bytes_16_adapters",
    }
    assert all(value > 0 for value in report["ratios"].values())
    cold = report["cold_adapter_load"]
    assert cold["num_samples"] > 0
    # the headline cold load really came from the disk tier, not from the source
    assert cold["tier"] == "disk"
    assert (cold["disk_hits"], cold["disk_misses"]) == (cold["num_samples"], 0)
    assert all(
        isinstance(cold[k], float) for k in ("extra_ttft_p50_s", "from_source_extra_ttft_p50_s")
    )
    merged = report["merged"]
    assert merged["base_weight_bytes"] > 0 and merged["merged_export_s"] > 0
    assert isinstance(merged["merge_at_load_extra_s"], float)
    base, slot = merged["base_weight_bytes"], merged["lora_slot_bytes"]
    assert merged["weight_bytes_for_16_adapters_merged"] == 16 * base
    assert merged["weight_bytes_for_16_adapters_modular"] == base + 17 * slot
    assert all(
        report["systems"][n]["lockstep"] for n in ("engine_single_modular", "engine_single_merged")
    )
    for name in ("engine_base", "engine_lora"):
        runs = report["systems"][name]["runs_tokens_per_s"]
        assert report["systems"][name]["tokens_per_s"] in runs
    assert (
        "adapter_cache_device_evictions" in report["systems"]["engine_lora_thrash"]["adapter_cache"]
    )
