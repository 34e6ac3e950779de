"""`loramux bench gpu --device cpu --quick` through infra/gpu/run_bench.sh, as a GPU machine
runs it: without the platform's own dependencies, cachetools only from the carried wheel."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from loramux.bench.gpu import QUICK

REPO = Path(__file__).resolve().parents[2]
# Dependencies of the platform that a bare GPU machine does not have (cachetools comes as a
# wheel in infra/gpu/wheels and must be taken from there).
ABSENT = [
    "alembic",
    "boto3",
    "botocore",
    "cachetools",
    "celery",
    "gguf",
    "kombu",
    "multipart",
    "psycopg",
    "pydantic",
    "pydantic_settings",
    "ray",
    "redis",
    "sqlalchemy",
    "starlette",
    "uvicorn",
]
# Found first on PYTHONPATH: a top-level import of an ABSENT name looks in the wheels on
# sys.path only, as on the GPU machine; everything else is found as usual.
BARE_MACHINE = """
import importlib.machinery, sys

ABSENT = set({absent!r})
WHEELS = [p for p in sys.path if p.endswith(".whl")]
PATH_FINDER = importlib.machinery.PathFinder


class BareMachine:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if path is None and name in ABSENT:
            return PATH_FINDER.find_spec(name, WHEELS)
        return PATH_FINDER.find_spec(name, path, target)

    @classmethod
    def find_distributions(cls, *args, **kwargs):  # importlib.metadata's lookups
        return PATH_FINDER.find_distributions(*args, **kwargs)

    @classmethod
    def invalidate_caches(cls):
        PATH_FINDER.invalidate_caches()


sys.meta_path[sys.meta_path.index(PATH_FINDER)] = BareMachine
"""


def test_quick_cpu_run_writes_the_contract_json(tmp_path: Path) -> None:
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(BARE_MACHINE.format(absent=ABSENT))
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "OUT": str(out),
        "TMPDIR": str(tmp_path),
        "PYTHONPATH": str(guard),
    }
    # the guard holds: no platform-only package, cachetools from the wheel alone
    probe = (
        "import cachetools, importlib.util; print(cachetools.__file__); "
        "print(importlib.util.find_spec('sqlalchemy'))"
    )
    paths = f"{REPO}/platform:{REPO}/engine:{next((REPO / 'infra/gpu/wheels').glob('*.whl'))}"
    found = subprocess.run(
        [sys.executable, "-c", probe],
        env={**env, "PYTHONPATH": f"{paths}:{guard}"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert found[0].startswith(str(REPO / "infra/gpu/wheels"))
    assert found[1] == "None"

    proc = subprocess.run(
        ["bash", str(REPO / "infra/gpu/run_bench.sh"), "--device", "cpu", "--quick"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (out / "bench-gpu.log").read_text()
    assert "smollm2-135m/engine_lora" in log  # the table
    assert "llama3-8b: runs on CUDA only" in log
    report = json.loads((out / "bench-gpu.json").read_text())

    assert report["complete"] is True
    workload = report["workload"]
    assert workload["num_requests"] == QUICK.num_requests
    assert workload["headline_shape"] == "smollm2-135m"
    assert report["device"]["type"] == "cpu"
    assert report["device"]["bandwidth_source"] == "measured tensor copy"
    assert report["shapes"]["llama3-8b"] == {"skipped": "runs on CUDA only, not on cpu"}

    systems = report["systems"]
    names = ("engine", "engine_lora", "engine_eager", "transformers", "peft")
    assert set(systems) == {f"smollm2-135m/{name}" for name in names}
    for system in systems.values():
        assert system["ttft_p95_s"] >= system["ttft_p50_s"] > 0
        # every request got all its tokens
        num_tokens = system["tokens_per_s"] * system["elapsed_s"]
        assert round(num_tokens) == QUICK.num_requests * QUICK.output_tokens

    def tokens_per_s(name: str) -> float:
        return systems[f"smollm2-135m/{name}"]["tokens_per_s"]

    shape = report["shapes"]["smollm2-135m"]
    decode = shape["decode"]
    ratios = report["ratios"]
    assert ratios == shape["ratios"]
    assert ratios == {
        "engine_vs_transformers": tokens_per_s("engine") / tokens_per_s("transformers"),
        "lora_vs_base": tokens_per_s("engine_lora") / tokens_per_s("engine"),
        "lora_vs_peft": tokens_per_s("engine_lora") / tokens_per_s("peft"),
        "decode_vs_bandwidth_bound": decode["bound_s"] / decode["measured_s"],
        "graphs_vs_eager": tokens_per_s("engine") / tokens_per_s("engine_eager"),
    }
    assert all(math.isfinite(v) and v > 0 for v in ratios.values())

    # One prefill step takes every prompt (they fit the token budget); then each decode step
    # reads every weight once and each sequence's keys and values so far.
    assert decode["num_steps"] == QUICK.output_tokens - 1
    assert decode["mean_batch_size"] == QUICK.num_requests
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape["model"]))
    # tied embeddings: the LM head is the embedding, and every parameter is read once
    params = sum(p.numel() for p in model.parameters())
    assert decode["weight_bytes_per_step"] == 2 * params  # bf16
    config = shape["model"]
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    kv_bytes = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 2
    prompt_tokens = sum(len(p) for p in QUICK.prompts(config["vocab_size"]))
    # decode step j (1 to 7) reads prompt_tokens + num_requests * j tokens' keys and values
    mean_tokens = prompt_tokens + QUICK.num_requests * QUICK.output_tokens / 2
    assert decode["mean_kv_bytes_per_step"] == mean_tokens * kv_bytes
    bytes_read = decode["weight_bytes_per_step"] + decode["mean_kv_bytes_per_step"]
    bound_s = decode["num_steps"] * bytes_read / decode["bandwidth_bytes_per_s"]
    assert math.isclose(decode["bound_s"], bound_s)
    assert shape["attention_backend"] == "sdpa"  # bf16 on a CPU: no C kernel, no Triton
    graphs = shape["cuda_graphs"]  # none on a CPU: both runs eager
    assert (graphs["enabled"], graphs["num_captures"], graphs["num_replays"]) == (False, 0, 0)
    assert graphs["decode_step_p50_s"] > 0 and graphs["eager_decode_step_p50_s"] > 0
    assert set(shape["seconds"]) == {
        "model",
        "transformers",
        "adapters",
        "peft",
        "engine_load",
        "engine",
    }
