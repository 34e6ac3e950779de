"""``loramux adapters push DIR --name NAME``: upload a PEFT adapter directory over HTTP.

Reads the two files PEFT's ``save_pretrained`` writes, streams them as one multipart
body with a progress bar on stderr, then waits for validation and prints the outcome.
Talks to ``LORAMUX_BASE_URL`` with ``LORAMUX_API_KEY``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import IO, Any

import httpx

from loramux.settings import get_settings
from loramux_engine.lora.files import CONFIG_NAME, WEIGHTS_NAME

PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")
WAIT_TIMEOUT_S = 600.0
POLL_INTERVAL_S = 0.5


class Progress:
    """``name [#####-----]  50%  1.2/2.4 MB`` on one line of ``out``."""

    def __init__(self, label: str, total: int, out: IO[str], width: int = 30) -> None:
        self.label, self.total, self.out, self.width = label, max(total, 1), out, width
        self.done = 0
        self._shown = -1

    def advance(self, num_bytes: int) -> None:
        self.done += num_bytes
        percent = min(100, self.done * 100 // self.total)
        if percent != self._shown:
            self._shown = percent
            filled = self.width * percent // 100
            bar = "#" * filled + "-" * (self.width - filled)
            mb_done, mb_total = self.done / 1e6, self.total / 1e6
            self.out.write(f"\r{self.label} [{bar}] {percent:3d}%  {mb_done:.1f}/{mb_total:.1f} MB")
            self.out.flush()

    def finish(self) -> None:
        self.out.write("\n")
        self.out.flush()


class CountingFile:
    """A file whose reads advance a progress bar while httpx streams it."""

    def __init__(self, file: IO[bytes], progress: Progress) -> None:
        self._file, self._progress = file, progress

    def read(self, size: int = -1) -> bytes:
        chunk = self._file.read(size)
        self._progress.advance(len(chunk))
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def fileno(self) -> int:
        return self._file.fileno()


def adapter_files(directory: Path) -> tuple[Path, Path]:
    """The config and weights of a save_pretrained directory; SystemExit with why if absent."""
    if not directory.is_dir():
        raise SystemExit(f"error: {directory} is not a directory")
    config, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not weights.is_file():
        pickled = [name for name in PICKLE_NAMES if (directory / name).is_file()]
        if pickled:
            raise SystemExit(
                f"error: {directory} holds {pickled[0]}, a pickle, which loramux refuses; "
                "save the adapter again with model.save_pretrained(DIR, safe_serialization=True) "
                f"to get {WEIGHTS_NAME}"
            )
        raise SystemExit(f"error: {directory} has no {WEIGHTS_NAME} (PEFT's save_pretrained)")
    if not config.is_file():
        raise SystemExit(f"error: {directory} has no {CONFIG_NAME}")
    return config, weights


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:500]


def _upload(http: httpx.Client, name: str, config: Path, weights: Path) -> dict[str, Any]:
    total = config.stat().st_size + weights.stat().st_size
    progress = Progress(f"pushing {name}", total, sys.stderr)
    with config.open("rb") as config_file, weights.open("rb") as weights_file:
        config_part = CountingFile(config_file, progress)
        weights_part = CountingFile(weights_file, progress)
        files: Any = {
            "config": (CONFIG_NAME, config_part, "application/json"),
            "weights": (WEIGHTS_NAME, weights_part, "application/octet-stream"),
        }
        response = http.post("/v1/adapters", data={"name": name}, files=files)
    progress.finish()
    if response.status_code >= 400:
        raise SystemExit(
            f"error: upload refused ({response.status_code}): {_error_message(response)}"
        )
    body: dict[str, Any] = response.json()
    return body


def _wait(http: httpx.Client, name: str, version: int) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while True:
        response = http.get(f"/v1/adapters/{name}/versions")
        if response.status_code >= 400:
            raise SystemExit(f"error: {_error_message(response)}")
        found = [v for v in response.json()["data"] if v["version"] == version]
        if found and found[0]["status"] in ("ready", "rejected"):
            result: dict[str, Any] = found[0]
            return result
        if time.monotonic() > deadline:
            raise SystemExit(
                f"error: {name} version {version} is still validating after "
                f"{WAIT_TIMEOUT_S:.0f} s; check GET /v1/adapters/{name}"
            )
        time.sleep(POLL_INTERVAL_S)


def push(args: argparse.Namespace) -> int:
    config, weights = adapter_files(Path(args.dir))
    settings = get_settings()
    if settings.api_key is None:
        raise SystemExit("error: set LORAMUX_API_KEY to a tenant key with adapters:write")
    headers = {"Authorization": f"Bearer {settings.api_key.get_secret_value()}"}
    timeout = httpx.Timeout(60.0, read=600.0, write=600.0)
    try:
        with httpx.Client(base_url=settings.base_url, headers=headers, timeout=timeout) as http:
            body = _upload(http, args.name, config, weights)
            print(f"uploaded {body['name']} version {body['version']} (sha256 {body['sha256']})")
            if args.no_wait:
                print(f"validating; check GET /v1/adapters/{body['name']}")
                return 0
            outcome = _wait(http, body["name"], body["version"])
    except httpx.HTTPError as error:
        raise SystemExit(f"error: cannot reach {settings.base_url}: {error}") from None
    if outcome["status"] == "rejected":
        print(f"rejected: {outcome['reason']}")
        return 1
    print(f"ready: use model={body['name']!r} (or '{body['name']}@{body['version']}')")
    return 0
