"""A process killed in the middle of a put leaves a partial: a temp file under the local
store's ``.tmp/``, or an S3 multipart upload never completed. No listing shows it; the
cleanup task removes it once older than the upload TTL, and not before."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from loramux.adapters.cleanup import run_cleanup
from loramux.settings import Settings
from loramux.storage import LocalStorage, S3Storage, Storage
from tests.fixtures.s3 import TEST_PART_SIZE

WAIT_S = 60.0
# Puts a blob from a stream that stalls after STALL_AFTER bytes, as a client that stops
# sending would, so the test can SIGKILL the process mid-put.
PUTTER = """
import sys, time
from pathlib import Path
from loramux.storage import LocalStorage, S3Storage

class Stalling:
    def __init__(self, size):
        self.left = size
    def read(self, size=-1):
        if self.left <= 0:
            time.sleep(3600)
        n = self.left if size is None or size < 0 else min(size, self.left)
        self.left -= n
        return b"x" * n

kind, where, stall_after = sys.argv[1], sys.argv[2], int(sys.argv[3])
if kind == "local":
    store = LocalStorage(Path(where))
else:
    endpoint, bucket = where.split("|")
    store = S3Storage(bucket, "blobs", endpoint_url=endpoint, part_size=int(sys.argv[4]))
store.put("files/partial", Stalling(stall_after))
"""


def kill_mid_put(args: list[str], started: Callable[[], bool]) -> None:
    process = subprocess.Popen([sys.executable, "-c", PUTTER, *args])
    try:
        deadline = time.monotonic() + WAIT_S
        while not started():
            assert process.poll() is None, "the put ended by itself"
            assert time.monotonic() < deadline, "the put never got under way"
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


def cleanup(db: sessionmaker[Session], storage: Storage, tmp_path: Path, ttl_s: int) -> int:
    settings = Settings(home=tmp_path / "home", adapter_upload_ttl_s=ttl_s)
    return run_cleanup(db, storage, settings).removed_partial_uploads


def test_local_partial_file_is_removed_after_the_upload_ttl(
    db: sessionmaker[Session], tmp_path: Path
) -> None:
    root = tmp_path / "storage"
    storage = LocalStorage(root)
    tmp_dir = root / ".tmp"

    def partial_written() -> bool:
        return tmp_dir.is_dir() and any(p.stat().st_size > 0 for p in tmp_dir.iterdir())

    kill_mid_put(["local", str(root), str(3 * 1024 * 1024)], partial_written)
    assert len(list(tmp_dir.iterdir())) == 1
    assert list(storage.list()) == []  # never seen as a blob

    assert cleanup(db, storage, tmp_path, ttl_s=3600) == 0  # may still be in flight
    assert len(list(tmp_dir.iterdir())) == 1
    (partial,) = tmp_dir.iterdir()
    old = time.time() - 7200
    os.utime(partial, (old, old))
    assert cleanup(db, storage, tmp_path, ttl_s=3600) == 1
    assert list(tmp_dir.iterdir()) == []


@pytest.mark.usefixtures("s3_endpoint")
def test_s3_incomplete_multipart_upload_is_aborted_after_the_upload_ttl(
    db: sessionmaker[Session], s3_storage: S3Storage, s3_endpoint: str, tmp_path: Path
) -> None:
    client, bucket = s3_storage.client, s3_storage.bucket

    def uploads() -> list[dict[str, str]]:
        return list(client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))

    def part_sent() -> bool:
        found = uploads()
        if not found:
            return False
        parts = client.list_parts(Bucket=bucket, Key=found[0]["Key"], UploadId=found[0]["UploadId"])
        return bool(parts.get("Parts"))

    args = ["s3", f"{s3_endpoint}|{bucket}", str(2 * TEST_PART_SIZE + 1024), str(TEST_PART_SIZE)]
    kill_mid_put(args, part_sent)
    assert len(uploads()) == 1
    assert list(s3_storage.list()) == []

    assert cleanup(db, s3_storage, tmp_path, ttl_s=3600) == 0  # may still be in flight
    assert len(uploads()) == 1
    assert cleanup(db, s3_storage, tmp_path, ttl_s=0) == 1
    assert uploads() == []
