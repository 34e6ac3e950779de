"""loramux on Ray Serve, on a local Ray this module starts once (2 CPUs, small object store).

One application (the ingress and two engine replicas on the tiny LLaMA) serves every test
but the scale-from-zero ones, which deploy an engine of their own with no replica at rest.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from loramux import tenancy  # noqa: E402
from loramux.db.migrate import upgrade  # noqa: E402
from loramux.db.models import UsageRecord  # noqa: E402
from loramux.db.session import transaction  # noqa: E402
from loramux.engine_client import (  # noqa: E402
    InProcessEngineClient,
    engine_config_from_settings,
)
from loramux.errors import ServiceUnavailable  # noqa: E402
from loramux.ray_engine import RayEngineClient  # noqa: E402
from loramux.ray_serve.app import build_app  # noqa: E402
from loramux.ray_serve.config import (  # noqa: E402
    ENGINE_DEPLOYMENT,
    engine_options,
    settings_payload,
)
from loramux.ray_serve.engine import EngineDeployment  # noqa: E402
from loramux.ray_serve.wire import Accepted, ReplicaStats  # noqa: E402
from loramux.remote_engine import RemoteEngineClient  # noqa: E402
from loramux.settings import Settings  # noqa: E402
from loramux.storage import LocalStorage, adapter_key  # noqa: E402
from loramux_engine.engine.async_engine import AsyncLLMEngine  # noqa: E402
from loramux_engine.errors import PromptTooLongError  # noqa: E402
from loramux_engine.lora.errors import AdapterLoadError  # noqa: E402
from loramux_engine.lora.ref import AdapterRef, adapter_sha256  # noqa: E402
from loramux_engine.outputs import EngineStats, RequestOutput  # noqa: E402
from loramux_engine.sampling_params import SamplingParams  # noqa: E402
from tests.platform.conftest import ADMIN_KEY  # noqa: E402
from tests.platform.registry_rows import add_adapter_version  # noqa: E402

APP = "loramux-test"
NUM_ADAPTERS = 8
NUM_ROUTED_REQUESTS = 200
MISSING_SHA = "0" * 64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ray_session() -> Iterator[int]:
    """A local Ray and Serve, its HTTP proxy on a free port; the port."""
    port = _free_port()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=80 << 20,
        log_to_driver=False,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_settings(
    pg_database: str,
    redis_url: str,
    tiny_llama_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Settings:
    home = tmp_path_factory.mktemp("ray-home")
    upgrade(pg_database)
    return Settings(
        home=home,
        database_url=pg_database,
        storage_url=(home / "storage").as_uri(),
        redis_url=redis_url,
        admin_key=ADMIN_KEY,
        model=str(tiny_llama_dir),
        device="cpu",
        engine_max_model_len=256,
        engine_kv_cache_bytes=8 << 20,
        engine_max_num_seqs=16,
        engine_num_threads=1,
        engine_max_loras=NUM_ADAPTERS,
        ray_app_name=APP,
        ray_engine_min_replicas=2,
        ray_engine_max_replicas=2,
        ray_engine_num_cpus=0,
        ray_ingress_replicas=2,
        ray_ingress_num_cpus=0,
    )


@pytest.fixture(scope="module")
def deployed(ray_session: int, ray_settings: Settings) -> Iterator[RayEngineClient]:
    """The whole application: two ingress replicas at /, two engine replicas; a client."""
    serve.run(build_app(ray_settings), name=APP, route_prefix="/")
    handle = serve.get_deployment_handle(ENGINE_DEPLOYMENT, APP)
    yield RayEngineClient.from_settings(ray_settings, handle)
    serve.delete(APP)


@pytest.fixture(scope="module")
def local_engine(ray_settings: Settings) -> Iterator[InProcessEngineClient]:
    storage = LocalStorage(ray_settings.home / "storage")
    config = engine_config_from_settings(
        ray_settings.model_copy(update={"adapter_cache_dir": ray_settings.home / "local-cache"}),
        storage,
    )
    engine = InProcessEngineClient(AsyncLLMEngine.from_config(config))
    engine.start()
    yield engine
    engine.shutdown()


def _save_peft_adapter(base_dir: Path, out_dir: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(
        task_type="CAUSAL_LM",
        init_lora_weights=False,
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        get_peft_model(model, config).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def adapters(
    ray_settings: Settings, tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> list[AdapterRef]:
    """Adapters in the storage the replicas fetch from, as the registry would name them."""
    storage = LocalStorage(ray_settings.home / "storage")
    refs = []
    for seed in range(NUM_ADAPTERS):
        out = _save_peft_adapter(tiny_llama_dir, tmp_path_factory.mktemp("adapter"), seed)
        config = (out / "adapter_config.json").read_bytes()
        weights = (out / "adapter_model.safetensors").read_bytes()
        sha = adapter_sha256(config, weights)
        storage.put(adapter_key(sha, "adapter_config.json"), config)
        storage.put(adapter_key(sha, "adapter_model.safetensors"), weights)
        refs.append(AdapterRef(f"av_{seed}", sha, "tenant-a"))
    return refs


async def _run(
    engine: Any,
    request_id: str,
    prompt: list[int],
    max_tokens: int,
    adapter: AdapterRef | None = None,
) -> list[RequestOutput]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [
        out
        async for out in engine.generate(
            request_id, prompt, params, fairness_key="tenant-a", adapter=adapter
        )
    ]


def _tokens(outputs: list[RequestOutput]) -> list[int]:
    return [t for out in outputs for t in out.new_token_ids]


async def _served_by(client: RayEngineClient, request_id: str, adapter: AdapterRef) -> str:
    """Serve one request for the adapter as the client does; the replica that took it."""
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    response = client.handle.options(stream=True, multiplexed_model_id=adapter.id)
    items = [
        item
        async for item in response.generate.remote(
            request_id, PROMPT, params, "tenant-a", 0, adapter
        )
    ]
    assert isinstance(items[0], Accepted) and isinstance(items[-1], ReplicaStats)
    return items[0].replica_id


async def _until_routed(client: RayEngineClient, adapter: AdapterRef, replica_id: str) -> None:
    """Until Serve routes the adapter's requests to ``replica_id``.

    A replica reports the adapters it took every tenth of a second; until the router has
    heard, it sends a request for an adapter nobody holds to the replica with fewest.
    """
    holder = client.handle.options(multiplexed_model_id=adapter.id)
    in_a_row = 0
    for _ in range(500):
        state = await holder.replica_stats.remote()
        in_a_row = in_a_row + 1 if state.replica_id == replica_id else 0
        if in_a_row == 5:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"Serve never routed {adapter.id} to {replica_id}")


async def _replica_states(client: RayEngineClient) -> dict[str, EngineStats]:
    """Both engine replicas' stats, asked until each has answered (calls go anywhere)."""
    return await client.poll_replica_stats(2)


