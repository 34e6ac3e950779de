"""`loramux bench api`: what the HTTP layer adds to a short completion, and /v1/models rps.

The same short, greedy completions run first straight through the in-process engine and
then through a live `loramux serve` (auth, rate limits, model resolution, usage record,
SSE), one at a time so the difference is the layer's own latency.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from loramux.bench.common import SystemResult, Workload, format_table, percentile, write_report
from loramux.bench.engine import resolve_model_dir

FULL = Workload(num_requests=40, min_prompt_tokens=16, max_prompt_tokens=16, output_tokens=8)
QUICK = Workload(num_requests=8, min_prompt_tokens=16, max_prompt_tokens=16, output_tokens=4)
MODELS_REQUESTS = {FULL: 1000, QUICK: 100}
ADMIN_KEY = "lmx_bench-admin-" + os.urandom(12).hex()


def run_direct(model_dir: Path, prompts: list[list[int]], output_tokens: int) -> SystemResult:
    from loramux_engine import EngineConfig, SamplingParams
    from loramux_engine.engine.async_engine import AsyncLLMEngine

    engine = AsyncLLMEngine.from_config(EngineConfig(str(model_dir), dtype="float32"))
    params = SamplingParams(temperature=0.0, max_tokens=output_tokens, ignore_eos=True)

    async def one(i: int, prompt: list[int]) -> tuple[float, float, int]:
        start = time.perf_counter()
        ttft, tokens = 0.0, 0
        async for out in engine.generate(f"direct-{i}", prompt, params):
            if out.new_token_ids and not tokens:
                ttft = time.perf_counter() - start
            tokens += len(out.new_token_ids)
        return ttft, time.perf_counter() - start, tokens

    async def run() -> list[tuple[float, float, int]]:
        await one(-1, prompts[0])  # warm-up
        return [await one(i, p) for i, p in enumerate(prompts)]

    try:
        results = asyncio.run(run())
    finally:
        engine.shutdown()
    return _summary(results)


def _summary(results: list[tuple[float, float, int]], **extra: float) -> SystemResult:
    latencies = [r[1] for r in results]
    return SystemResult.from_run(
        sum(r[2] for r in results),
        sum(latencies),
        [r[0] for r in results],
        latency_p50_s=percentile(latencies, 50),
        latency_p95_s=percentile(latencies, 95),
        **extra,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(model_dir: Path, home: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    env = {
        **os.environ,
        "LORAMUX_HOME": str(home),
        "LORAMUX_MODEL": str(model_dir),
        "LORAMUX_ADMIN_KEY": ADMIN_KEY,
        "LORAMUX_PORT": str(port),
    }
    for name in ("LORAMUX_DATABASE_URL", "LORAMUX_STORAGE_URL", "LORAMUX_REDIS_URL"):
        env.pop(name, None)  # the embedded defaults: SQLite, a local directory, no Redis
    log = (home / "serve.log").open("wb")
    loramux = str(Path(sys.executable).with_name("loramux"))
    process = subprocess.Popen([loramux, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"loramux serve exited; see {home / 'serve.log'}")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return process, base_url
        except httpx.HTTPError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError("loramux serve did not become ready in 300 s")


def tenant_key(base_url: str) -> str:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    tenant = httpx.post(f"{base_url}/admin/api/tenants", json={"name": "bench"}, headers=admin)
    tenant.raise_for_status()
    key = httpx.post(
        f"{base_url}/admin/api/tenants/bench/keys", json={"name": "bench"}, headers=admin
    )
    key.raise_for_status()
    return str(key.json()["key"])


def run_http(base_url: str, key: str, prompts: list[list[int]], output_tokens: int) -> SystemResult:
    headers = {"Authorization": f"Bearer {key}"}
    model = httpx.get(f"{base_url}/v1/models", headers=headers).json()["data"][0]["id"]

    def one(client: httpx.Client, prompt: list[int]) -> tuple[float, float, int]:
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": output_tokens,
            "temperature": 0,
            "stream": True,
        }
        start = time.perf_counter()
        ttft, chunks = 0.0, 0
        with client.stream("POST", "/v1/completions", json=body, headers=headers) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    if not chunks:
                        ttft = time.perf_counter() - start
                    chunks += 1
        return ttft, time.perf_counter() - start, output_tokens

    with httpx.Client(base_url=base_url, timeout=120) as client:
        one(client, prompts[0])  # warm-up
        return _summary([one(client, p) for p in prompts])


def models_rps(base_url: str, key: str, total: int, concurrency: int = 8) -> float:
    headers = {"Authorization": f"Bearer {key}"}

    async def run() -> float:
        async with httpx.AsyncClient(base_url=base_url, headers=headers) as client:
            remaining = total

            async def worker() -> None:
                nonlocal remaining
                while remaining > 0:
                    remaining -= 1
                    (await client.get("/v1/models")).raise_for_status()

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return total / (time.perf_counter() - start)

    return asyncio.run(run())


def main(args: argparse.Namespace) -> int:
    workload = QUICK if args.quick else FULL
    model_dir = resolve_model_dir(args.model)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(str(model_dir)).vocab_size
    prompts = workload.prompts(vocab)
    print(
        f"bench api: {workload.num_requests} sequential completions of "
        f"{workload.output_tokens} tokens on {model_dir.name}",
        file=sys.stderr,
    )
    direct = run_direct(model_dir, prompts, workload.output_tokens)
    with tempfile.TemporaryDirectory(prefix="loramux-bench-") as tmp:
        process, base_url = start_server(model_dir, Path(tmp))
        try:
            key = tenant_key(base_url)
            http = run_http(base_url, key, prompts, workload.output_tokens)
            rps = models_rps(base_url, key, MODELS_REQUESTS[workload])
        finally:
            process.terminate()
            process.wait(timeout=30)
    added = http.extra["latency_p50_s"] - direct.extra["latency_p50_s"]
    http.extra.update(added_latency_p50_s=added, models_requests_per_s=rps)
    systems = {"engine_direct": direct, "http_api": http}
    print(format_table(systems))
    print(
        f"latency p50: engine {direct.extra['latency_p50_s'] * 1000:.1f} ms, "
        f"HTTP {http.extra['latency_p50_s'] * 1000:.1f} ms, added {added * 1000:.1f} ms"
    )
    print(f"authenticated GET /v1/models: {rps:.0f} requests/s")
    write_report(
        args.json_path,
        {
            **workload.as_dict(),
            "model": model_dir.name,
            "models_requests": MODELS_REQUESTS[workload],
        },
        systems,
        {
            "http_vs_engine_latency": http.extra["latency_p50_s"] / direct.extra["latency_p50_s"],
            "added_latency_p50_ms": added * 1000,
            "models_requests_per_s": rps,
        },
    )
    return 0
