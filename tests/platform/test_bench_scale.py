"""`loramux bench scale --quick` end to end on a local Ray it starts: the contract JSON.

Timings and the affinity ratio are reported, not asserted (a shared 2-core machine); what is
asserted holds by construction: each run names its adapters afresh, so every distinct
adapter it requests is a cold load at least once, with affinity or without.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

pytest.importorskip("ray")

from loramux.bench.scale import NUM_ADAPTERS, QUICK, main, zipf_choices  # noqa: E402


def test_quick_bench_writes_contract_json(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    assert main(argparse.Namespace(json_path=str(out), model=None, quick=True)) == 0
    report = json.loads(out.read_text())

    workload = report["workload"]
    assert workload["num_requests"] == QUICK.num_requests
    assert (workload["num_adapters"], workload["num_engine_replicas"]) == (NUM_ADAPTERS, 2)
    systems = report["systems"]
    assert set(systems) == {"multiplexed", "unrouted"}
    for system in systems.values():
        for key in ("tokens_per_s", "ttft_p50_s", "ttft_p95_s"):
            assert system[key] > 0
        assert (
            system["adapter_cache"]["adapter_cache_device_misses"] == (system["cold_adapter_loads"])
        )

    distinct = len(set(zipf_choices(NUM_ADAPTERS, QUICK.num_requests, QUICK.seed)))
    with_affinity = systems["multiplexed"]["cold_adapter_loads"]
    without = systems["unrouted"]["cold_adapter_loads"]
    assert with_affinity >= distinct and without >= distinct
    assert set(report["ratios"]) == {"affinity_cold_loads", "affinity_tokens_per_s"}
    assert report["ratios"]["affinity_cold_loads"] == without / with_affinity
    assert report["ratios"]["affinity_tokens_per_s"] > 0

    cold_start = report["cold_start"]
    assert set(cold_start) == {
        "ray_start_to_first_token_s",
        "ray_start_to_replicas_ready_s",
        "first_request_s",
        "from_zero_replicas_to_first_token_s",
    }
    assert all(value > 0 for value in cold_start.values())
    assert report["targets"]["affinity_cold_loads"]["target"] == 3.0
