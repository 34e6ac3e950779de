"""`loramux bench scale`: two Ray Serve engine replicas, adapter-affine routing against none.

On a local Ray that this command starts (``pip install 'loramux[ray]'``):

- a tiny random LLaMA made here (no download; ``--model`` names another) and 32 random
  rank-16 all-linear PEFT adapters in a local storage directory, as the registry's storage
  holds them;
- one engine deployment (``loramux.ray_serve``) with two replicas, each with 16 device
  slots: the two together hold all 32 adapters, neither holds them all;
- one seeded workload, each request given an adapter drawn with Zipf popularity, run by 16
  concurrent clients, twice on the same replicas:
  - ``multiplexed``: ``RayEngineClient`` as the API uses it, the adapter version id as
    Serve's multiplexed model id, so a request goes to a replica that holds its adapter;
  - ``unrouted``: the same client without a model id (Serve's plain routing), each replica
    loading whatever adapter it gets;
  the two runs name the adapters under different namespaces, so both start cold in every
  cache tier (the engine keys its caches by namespace and content);
- ``ratios.affinity_cold_loads``: the unrouted run's cold adapter loads over the multiplexed
  run's, from the replicas' own cache counters (device-slot misses: a request whose replica
  did not hold its adapter), with throughput and TTFT p50/p95 of both in ``systems``;
- the cold start: from ``ray.init`` to the first token of the two-replica deployment, and,
  on an engine deployment scaled to zero, from a request to its first token (Serve starts a
  replica, which loads the base model).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loramux.bench.common import SystemResult, Workload, format_table, write_report
from loramux.settings import Settings

FULL = Workload(num_requests=512, min_prompt_tokens=16, max_prompt_tokens=64, output_tokens=16)
QUICK = Workload(num_requests=96, min_prompt_tokens=8, max_prompt_tokens=16, output_tokens=4)
NUM_ADAPTERS = 32
NUM_REPLICAS = 2
SLOTS_PER_REPLICA = 16
CONCURRENCY = 16
ZIPF_EXPONENT = 1.0
TARGET_AFFINITY_COLD_LOADS = 3.0
APP = "loramux-bench-scale"
ZERO_APP = "loramux-bench-scale-zero"
# LlamaConfig fields of the tiny model: token ids only, no tokenizer (the engine needs none).
TINY_MODEL: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "initializer_range": 0.2,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# The engine cache counters reported per system (summed over replicas, this run's share).
COUNTERS = (
    "adapter_cache_device_misses",
    "adapter_cache_device_hits",
    "adapter_cache_device_loads",
    "adapter_cache_device_evictions",
    "adapter_cache_host_hits",
    "adapter_cache_disk_hits",
    "adapter_cache_disk_misses",
)


def write_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    """A random-weight LLaMA in fp32, written where the engine replicas load it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model: Any = LlamaForCausalLM(LlamaConfig(**TINY_MODEL))
    model.to(torch.float32).save_pretrained(out_dir)
    return out_dir


def store_adapters(model_dir: Path, work: Path, storage_dir: Path) -> list[Any]:
    """``NUM_ADAPTERS`` random adapters (``bench lora``'s) put where the replicas fetch them."""
    from loramux.bench.lora import make_adapters
    from loramux.storage import LocalStorage, adapter_key
    from loramux_engine.lora.files import CONFIG_NAME, WEIGHTS_NAME

    refs = make_adapters(model_dir, work, NUM_ADAPTERS)
    storage = LocalStorage(storage_dir)
    for ref in refs:
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            storage.put(adapter_key(ref.sha256, name), (work / ref.sha256 / name).read_bytes())
    shutil.rmtree(work)
    return refs


def zipf_choices(count: int, num_requests: int, seed: int) -> list[int]:
    weights = [1 / (k + 1) ** ZIPF_EXPONENT for k in range(count)]
    return random.Random(seed).choices(range(count), weights, k=num_requests)


def replica_settings(home: Path, model_dir: Path, max_model_len: int) -> Settings:
    return Settings(
        home=home,
        storage_url=(home / "storage").as_uri(),
        model=str(model_dir),
        device="cpu",
        engine_max_model_len=max_model_len,
        engine_kv_cache_bytes=16 << 20,
        engine_max_num_seqs=CONCURRENCY,
        engine_num_threads=1,
        engine_max_loras=SLOTS_PER_REPLICA,
        ray_app_name=APP,
        ray_engine_min_replicas=NUM_REPLICAS,
        ray_engine_max_replicas=NUM_REPLICAS,
        # Both replicas share this machine's cores; each engine runs one thread.
        ray_engine_num_cpus=0,
        ray_replica_wait_s=300,
    )


@dataclass
class Run:
    tokens: int = 0
    ttfts: list[float] = field(default_factory=list)


