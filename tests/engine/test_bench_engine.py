"""`loramux bench engine --quick` runs end to end on a tiny model and writes the contract JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from loramux.bench.common import busy_loops
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