PROMPT = list(range(10, 40))


async def test_stream_equals_the_local_engine(
    deployed: RayEngineClient, local_engine: InProcessEngineClient, adapters: list[AdapterRef]
) -> None:
    for adapter in (None, adapters[0]):
        remote = await _run(deployed, "eq-remote", PROMPT, 24, adapter)
        local = await _run(local_engine, "eq-local", PROMPT, 24, adapter)
        assert len(remote) > 1  # streamed, one output per step
        assert _tokens(remote) == _tokens(local)
        assert "".join(o.text for o in remote) == "".join(o.text for o in local)
        assert remote[-1].finish_reason == local[-1].finish_reason == "length"
    base, adapted = _tokens(await _run(deployed, "b", PROMPT, 24)), _tokens(remote)
    assert base != adapted  # the adapter was applied
    assert deployed.max_model_len == local_engine.max_model_len


async def test_adapter_requests_go_to_the_replica_holding_the_adapter(
    deployed: RayEngineClient, adapters: list[AdapterRef]
) -> None:
    """Two engine replicas, 8 adapters, 200 requests: each adapter is loaded by one replica
    only, and at least 90% of requests find it held by the replica that takes them.

    From the replicas' own cache counters: a device miss is a request whose replica did not
    hold its adapter; every adapter is new here (a namespace of this test: other cache keys),
    so each needs one miss at least, and exactly one means it was loaded on one replica. The
    first request of each names the replica Serve chose; once Serve routes the adapter
    there (a replica reports what it holds every tenth of a second), the rest go in rounds
    of one request per adapter, all at once.

    The same requests without the model id (Serve's plain routing), for adapters the
    replicas have not seen either, load them on both replicas.
    """
    fresh = [AdapterRef(f"affine_{a.id}", a.sha256, "tenant-affine") for a in adapters]
    before = await _counters(deployed)
    for adapter in fresh:
        holder = await _served_by(deployed, f"first-{adapter.id}", adapter)
        await _until_routed(deployed, adapter, holder)
    rounds = (NUM_ROUTED_REQUESTS - NUM_ADAPTERS) // NUM_ADAPTERS
    for round_ in range(rounds):
        await asyncio.gather(
            *(
                _run(deployed, f"route-{round_}-{i}", PROMPT, 2, adapter)
                for i, adapter in enumerate(fresh)
            )
        )
    requests = NUM_ADAPTERS * (1 + rounds)
    assert requests == NUM_ROUTED_REQUESTS
    routed = _minus(await _counters(deployed), before)
    assert len(deployed.replica_stats()) == 2  # both replicas took requests
    assert routed["adapter_cache_device_misses"] == NUM_ADAPTERS  # one replica each
    assert routed["adapter_cache_device_loads"] == NUM_ADAPTERS
    assert (requests - routed["adapter_cache_device_misses"]) / requests >= 0.9

    unrouted = [AdapterRef(f"nx_{a.id}", a.sha256, "tenant-b") for a in adapters]
    plain = RayEngineClient(
        deployed.handle,
        deployed.tokenizer,
        deployed.max_model_len,
        replica_wait_s=deployed.replica_wait_s,
        route_by_adapter=False,
    )
    before = await _counters(deployed)
    for round_ in range(5):
        await asyncio.gather(
            *(
                _run(plain, f"unrouted-{round_}-{i}", PROMPT, 2, adapter)
                for i, adapter in enumerate(unrouted)
            )
        )
    loads = _minus(await _counters(deployed), before)["adapter_cache_device_loads"]
    assert loads > NUM_ADAPTERS + 1  # some loaded on both replicas


