"""`loramux bench engine --quick` runs end to end on a tiny model and writes the contract JSON,
with the chat and shared-prefix cases."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from loramux.bench.common import busy_loops
from loramux.bench.engine import main


@pytest.fixture(scope="module")
def quick_report(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One quick run for the tests that read its JSON."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    args = argparse.Namespace(json_path=str(out), model=str(tiny_llama_dir), quick=True)
    assert main(args) == 0
    return dict(json.loads(out.read_text()))


def test_quick_bench_writes_contract_json(quick_report: dict[str, Any]) -> None:
    report = quick_report
    assert report["workload"]["num_requests"] > 0
    assert set(report["systems"]) == {
        "engine",
        "transformers",
        "matmul_bound",
        "chat",
        "shared_prefix_cache_on",
        "shared_prefix_cache_off",
        "single_stream",
    }
    for system in report["systems"].values():
        for key in ("tokens_per_s", "ttft_p50_s", "ttft_p95_s"):
            assert system[key] > 0
    assert set(report["ratios"]) == {
        "engine_vs_transformers",
        "engine_vs_matmul_bound",
        "kv_utilization_chat",
        "prefix_cache_ttft_speedup",
        "single_stream_vs_bandwidth_bound",
    }
    assert all(value > 0 for value in report["ratios"].values())


def test_quick_bench_chat_case_fills_the_cache_while_requests_wait(
    quick_report: dict[str, Any],
) -> None:
    report = quick_report
    case, chat = report["cases"]["chat"], report["systems"]["chat"]
    assert case["num_prompts"] == 8 and case["stop_at_eos"]
    # the quick budget holds fewer tokens than the prompts and answers need: some wait
    assert chat["kv_cache_tokens_total"] < case["num_prompts"] * case["max_tokens"]
    stored = chat["kv_tokens_stored_max_while_waiting"]
    assert 0 < stored <= chat["kv_cache_tokens_total"]
    assert report["ratios"]["kv_utilization_chat"] == stored / chat["kv_cache_tokens_total"]
    assert 0 < report["ratios"]["kv_utilization_chat"] <= 1
    assert chat["kv_block_size"] > 0
    assert chat["num_output_tokens"] > 0 and chat["num_preemptions"] >= 0
    assert 1 <= chat["running_mean"] <= chat["running_max"] <= case["num_prompts"]


def test_quick_bench_single_stream_is_measured_against_its_bandwidth_bound(
    quick_report: dict[str, Any],
) -> None:
    report = quick_report
    case, single = report["cases"]["single_stream"], report["systems"]["single_stream"]
    assert case["speculative"] == "off" and case["mean_batch_size"] == 1
    # one step per token (no drafts); every step after the first decodes one token
    assert case["num_steps"] == single["output_tokens"] - 1 > 0
    # the bound: the bytes the decode steps read (weights every step, the growing KV) over
    # the best read bandwidth measured in the same run, with the engine's threads
    assert case["bandwidth_bytes_per_s"] == max(
        case[key] for key in ("torch_sum_bytes_per_s", "c_read_bytes_per_s") if key in case
    )
    read = case["num_steps"] * (case["weight_bytes_per_step"] + case["mean_kv_bytes_per_step"])
    assert case["bound_s"] == pytest.approx(read / case["bandwidth_bytes_per_s"])
    assert single["ms_per_output_token"] == pytest.approx(
        1e3 * case["measured_s"] / case["num_steps"]
    )
    assert single["bound_ms_per_output_token"] == pytest.approx(
        1e3 * case["bound_s"] / case["num_steps"]
    )
    assert report["ratios"]["single_stream_vs_bandwidth_bound"] == pytest.approx(
        case["bound_s"] / case["measured_s"]
    )
    assert single["threads"] == case["threads"] >= 1


def test_quick_bench_shared_prefix_hits_only_with_caching_on(
    quick_report: dict[str, Any],
) -> None:
    report = quick_report
    case = report["cases"]["shared_prefix"]
    on = report["systems"]["shared_prefix_cache_on"]
    off = report["systems"]["shared_prefix_cache_off"]
    assert on["prefix_cache"] and not off["prefix_cache"]
    assert on["num_prompt_tokens"] == off["num_prompt_tokens"]
    assert on["num_prompt_tokens"] > case["num_requests"] * case["prefix_tokens"]
    # request 0 computes the prefix; every later one, submitted after it, finds all of it
    assert on["prefix_cache_hits_tokens"] >= (case["num_requests"] - 1) * case["prefix_tokens"]
    assert on["prefix_cache_hits_tokens"] <= on["prefix_cache_queries_tokens"]
    assert 0 < on["prefix_cache_hit_rate"] <= 1
    assert off["prefix_cache_hits_tokens"] == 0 and off["prefix_cache_hit_rate"] == 0
    assert report["ratios"]["prefix_cache_ttft_speedup"] == off["ttft_p50_s"] / on["ttft_p50_s"]


def test_contended_bench_reports_both_systems_beside_busy_loops(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bench.json"
    args = argparse.Namespace(json_path=str(out), model=str(tiny_llama_dir), quick=True, contend=1)
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert report["workload"]["busy_loops"] == 1
    assert {"engine_contended", "transformers_contended"} <= set(report["systems"])
    assert report["systems"]["engine_contended"]["tokens_per_s"] > 0
    assert report["systems"]["engine_contended"]["threads"] >= 1
    for name in ("engine_contended_vs_quiet", "transformers_contended_vs_quiet"):
        assert report["ratios"][name] > 0


def test_busy_loops_run_beside_and_end_with_the_block() -> None:
    with busy_loops(2) as loops:
        assert len(loops) == 2
        assert all(loop.poll() is None for loop in loops)  # still spinning
    assert all(loop.returncode is not None for loop in loops)  # killed and reaped


def test_busy_loops_end_when_the_block_raises() -> None:
    with pytest.raises(RuntimeError), busy_loops(1) as loops:
        raise RuntimeError("benchmark failed")
    assert loops[0].returncode is not None


def test_cli_refuses_a_negative_number_of_busy_loops(
    tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from loramux.cli import main as cli

    argv = ["bench", "engine", "--quick", "--contend", "-1", "--model", str(tiny_llama_dir)]
    assert cli(argv) == 1
    assert "--contend" in capsys.readouterr().err
