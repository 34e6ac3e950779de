"""Fixtures for the LoRA tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine.lora.adapters import MakeAdapter, adapter_maker


@pytest.fixture
def make_adapter(tmp_path: Path) -> MakeAdapter:
    return adapter_maker(tmp_path)
