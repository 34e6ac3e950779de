"""`loramux bench api --quick` runs end to end and writes the benchmark JSON contract."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loramux.bench import api


def test_bench_api_quick(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "bench-api.json"
    args = argparse.Namespace(json_path=str(out), model=str(tiny_llama_dir), quick=True)
    assert api.main(args) == 0
    report = json.loads(out.read_text())
    assert set(report) == {"workload", "systems", "ratios"}
    for system in ("engine_direct", "http_api"):
        result = report["systems"][system]
        assert result["tokens_per_s"] > 0 and result["ttft_p50_s"] > 0
        assert result["ttft_p95_s"] >= result["ttft_p50_s"]
    assert report["ratios"]["http_vs_engine_latency"] > 0
    assert report["ratios"]["models_requests_per_s"] > 0
    assert "http_api" in capsys.readouterr().out
