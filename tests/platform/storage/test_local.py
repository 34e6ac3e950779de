"""What only the local-directory backend has: temp files, layout on disk, check()."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from loramux.storage import LocalStorage, StorageError


class BrokenStream(io.BytesIO):
    def read(self, size: int | None = -1) -> bytes:
        if self.tell() >= 10:
            raise ConnectionResetError("client went away")
        return super().read(5)


def test_blobs_live_at_their_key(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.put("adapters/abc/adapter_config.json", b"{}")
    assert (tmp_path / "adapters/abc/adapter_config.json").read_bytes() == b"{}"


def test_failed_put_leaves_no_blob_and_no_temp_file(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    with pytest.raises(ConnectionResetError):
        storage.put("files/a", BrokenStream(b"x" * 100))
    assert not storage.exists("files/a")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_temp_files_are_not_listed(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.put("files/a", b"a")
    (tmp_path / ".tmp" / "in-flight").write_bytes(b"partial")
    assert list(storage.list()) == ["files/a"]


def test_check_fails_on_unwritable_root(tmp_path: Path) -> None:
    LocalStorage(tmp_path / "fresh").check()
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StorageError, match="not writable"):
        LocalStorage(tmp_path / "file").check()
