"""``loramux batches create|get|list|cancel|download``: the Batch API over HTTP.

``create --wait`` exits 0 only when every request succeeded, and saves the error file of
any that failed, so a batch in which every line failed is never a silent success.
``create --quiet`` prints only the batch's id, for ``BATCH=$(loramux batches create ...)``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from loramux.commands.client import STDOUT, ApiClient
from loramux.commands.output import (
    Column,
    CommandFailed,
    CountingFile,
    Progress,
    emit,
    print_list,
    when,
)

FINAL = ("completed", "failed", "expired", "cancelled")
POLL_INTERVAL_S = 1.0

BATCH_COLUMNS: list[Column] = [
    ("ID", lambda b: b["id"]),
    ("STATUS", lambda b: b["status"]),
    ("ENDPOINT", lambda b: b["endpoint"]),
    ("DONE", lambda b: _done(b)),
    ("FAILED", lambda b: b["request_counts"]["failed"]),
    ("CREATED (UTC)", lambda b: when(b["created_at"])),
]


def _done(batch: dict[str, Any]) -> str:
    counts = batch["request_counts"]
    return f"{counts['completed'] + counts['failed']}/{counts['total']}"


def _endpoint_of(path: Path) -> str:
    with path.open("rb") as lines:
        for raw in lines:
            if raw.strip():
                try:
                    return str(json.loads(raw)["url"])
                except (ValueError, KeyError, TypeError):
                    break
    raise CommandFailed(f"{path}: the first line is not a batch request with a url")


def summary(batch: dict[str, Any]) -> str:
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


def wait(client: ApiClient, batch_id: str, poll_s: float = POLL_INTERVAL_S) -> dict[str, Any]:
    """Poll until the batch ends, showing its progress on stderr."""
    progress = Progress(batch_id)
    try:
        while True:
            batch = client.call("GET", f"/v1/batches/{batch_id}")
            counts = batch["request_counts"]
            detail = f"{_done(batch)} requests ({counts['completed']} completed, " + (
                f"{counts['failed']} failed)"
            )
            progress.update(
                counts["completed"] + counts["failed"], counts["total"], detail, batch["status"]
            )
            if batch["status"] in FINAL:
                return batch
            time.sleep(poll_s)
    except KeyboardInterrupt:
        raise CommandFailed(
            f"stopped waiting; batch {batch_id} goes on (`loramux batches get {batch_id}`)"
        ) from None
    finally:
        progress.finish()


def save(client: ApiClient, batch: dict[str, Any], which: str, dest: str) -> None:
    """Download the batch's ``output`` or ``errors`` file to ``dest`` and say so on stderr."""
    file_id = batch["output_file_id" if which == "output" else "error_file_id"]
    if not file_id:
        raise CommandFailed(
            f"batch {batch['id']} has no {'output' if which == 'output' else 'error'} file "
            f"({batch['status']}, {_done(batch)} requests done, "
            f"{batch['request_counts']['failed']} failed)"
        )
    written = client.download(f"/v1/files/{file_id}/content", dest)
    if dest != STDOUT:
        note = f"saved the {which} of batch {batch['id']} ({written} bytes) to {dest}"
        print(note, file=sys.stderr)


def default_path(batch: dict[str, Any], which: str) -> str:
    return f"{batch['id']}_{which}.jsonl"


def create(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise CommandFailed(f"{path} is not a file")
    endpoint = args.endpoint or _endpoint_of(path)
    with ApiClient.from_settings() as client:
        # Checks the server, the base URL and the key before the file is sent.
        client.call("GET", "/v1/batches", params={"limit": 1})
        progress = Progress(f"uploading {path.name}")
        try:
            with path.open("rb") as data:
                counted = CountingFile(data, progress, path.stat().st_size)
                files: Any = {"file": (path.name, counted, "application/jsonl")}
                uploaded = client.call("POST", "/v1/files", data={"purpose": "batch"}, files=files)
        finally:
            progress.finish()
        batch = client.call(
            "POST",
            "/v1/batches",
            json={
                "input_file_id": uploaded["id"],
                "endpoint": endpoint,
                "completion_window": "24h",
            },
        )
        if not args.wait:
            if args.quiet:
                print(batch["id"])
            else:
                emit(batch, as_json=args.json, text=f"created batch {batch['id']}")
            return 0
        print(f"created batch {batch['id']}", file=sys.stderr)
        batch = wait(client, batch["id"])
        if args.output and batch["output_file_id"]:
            save(client, batch, "output", args.output)
        if batch["error_file_id"]:
            save(client, batch, "errors", args.errors or default_path(batch, "errors"))
    if args.quiet:
        print(batch["id"])
    else:
        emit(batch, as_json=args.json, text=summary(batch))
    counts = batch["request_counts"]
    if batch["status"] == "completed" and counts["failed"] == 0:
        return 0
    if batch["status"] == "completed":
        print(f"error: {counts['failed']} of {counts['total']} requests failed", file=sys.stderr)
    else:
        print(f"error: batch {batch['id']} ended {batch['status']}", file=sys.stderr)
    return 1


def get(args: argparse.Namespace) -> int:
    with ApiClient.from_settings() as client:
        batch = client.call("GET", f"/v1/batches/{args.id}")
    emit(batch, as_json=args.json, text=summary(batch))
    return 0


def list_batches(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"limit": args.limit}
    if args.after:
        params["after"] = args.after
    with ApiClient.from_settings() as client:
        body = client.call("GET", "/v1/batches", params=params)
    more = "more batches: loramux batches list --after {last_id}"
    print_list(body, BATCH_COLUMNS, as_json=args.json, empty="no batches yet", more=more)
    return 0


def cancel(args: argparse.Namespace) -> int:
    with ApiClient.from_settings() as client:
        batch = client.call("POST", f"/v1/batches/{args.id}/cancel")
    emit(batch, as_json=args.json, text=summary(batch))
    return 0


def download(args: argparse.Namespace) -> int:
    """Save the output and error files: those asked for, or both under default names."""
    with ApiClient.from_settings() as client:
        batch = client.call("GET", f"/v1/batches/{args.id}")
        if args.output or args.errors:
            if args.output:
                save(client, batch, "output", args.output)
            if args.errors:
                save(client, batch, "errors", args.errors)
            return 0
        if not (batch["output_file_id"] or batch["error_file_id"]):
            raise CommandFailed(
                f"batch {batch['id']} has no output or error file yet ({batch['status']}, "
                f"{_done(batch)} requests done)"
            )
        for which, file_id in (("output", "output_file_id"), ("errors", "error_file_id")):
            if batch[file_id]:
                save(client, batch, which, default_path(batch, which))
    return 0
