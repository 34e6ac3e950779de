"""The adapter cache seen through LLMEngine: eviction, pinning, cold loads, refusals, drops."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from loramux_engine import AdapterRequestError, EngineConfig, LLMEngine, SamplingParams
from loramux_engine.lora import AdapterLoadError, AdapterRef, DirectorySource
from loramux_engine.lora.ref import adapter_sha256
from tests.engine.lora.adapters import read_files
from tests.engine.peft_reference import load_base, peft_greedy, publish_dir, save_random_adapter

PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PROMPTS = [[5 + (i * 11 + j * 17) % 250 for j in range(n)] for i, n in enumerate([4, 9, 15])]


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Four published rank-8 adapters, their dirs, and PEFT's tokens per (adapter, prompt)."""
    tmp = tmp_path_factory.mktemp("adapters")
    base = load_base(tiny_llama_dir)
    refs, dirs, expected = [], [], {}
    for a in range(4):
        path, base = save_random_adapter(
            base,
            tmp / f"a{a}",
            seed=10 + a,
            std=0.3,
            r=8,
            lora_alpha=16,
            target_modules="all-linear",
        )
        dirs.append(path)
        refs.append(publish_dir(tmp / "source", path, f"adapter-{a}"))
        tokens, base = peft_greedy(base, path, PROMPTS, PARAMS.max_tokens or 0)
        expected.update({(a, p): t for p, t in enumerate(tokens)})
    return {"root": tmp / "source", "refs": refs, "dirs": dirs, "expected": expected}


def _engine(model_dir: Path, tmp_path: Path, source: Any, **overrides: Any) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            str(model_dir),
            max_model_len=128,
            adapter_source=source,
            adapter_cache_dir=str(tmp_path / "cache"),
            **overrides,
        )
    )


def _run(engine: LLMEngine) -> dict[str, list[int]]:
    got: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
        for seq in engine.scheduler.running:  # a running request's adapter stays in its slot
            if isinstance(seq.adapter, AdapterRef):
                assert engine.adapters is not None and engine.adapters.is_ready(seq.adapter)
    return got


def test_fewer_slots_than_adapters_evicts_unpinned_only(
    tiny_llama_dir: Path, tmp_path: Path, adapters: dict[str, Any]
) -> None:
    engine = _engine(tiny_llama_dir, tmp_path, DirectorySource(adapters["root"]), max_loras=2)
    for a, ref in enumerate(adapters["refs"]):
        for p, prompt in enumerate(PROMPTS):
            engine.add_request(f"{a}-{p}", prompt, PARAMS, fairness_key=f"t{a}", adapter=ref)
    waiting = engine.stats().num_waiting_by_key
    assert waiting == {f"t{a}": len(PROMPTS) for a in range(len(adapters["refs"]))}
    got = _run(engine)
    for (a, p), tokens in adapters["expected"].items():
        assert got[f"{a}-{p}"] == tokens
    stats = engine.stats()
    extra = stats.extra
    assert extra["adapter_cache_device_evictions"] >= 2
    assert extra["adapter_cache_num_resident"] == 2
    assert stats.num_running_by_key == stats.num_waiting_by_key == {}
    # which two stay is the LRU's business; each is one of ours, in its own slot, unpinned
    resident = stats.resident_adapters
    ids = {ref.id: ref.namespace for ref in adapters["refs"]}
    assert [r["slot"] for r in resident] == sorted({r["slot"] for r in resident})
    assert len(resident) == 2 and all(ids[r["id"]] == r["namespace"] for r in resident)
    assert not any(r["pinned"] for r in resident)
    assert stats.kv_cache_bytes > 0
    engine.close()


class GatedSource(DirectorySource):
    """Fetches block until the test opens the gate."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate = threading.Event()

    def fetch(self, ref: AdapterRef, dest_dir: Path) -> None:
        self.gate.wait()
        super().fetch(ref, dest_dir)


def test_cold_adapter_loads_while_the_batch_decodes(
    tiny_llama_dir: Path, tmp_path: Path, adapters: dict[str, Any]
) -> None:
    source = GatedSource(adapters["root"])
    engine = _engine(tiny_llama_dir, tmp_path, source)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    engine.add_request("base", PROMPTS[0], params)
    engine.add_request("cold", PROMPTS[1], PARAMS, adapter=adapters["refs"][0])
    tokens: dict[str, list[int]] = {"base": [], "cold": []}
    for _ in range(5):  # the load is held: the batch decodes without the cold request
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    assert len(tokens["base"]) == 5 and tokens["cold"] == []
    source.gate.set()
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    assert tokens["cold"] == adapters["expected"][(0, 1)]
    assert len(tokens["base"]) == 20
    engine.close()


def test_sha256_mismatch_fails_only_that_request(
    tiny_llama_dir: Path, tmp_path: Path, adapters: dict[str, Any]
) -> None:
    config, weights = read_files(adapters["dirs"][1])
    wrong = AdapterRef("tampered", adapter_sha256(config, weights + b" "))
    (adapters["root"] / wrong.sha256).mkdir(exist_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (adapters["root"] / wrong.sha256 / name).write_bytes(
            (adapters["dirs"][1] / name).read_bytes()
        )
    engine = _engine(tiny_llama_dir, tmp_path, DirectorySource(adapters["root"]))
    engine.add_request("good", PROMPTS[2], PARAMS, adapter=adapters["refs"][2])
    engine.add_request("bad", PROMPTS[2], PARAMS, adapter=wrong)
    engine.add_request("base", PROMPTS[2], PARAMS)
    outputs: dict[str, list[Any]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    (bad,) = outputs["bad"]
    assert bad.finish_reason == "error" and isinstance(bad.error, AdapterLoadError)
    assert "sha256" in str(bad.error) and "tampered" in str(bad.error)
    good = [t for out in outputs["good"] for t in out.new_token_ids]
    assert good == adapters["expected"][(2, 2)]
    assert outputs["base"][-1].finish_reason == "length"
    engine.close()


def test_drop_adapter_forgets_it_in_every_tier(
    tiny_llama_dir: Path, tmp_path: Path, adapters: dict[str, Any]
) -> None:
    engine = _engine(tiny_llama_dir, tmp_path, DirectorySource(adapters["root"]))
    ref = adapters["refs"][3]
    engine.add_request("running", PROMPTS[0], PARAMS, adapter=ref)
    first: list[int] = []
    while not engine.scheduler.running:
        first += [t for out in engine.step() for t in out.new_token_ids]
    engine.drop_adapter(ref)  # pinned: the running request still finishes with it
    assert first + _run(engine)["running"] == adapters["expected"][(3, 0)]
    extra = engine.stats().extra
    assert extra["adapter_cache_num_resident"] == 0
    assert not (tmp_path / "cache" / ref.sha256).exists()
    (out,) = engine.generate([PROMPTS[1]], PARAMS, adapters=[ref])  # fetched again
    assert out.new_token_ids == adapters["expected"][(3, 1)]
    assert (
        engine.stats().extra["adapter_cache_disk_misses"] == extra["adapter_cache_disk_misses"] + 1
    )
    engine.close()


def test_adapter_without_a_source_is_refused(
    tiny_engine: LLMEngine, adapters: dict[str, Any]
) -> None:
    with pytest.raises(AdapterRequestError, match="serves no adapters"):
        tiny_engine.add_request("x", PROMPTS[0], PARAMS, adapter=adapters["refs"][0])