async def _counters(client: RayEngineClient) -> dict[str, float]:
    """Both engine replicas' adapter cache counters, summed."""
    states = await client.poll_replica_stats(2)
    names = {name for s in states.values() for name in s.extra if name.startswith("adapter_")}
    return {name: sum(s.extra.get(name, 0.0) for s in states.values()) for name in names}


def _minus(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {name: value - before.get(name, 0.0) for name, value in after.items()}


async def test_a_deleted_adapter_is_dropped_by_the_replica_holding_it(
    deployed: RayEngineClient, adapters: list[AdapterRef]
) -> None:
    adapter = AdapterRef("av_deleted", adapters[2].sha256, "tenant-c")
    await _until_routed(deployed, adapter, await _served_by(deployed, "resident", adapter))

    async def resident() -> float:
        states = await _replica_states(deployed)
        return sum(s.extra["adapter_cache_device_resident"] for s in states.values())

    before = await resident()
    deployed.drop_adapter(adapter)  # as the API does on a delete: sync, not awaited
    for _ in range(100):
        if await resident() < before:
            break
        await asyncio.sleep(0.05)
    assert await resident() == before - 1


async def test_leaving_a_stream_aborts_the_request_in_the_replica(
    deployed: RayEngineClient,
) -> None:
    before = await _generated(deployed)
    max_tokens = 200
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    stream = deployed.generate("leave", PROMPT, params, fairness_key="tenant-a")
    assert len((await anext(stream)).new_token_ids) == 1
    await anext(stream)
    await stream.aclose()
    # Had it gone on, a replica would have generated all max_tokens.
    assert await _generated(deployed) - before < max_tokens


async def _generated(client: RayEngineClient) -> int:
    """Tokens both replicas have generated, once neither runs anything."""
    for _ in range(200):
        states = await _replica_states(client)
        if all(s.num_running == 0 for s in states.values()):
            return sum(s.num_generation_tokens_total for s in states.values())
        await asyncio.sleep(0.05)
    raise AssertionError("a replica is still running requests")


@dataclass
class _Raised:
    type: type[BaseException]
    message: str


async def _raised(engine: Any, prompt: list[int], adapter: AdapterRef | None) -> _Raised:
    with pytest.raises(Exception) as caught:
        await _run(engine, "err", prompt, 4, adapter)
    return _Raised(type(caught.value), str(caught.value))


async def test_engine_errors_are_the_local_clients_errors(
    deployed: RayEngineClient, local_engine: InProcessEngineClient
) -> None:
    """The same exception types and messages, so the API maps them to the same errors."""
    missing = AdapterRef("av_missing", MISSING_SHA, "tenant-a")
    cases = [(PROMPT, missing, AdapterLoadError), (list(range(300)), None, PromptTooLongError)]
    for prompt, adapter, kind in cases:
        remote = await _raised(deployed, prompt, adapter)
        local = await _raised(local_engine, prompt, adapter)
        assert remote.type is local.type is kind
        assert remote.message == local.message


def _tenant(sessions: sessionmaker[Session], name: str, **quotas: Any) -> tuple[str, str]:
    """A tenant's id and a key for it, in the registry the ingress uses."""
    with transaction(sessions) as session:
        tenant = tenancy.create_tenant(session, name, quotas, actor="test")
        _, secret = tenancy.create_key(session, tenant, name="k", scopes=None, actor="test")
        return tenant.id, secret


@pytest.fixture
def tenant_key(deployed: RayEngineClient, db: sessionmaker[Session]) -> str:
    return _tenant(db, "ray-tenant")[1]


def test_rate_limits_are_exact_across_ingress_replicas(
    ray_session: int, deployed: RayEngineClient, db: sessionmaker[Session], ray_settings: Settings
) -> None:
    """Two ingress replicas count one tenant's requests together, in Redis."""
    _, key = _tenant(db, "ray-limited", requests_per_minute=5)
    body = {"model": Path(ray_settings.model).name, "prompt": "hi", "max_tokens": 1}
    statuses = []
    with httpx.Client(
        base_url=f"http://127.0.0.1:{ray_session}",
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    ) as client:
        for _ in range(12):
            statuses.append(client.post("/v1/completions", json=body).status_code)
    # Counted by each replica on its own, both would admit up to 5 (the proxy spreads them).
    assert statuses.count(200) == 5
    assert statuses.count(429) == 7


def test_the_api_on_ray_serve_answers_the_openai_sdk(
    ray_session: int, deployed: RayEngineClient, tenant_key: str, ray_settings: Settings
) -> None:
    from openai import OpenAI

    client = OpenAI(
        base_url=f"http://127.0.0.1:{ray_session}/v1", api_key=tenant_key, max_retries=0
    )
    model = Path(ray_settings.model).name
    completion = client.completions.create(model=model, prompt="hello", max_tokens=6, temperature=0)
    assert completion.usage is not None and completion.usage.completion_tokens == 6
    chunks = list(
        client.completions.create(
            model=model, prompt="hello", max_tokens=6, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == completion.choices[0].text
    unknown = client.with_options(max_retries=0)
    with pytest.raises(Exception) as caught:
        unknown.completions.create(model="no-such-adapter", prompt="hello", max_tokens=2)
    assert getattr(caught.value, "status_code", None) == 404


async def test_the_api_on_ray_serve_maps_engine_errors_and_aborts_when_the_client_leaves(
    ray_session: int,
    deployed: RayEngineClient,
    db: sessionmaker[Session],
    adapters: list[AdapterRef],
) -> None:
    tenant_id, key = _tenant(db, "ray-adapters")
    with transaction(db) as session:
        add_adapter_version(session, tenant_id, "good", adapters[0].sha256)
        add_adapter_version(session, tenant_id, "broken", MISSING_SHA)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{ray_session}",
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    ) as client:
        broken = await client.post(
            "/v1/completions", json={"model": "broken", "prompt": "hi", "max_tokens": 2}
        )
        assert broken.status_code == 503
        assert broken.headers["Retry-After"]
        assert broken.json()["error"]["code"] == "engine_error"

        body = {"model": "good", "prompt": "hi", "max_tokens": 200, "temperature": 0}
        whole = await client.post("/v1/completions", json=body)
        assert whole.json()["choices"][0]["finish_reason"] == "length"  # runs all 200
        before = await _generated(deployed)
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            lines = r.aiter_lines()
            while not (await anext(lines)).startswith("data: "):
                pass
    assert await _generated(deployed) - before < 200


async def test_batch_workers_reach_the_ray_engine_through_the_ingress(
    ray_session: int, deployed: RayEngineClient, tiny_llama_dir: Path
) -> None:
    """A Celery worker's RemoteEngineClient calls the ingress, whose engine is on Ray."""
    remote = RemoteEngineClient(f"http://127.0.0.1:{ray_session}", ADMIN_KEY, tiny_llama_dir)
    assert remote.max_model_len == deployed.max_model_len
    outputs = await _run(remote, "worker-line", PROMPT, 8)
    assert _tokens(outputs) == _tokens(await _run(deployed, "direct", PROMPT, 8))


@pytest.fixture
def zero_engine(ray_session: int, ray_settings: Settings) -> Iterator[RayEngineClient]:
    """An engine deployment that scales to zero after one idle second, none at rest."""
    settings = ray_settings.model_copy(
        update={
            "ray_app_name": f"{APP}-zero",
            "ray_engine_min_replicas": 0,
            "ray_engine_max_replicas": 1,
            "ray_engine_upscale_delay_s": 0.0,
            "ray_engine_downscale_delay_s": 1.0,
        }
    )
    options = engine_options(settings)
    # Serve averages ongoing requests over 30 s before it decides; a shorter window here.
    options["autoscaling_config"].update(look_back_period_s=1.0, metrics_interval_s=0.5)
    app = EngineDeployment.options(**options).bind(settings_payload(settings))
    handle = serve.run(app, name=settings.ray_app_name, route_prefix=None)
    yield RayEngineClient.from_settings(settings, handle)
    serve.delete(settings.ray_app_name)


def _num_replicas(app: str) -> int:
    status = serve.status().applications[app].deployments[ENGINE_DEPLOYMENT]
    return sum(status.replica_states.values())


async def test_scale_from_zero_waits_for_a_replica_then_back_to_zero(
    zero_engine: RayEngineClient,
) -> None:
    app = f"{APP}-zero"
    assert _num_replicas(app) == 0
    zero_engine.replica_wait_s = 0.2  # shorter than any replica's start: a clean 503
    with pytest.raises(ServiceUnavailable) as caught:
        await _run(zero_engine, "cold-503", PROMPT, 2)
    assert caught.value.headers["Retry-After"]
    assert caught.value.code == "engine_unavailable"

    zero_engine.replica_wait_s = 120.0
    started = time.monotonic()
    outputs = await _run(zero_engine, "cold", PROMPT, 2)
    cold_start_s = time.monotonic() - started
    assert _tokens(outputs) and outputs[-1].finish_reason == "length"
    print(f"\ncold start from zero replicas to the last token: {cold_start_s:.1f} s")
    for _ in range(300):
        if _num_replicas(app) == 0:
            break
        await asyncio.sleep(0.1)
    assert _num_replicas(app) == 0


async def test_a_replica_killed_mid_stream_fails_that_stream_and_bills_it_once(
    ray_session: int,
    deployed: RayEngineClient,
    db: sessionmaker[Session],
    adapters: list[AdapterRef],
) -> None:
    """Through the API: that stream ends in-band with a clean 503 event, the next request
    succeeds, and the registry holds exactly one usage record per request, the failed
    stream's with the tokens it had when its replica died.

    The killed replica is the one holding the tenant's adapter, named by a first request
    for it. Its weights are the "good" adapter's, on which this prompt runs all 200 tokens
    (no EOS): over a second on the tiny model, while the error arrives within milliseconds.
    """
    tenant_id, key = _tenant(db, "ray-killed")
    with transaction(db) as session:
        version_id = add_adapter_version(session, tenant_id, "doomed", adapters[0].sha256).id
    adapter = AdapterRef(version_id, adapters[0].sha256, namespace=tenant_id)  # as resolved
    victim = await _served_by(deployed, "first-doomed", adapter)
    await _until_routed(deployed, adapter, victim)

    body = {"model": "doomed", "prompt": "hi", "max_tokens": 200, "temperature": 0}
    events: list[dict[str, Any]] = []
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{ray_session}",
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    ) as client:
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                events.append(json.loads(line.removeprefix("data: ")))
                if len(events) == 1:  # the stream is running on the victim: kill it
                    name = f"SERVE_REPLICA::{APP}#{ENGINE_DEPLOYMENT}#{victim}"
                    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        after = await client.post("/v1/completions", json={**body, "max_tokens": 4})
    assert after.status_code == 200

    error = events[-1]["error"]
    assert error["code"] == "engine_unavailable"
    assert "SERVE_REPLICA" not in error["message"]
    chunks = events[:-1]
    assert all("error" not in chunk for chunk in chunks)
    assert 1 <= len(chunks) < body["max_tokens"]  # it ended early, and only once

    with db() as session:
        rows = session.scalars(select(UsageRecord).where(UsageRecord.tenant_id == tenant_id)).all()
    by_request = {row.request_id: row for row in rows}
    assert len(rows) == len(by_request) == 2  # one record per request
    failed, ok = by_request[chunks[0]["id"]], by_request[after.json()["id"]]
    assert failed.status == "error"
    assert failed.adapter_version_id == version_id
    # Billed for the tokens generated before the replica died (each chunk carries one
    # step's output), not for max_tokens, and not again.
    assert 1 <= failed.completion_tokens < body["max_tokens"]
    assert failed.completion_tokens >= len(chunks)
    assert (ok.status, ok.completion_tokens) == ("ok", after.json()["usage"]["completion_tokens"])
