"""``loramux batches create FILE.jsonl [--wait]`` and ``loramux batches get ID``.

Client side: talks to the HTTP API at LORAMUX_BASE_URL with LORAMUX_API_KEY.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import httpx

from loramux.settings import get_settings

FINAL = ("completed", "failed", "expired", "cancelled")
BAR_WIDTH = 30


class CommandFailed(Exception):
    pass


def _client() -> httpx.Client:
    settings = get_settings()
    if settings.api_key is None:
        raise CommandFailed("set LORAMUX_API_KEY to a tenant API key")
    return httpx.Client(
        base_url=settings.base_url.rstrip("/"),
        headers={"Authorization": f"Bearer {settings.api_key.get_secret_value()}"},
        timeout=httpx.Timeout(60.0),
    )


def _checked(response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:300]
        raise CommandFailed(f"{response.status_code}: {message}")
    body: dict[str, Any] = response.json()
    return body


def _endpoint_of(path: Path) -> str:
    with path.open("rb") as lines:
        for raw in lines:
            if raw.strip():
                try:
                    return str(json.loads(raw)["url"])
                except (ValueError, KeyError, TypeError):
                    break
    raise CommandFailed(f"{path}: the first line is not a batch request with a url")


def progress_line(batch: dict[str, Any]) -> str:
    counts = batch["request_counts"]
    total, done = counts["total"], counts["completed"] + counts["failed"]
    filled = BAR_WIDTH * done // total if total else 0
    bar = "#" * filled + "." * (BAR_WIDTH - filled)
    return (
        f"[{bar}] {done}/{total} ({counts['completed']} completed, {counts['failed']} failed) "
        f"{batch['status']}"
    )


def wait(client: httpx.Client, batch_id: str, out: TextIO, poll_s: float = 1.0) -> dict[str, Any]:
    """Poll until the batch ends, redrawing one progress line on ``out``."""
    while True:
        batch = _checked(client.get(f"/v1/batches/{batch_id}"))
        out.write("\r" + progress_line(batch))
        out.flush()
        if batch["status"] in FINAL:
            out.write("\n")
            return batch
        time.sleep(poll_s)


def _summary(batch: dict[str, Any]) -> str:
    counts = batch["request_counts"]
    lines = [
        f"batch {batch['id']}: {batch['status']} ({batch['endpoint']})",
        f"  requests: {counts['total']} total, {counts['completed']} completed, "
        f"{counts['failed']} failed",
    ]
    for name in ("input_file_id", "output_file_id", "error_file_id"):
        if batch.get(name):
            lines.append(f"  {name}: {batch[name]}")
    for error in (batch.get("errors") or {}).get("data", []):
        lines.append(f"  error: {error.get('message')}")
    return "\n".join(lines)


def _download(client: httpx.Client, file_id: str, dest: Path) -> None:
    response = client.get(f"/v1/files/{file_id}/content")
    if response.status_code >= 400:
        _checked(response)
    dest.write_bytes(response.content)


def _create(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise CommandFailed(f"{path} is not a file")
    endpoint = args.endpoint or _endpoint_of(path)
    with _client() as client:
        with path.open("rb") as data:
            uploaded = _checked(
                client.post(
                    "/v1/files",
                    data={"purpose": "batch"},
                    files={"file": (path.name, data, "application/jsonl")},
                )
            )
        batch = _checked(
            client.post(
                "/v1/batches",
                json={
                    "input_file_id": uploaded["id"],
                    "endpoint": endpoint,
                    "completion_window": "24h",
                },
            )
        )
        if not args.wait:
            print(json.dumps(batch) if args.json else f"created batch {batch['id']}")
            return 0
        print(f"created batch {batch['id']}", file=sys.stderr)
        batch = wait(client, batch["id"], sys.stderr)
        if args.output and batch.get("output_file_id"):
            _download(client, batch["output_file_id"], Path(args.output))
    print(json.dumps(batch) if args.json else _summary(batch))
    return 0 if batch["status"] == "completed" else 1


def _get(args: argparse.Namespace) -> int:
    with _client() as client:
        batch = _checked(client.get(f"/v1/batches/{args.id}"))
    print(json.dumps(batch) if args.json else _summary(batch))
    return 0


def create(args: argparse.Namespace) -> int:
    try:
        return _create(args)
    except (CommandFailed, httpx.HTTPError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def get(args: argparse.Namespace) -> int:
    try:
        return _get(args)
    except (CommandFailed, httpx.HTTPError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
