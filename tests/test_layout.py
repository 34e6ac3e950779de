"""The `platform/` source root must never shadow the standard library's `platform`."""

from __future__ import annotations

import platform
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_stdlib_platform_is_imported() -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert Path(platform.__file__).resolve().parent == stdlib
    assert platform.system()  # the real module, not a namespace package


def test_source_roots_are_not_packages() -> None:
    assert not (ROOT / "platform" / "__init__.py").exists()
    assert not (ROOT / "engine" / "__init__.py").exists()


def test_packages_import_from_source_roots() -> None:
    import loramux
    import loramux_engine

    assert Path(loramux.__file__).resolve().is_relative_to(ROOT / "platform")
    assert Path(loramux_engine.__file__).resolve().is_relative_to(ROOT / "engine")
