"""The base model's shape, which every adapter's tensors are checked against."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from loramux.base_models import resolve_model
from loramux.settings import Settings
from loramux_engine.lora.shape import BaseModelShape


def base_model_shape(settings: Settings) -> BaseModelShape:
    return _shape_of(resolve_model(settings.model, settings.models_dir).resolve())


@lru_cache(maxsize=4)
def _shape_of(model_dir: Path) -> BaseModelShape:
    return BaseModelShape.from_hf_config(json.loads((model_dir / "config.json").read_text()))
