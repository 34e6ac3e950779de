"""Engines over the shared tiny random LLaMA (tests/fixtures/models.py), and ``device``: the
exactness tests (the engine against transformers and PEFT) run once per device, on the CPU
and, when torch sees one, on CUDA (fp32 on both, so the tokens must be equal)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from loramux_engine import EngineConfig, LLMEngine

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    device: str = request.param
    return device


@pytest.fixture(scope="module")
def tiny_engine(tiny_llama_dir: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(str(tiny_llama_dir), max_num_batched_tokens=64))


@pytest.fixture
def make_engine(tiny_llama_dir: Path) -> Callable[..., LLMEngine]:
    def make(**overrides: Any) -> LLMEngine:
        return LLMEngine(EngineConfig(str(tiny_llama_dir), **overrides))

    return make


@pytest.fixture
def device_engine(
    device: str, tiny_engine: LLMEngine, make_engine: Callable[..., LLMEngine]
) -> LLMEngine:
    """``tiny_engine`` on ``device`` in fp32: the module's own on the CPU, else a new one."""
    if device == "cpu":
        return tiny_engine
    return make_engine(device=device, dtype="float32", max_num_batched_tokens=64)