async def run_requests(
    client: Any, name: str, prompts: list[list[int]], adapters: list[Any], output_tokens: int
) -> SystemResult:
    """All requests through ``client``, CONCURRENCY at a time; throughput and TTFT."""
    from loramux_engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_tokens, ignore_eos=True)
    pending = iter(range(len(prompts)))
    run = Run()

    async def one_client() -> None:
        for i in pending:
            sent = time.perf_counter()
            first: float | None = None
            async for out in client.generate(
                f"{name}-{i}",
                prompts[i],
                params,
                fairness_key=adapters[i].namespace,
                adapter=adapters[i],
            ):
                if out.new_token_ids and first is None:
                    first = time.perf_counter() - sent
                run.tokens += len(out.new_token_ids)
            assert first is not None
            run.ttfts.append(first)

    start = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(CONCURRENCY)))
    elapsed = time.perf_counter() - start
    return SystemResult.from_run(run.tokens, elapsed, run.ttfts, elapsed_s=elapsed)


async def first_token_s(client: Any, prompt: list[int]) -> float:
    """Seconds from sending one base-model request to its first token."""
    from loramux_engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    sent = time.perf_counter()
    async for out in client.generate(f"first-{uuid.uuid4().hex}", prompt, params, fairness_key=""):
        if out.new_token_ids:
            return time.perf_counter() - sent
    raise RuntimeError("the engine finished a request without a token")


async def counters(client: Any) -> dict[str, float]:
    """The replicas' cache counters, summed, once each has answered."""
    states = await client.poll_replica_stats(NUM_REPLICAS)
    return {name: sum(s.extra.get(name, 0.0) for s in states.values()) for name in COUNTERS}


async def measure(
    handle: Any, settings: Settings, workload: Workload, prompts: list[list[int]], refs: list[Any]
) -> tuple[dict[str, SystemResult], dict[str, dict[str, float]]]:
    """Both systems on the deployed replicas, one after the other; their cache counters."""
    from loramux.ray_engine import RayEngineClient
    from loramux_engine.lora.ref import AdapterRef

    choices = zipf_choices(len(refs), len(prompts), workload.seed)
    systems: dict[str, SystemResult] = {}
    loads: dict[str, dict[str, float]] = {}
    for name, route_by_adapter in (("multiplexed", True), ("unrouted", False)):
        client = RayEngineClient(
            handle,
            None,
            settings.engine_max_model_len or 0,
            replica_wait_s=settings.ray_replica_wait_s,
            route_by_adapter=route_by_adapter,
        )
        # Version ids and a namespace of this run's own: nothing of the other run is warm.
        named = [
            AdapterRef(f"av-{name}-{i}", ref.sha256, f"tenant-{name}") for i, ref in enumerate(refs)
        ]
        before = await counters(client)
        print(f"{name}: {len(prompts)} requests", file=sys.stderr)
        systems[name] = await run_requests(
            client, name, prompts, [named[c] for c in choices], workload.output_tokens
        )
        after = await counters(client)
        loads[name] = {key: after[key] - before[key] for key in COUNTERS}
        systems[name].extra.update(
            cold_adapter_loads=loads[name]["adapter_cache_device_misses"],
            adapter_cache=loads[name],
        )
    return systems, loads


def zero_engine_options(settings: Settings) -> tuple[Settings, dict[str, Any]]:
    """An engine deployment with no replica at rest: 0 to 1, scaling within a second."""
    from loramux.ray_serve.config import engine_options

    zero = settings.model_copy(
        update={
            "ray_app_name": ZERO_APP,
            "ray_engine_min_replicas": 0,
            "ray_engine_max_replicas": 1,
            "ray_engine_upscale_delay_s": 0.0,
            "ray_engine_downscale_delay_s": 1.0,
        }
    )
    options = engine_options(zero)
    # Serve averages ongoing requests over 30 s before it decides; a shorter window here.
    options["autoscaling_config"].update(look_back_period_s=1.0, metrics_interval_s=0.5)
    return zero, options


def cold_start_from_zero(settings: Settings, prompt: list[int]) -> float:
    """Seconds from a request to its first token on an engine deployment at zero replicas."""
    from ray import serve

    from loramux.ray_engine import RayEngineClient
    from loramux.ray_serve.config import ENGINE_DEPLOYMENT, settings_payload
    from loramux.ray_serve.engine import EngineDeployment

    zero, options = zero_engine_options(settings)
    app = EngineDeployment.options(**options).bind(settings_payload(zero))
    handle = serve.run(app, name=ZERO_APP, route_prefix=None)
    try:
        status = serve.status().applications[ZERO_APP].deployments[ENGINE_DEPLOYMENT]
        if sum(status.replica_states.values()):
            raise RuntimeError("the scale-to-zero deployment started with a replica")
        client = RayEngineClient(handle, None, 0, replica_wait_s=zero.ray_replica_wait_s)
        return asyncio.run(first_token_s(client, prompt))
    finally:
        serve.delete(ZERO_APP)


