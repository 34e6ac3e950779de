"""`loramux bench spec --quick` runs end to end on a tiny model and writes the contract JSON."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from loramux.bench.spec import MODES, main


def test_quick_bench_spec_writes_contract_json(
    make_tiny_llama: Callable[..., Path], tmp_path: Path
) -> None:
    model_dir = make_tiny_llama(initializer_range=0.1)  # loops: drafts are accepted
    out = tmp_path / "spec.json"
    assert main(argparse.Namespace(json_path=str(out), model=str(model_dir), quick=True)) == 0
    report = json.loads(out.read_text())
    workload = report["workload"]
    assert workload["batch_size"] == 1 and workload["greedy"]
    assert workload["num_copy_prompts"] > 0 and workload["num_chat_prompts"] > 0
    systems = report["systems"]
    assert set(systems) == {f"{case}_{mode}" for case in ("copy", "chat") for mode in MODES}
    for name, system in systems.items():
        for key in ("tokens_per_s", "ttft_p50_s", "ttft_p95_s"):
            assert system[key] > 0, (name, key)
        assert system["num_requests"] == workload[f"num_{name.split('_')[0]}_prompts"]
        drafted, accepted = system["num_draft_tokens"], system["num_accepted_tokens"]
        if name.endswith("_off"):
            assert drafted == accepted == 0 and system["acceptance_rate"] is None
        else:
            assert 0 <= accepted <= drafted
    assert systems["copy_on"]["num_accepted_tokens"] > 0
    assert set(report["ratios"]) == {
        f"{kind}_{case}{suffix}"
        for case in ("copy", "chat")
        for kind, suffix in (
            ("spec_speedup", ""),
            ("spec_speedup", "_forced"),
            ("acceptance_rate", ""),
        )
    }
    assert report["ratios"]["spec_speedup_copy"] > 0
    # greedy outputs are the same with speculation on, auto and off
    assert report["checks"]["outputs_identical"] == {"copy": True, "chat": True}
    cost = report["step_cost"]
    assert set(cost["step_seconds"]) == set(cost["cost_vs_one"]) == {"1", "4"}
    assert cost["cost_vs_one"]["1"] == 1.0
