"""Where the adapter cache gets adapters it has never seen: implemented by the platform."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Protocol

from loramux_engine.lora.adapter import CONFIG_NAME, WEIGHTS_NAME
from loramux_engine.lora.ref import AdapterRef


class AdapterSource(Protocol):
    def fetch(self, ref: AdapterRef, dest_dir: Path) -> None:
        """Write adapter_config.json and adapter_model.safetensors of `ref` into dest_dir.

        Runs on the cache's loader thread; raise to fail the adapter's requests.
        """
        ...


class DirectorySource:
    """Adapters laid out as <root>/<sha256>/{adapter_config.json, adapter_model.safetensors}."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def fetch(self, ref: AdapterRef, dest_dir: Path) -> None:
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            shutil.copyfile(self.root / ref.sha256 / name, dest_dir / name)