def main(args: argparse.Namespace) -> int:
    import os

    try:
        import ray
        from ray import serve
    except ImportError:
        from loramux.commands.output import CommandFailed

        raise CommandFailed("bench scale needs Ray Serve: pip install 'loramux[ray]'") from None
    from loramux.bench.engine import resolve_model_dir, vocab_size
    from loramux.ray_engine import RayEngineClient
    from loramux.ray_serve.config import engine_options, settings_payload
    from loramux.ray_serve.engine import EngineDeployment

    workload = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="loramux-bench-scale-") as tmp_name:
        tmp = Path(tmp_name)
        tiny = not args.model
        model_dir = write_tiny_model(tmp / "model") if tiny else resolve_model_dir(args.model)
        home = tmp / "home"
        refs = store_adapters(model_dir, tmp / "adapters", home / "storage")
        max_model_len = workload.max_prompt_tokens + workload.output_tokens
        settings = replica_settings(home, model_dir, max_model_len)
        prompts = workload.prompts(vocab_size(model_dir))

        own_ray = not ray.is_initialized()  # a test may have started one already
        started = time.perf_counter()
        if own_ray:
            ray.init(
                num_cpus=os.cpu_count() or 1,
                include_dashboard=False,
                object_store_memory=100 << 20,
                log_to_driver=False,
            )
            serve.start(proxy_location="Disabled")  # handles only: no HTTP port taken
        try:
            app = EngineDeployment.options(**engine_options(settings)).bind(
                settings_payload(settings)
            )
            handle = serve.run(app, name=APP, route_prefix=None)
            deployed_s = time.perf_counter() - started
            client = RayEngineClient(handle, None, max_model_len, replica_wait_s=300)

            async def first_then_both() -> tuple[Any, ...]:
                first = await first_token_s(client, prompts[0])
                start_to_first = time.perf_counter() - started
                # Each replica steps its engine before the clock starts.
                await asyncio.gather(*(first_token_s(client, prompts[0]) for _ in range(4)))
                return (
                    start_to_first,
                    first,
                    *await measure(handle, settings, workload, prompts, refs),
                )

            start_to_first, first_request_s, systems, loads = asyncio.run(first_then_both())
            serve.delete(APP)
            from_zero_s = cold_start_from_zero(settings, prompts[0])
        finally:
            for name in (APP, ZERO_APP):
                with contextlib.suppress(Exception):  # never deployed, or already gone
                    serve.delete(name)
            if own_ray:
                serve.shutdown()
                ray.shutdown()

    with_affinity = loads["multiplexed"]["adapter_cache_device_misses"]
    without = loads["unrouted"]["adapter_cache_device_misses"]
    ratios = {
        "affinity_cold_loads": without / with_affinity if with_affinity else None,
        "affinity_tokens_per_s": systems["multiplexed"].tokens_per_s
        / systems["unrouted"].tokens_per_s,
    }
    details = {
        **workload.as_dict(),
        "model": "tiny random LLaMA" if tiny else str(model_dir),
        "model_config": TINY_MODEL if tiny else None,
        "dtype": "float32",
        "device": "cpu",
        "greedy": True,
        "num_adapters": NUM_ADAPTERS,
        "adapter_rank": 16,
        "adapter_targets": "all-linear",
        "zipf_exponent": ZIPF_EXPONENT,
        "num_engine_replicas": NUM_REPLICAS,
        "device_slots_per_replica": SLOTS_PER_REPLICA,
        "engine_threads_per_replica": 1,
        "concurrent_clients": CONCURRENCY,
        "host_cpus": os.cpu_count(),
        "ray_version": ray.__version__,
        "cold_load": "a request whose replica did not hold its adapter in a device slot "
        "(adapter_cache_device_misses, summed over the replicas)",
    }
    cold_start = {
        "ray_start_to_first_token_s": start_to_first,
        "ray_start_to_replicas_ready_s": deployed_s,
        "first_request_s": first_request_s,
        "from_zero_replicas_to_first_token_s": from_zero_s,
    }
    ratio = ratios["affinity_cold_loads"]
    targets = {
        "affinity_cold_loads": {
            "target": TARGET_AFFINITY_COLD_LOADS,
            "met": ratio is not None and ratio >= TARGET_AFFINITY_COLD_LOADS,
        }
    }
    print(format_table(systems))
    for name in systems:
        print(f"{name}: {loads[name]['adapter_cache_device_misses']:.0f} cold adapter loads")
    for name, value in ratios.items():
        print(f"{name}: {'n/a' if value is None else f'{value:.2f}'}")
    print(
        f"cold start: ray.init to first token {start_to_first:.1f} s (two replicas); "
        f"from zero replicas to first token {from_zero_s:.1f} s"
    )
    write_report(args.json_path, details, systems, ratios, cold_start=cold_start, targets=targets)
    return 0
