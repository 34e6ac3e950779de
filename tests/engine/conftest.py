"""Engines over the shared tiny random LLaMA (tests/fixtures/models.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from loramux_engine import EngineConfig, LLMEngine


@pytest.fixture(scope="module")
def tiny_engine(tiny_llama_dir: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(str(tiny_llama_dir), max_num_batched_tokens=64))


@pytest.fixture
def make_engine(tiny_llama_dir: Path) -> Callable[..., LLMEngine]:
    def make(**overrides: Any) -> LLMEngine:
        return LLMEngine(EngineConfig(str(tiny_llama_dir), **overrides))

    return make
