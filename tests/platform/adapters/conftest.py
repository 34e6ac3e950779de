"""Adapter tests: an app on S3 (moto) sharing a real Celery worker, and a PEFT adapter."""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from loramux.app import build_state, create_app
from loramux.settings import Settings
from tests.fixtures.celery import CeleryWorker
from tests.platform.conftest import ADMIN_KEY


@pytest.fixture
def settings(celery_worker: CeleryWorker, db: sessionmaker[Session]) -> Settings:
    """The worker's settings (registry, broker, S3, base model) plus the admin key."""
    return celery_worker.settings.model_copy(
        update={"admin_key": SecretStr(ADMIN_KEY), "max_body_bytes": 64 * 1024}
    )


@pytest.fixture
def local_client(
    pg_database: str, db: sessionmaker[Session], tmp_path: Path, tiny_llama_dir: Path
) -> Iterator[TestClient]:
    """An app on local-directory storage (no worker behind it)."""
    settings = Settings(
        home=tmp_path / "home",
        database_url=pg_database,
        storage_url=(tmp_path / "storage").as_uri(),
        admin_key=ADMIN_KEY,
        model=str(tiny_llama_dir),
    )
    with TestClient(create_app(settings, app_state=build_state(settings))) as client:
        yield client


def _save_peft_adapter(base_dir: Path, out_dir: Path, seed: int, **lora: Any) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **lora)
    with warnings.catch_warnings():
        # peft 0.21 reads transformers' deprecated is_gradient_checkpointing.
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        get_peft_model(model, config).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def make_peft_adapter(
    tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., Path]:
    """``make_peft_adapter(seed=0, r=8, ...) -> dir`` as PEFT's save_pretrained writes it."""
    made: dict[tuple[Any, ...], Path] = {}

    def make(seed: int = 0, **lora: Any) -> Path:
        lora = {
            "r": 8,
            "lora_alpha": 16,
            "target_modules": ["q_proj", "v_proj", "down_proj"],
            **lora,
        }
        key = (seed, repr(sorted(lora.items())))
        if key not in made:
            out = tmp_path_factory.mktemp("peft-adapter")
            made[key] = _save_peft_adapter(tiny_llama_dir, out, seed, **lora)
        return made[key]

    return make


@pytest.fixture(scope="session")
def peft_adapter_dir(make_peft_adapter: Callable[..., Path]) -> Path:
    return make_peft_adapter()


@pytest.fixture
def adapter_copy(peft_adapter_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the PEFT adapter directory a test may alter."""
    return Path(shutil.copytree(peft_adapter_dir, tmp_path / "adapter"))
