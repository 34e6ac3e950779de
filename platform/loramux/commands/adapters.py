"""``loramux adapters push|list|get|delete``: a tenant's adapters over the HTTP API.

``push`` reads the two files PEFT's ``save_pretrained`` writes. Before it sends a byte of
weights it checks what can fail cheaply: the name (locally), then the server, the base URL
and the key with one small authenticated GET, so a typo fails in well under a second
instead of after a long upload. Then it streams one multipart body, waits for validation
and prints the outcome.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from loramux.commands.client import ApiClient, ApiFailure
from loramux.commands.output import (
    Column,
    CommandFailed,
    CountingFile,
    Progress,
    emit,
    print_json,
    print_list,
    print_table,
    size,
    when,
)
from loramux.names import name_problem
from loramux_engine.lora.files import CONFIG_NAME, WEIGHTS_NAME

PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")
WAIT_TIMEOUT_S = 600.0
POLL_INTERVAL_S = 0.5
UPLOAD_TIMEOUT = httpx.Timeout(60.0, connect=10.0, read=600.0, write=600.0)

ADAPTER_COLUMNS: list[Column] = [
    ("NAME", lambda a: a["name"]),
    ("VERSION", lambda a: a["version"]),
    ("STATUS", lambda a: a["status"]),
    ("SERVING", lambda a: a["ready_version"]),
    ("RANK", lambda a: a["rank"]),
    ("SIZE", lambda a: size(a["size_bytes"])),
    ("CREATED (UTC)", lambda a: when(a["created_at"])),
]
VERSION_COLUMNS: list[Column] = [
    ("VERSION", lambda v: v["version"]),
    ("STATUS", lambda v: v["status"]),
    ("RANK", lambda v: v["rank"]),
    ("ALPHA", lambda v: v["alpha"]),
    ("SIZE", lambda v: size(v["size_bytes"])),
    ("SHA256", lambda v: v["sha256"][:12]),
    ("CREATED (UTC)", lambda v: when(v["created_at"])),
    ("REASON", lambda v: v["reason"]),
]


def adapter_files(directory: Path) -> tuple[Path, Path]:
    """The config and weights of a save_pretrained directory; CommandFailed with why if not."""
    if not directory.is_dir():
        raise CommandFailed(f"{directory} is not a directory")
    config, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not weights.is_file():
        pickled = [name for name in PICKLE_NAMES if (directory / name).is_file()]
        if pickled:
            raise CommandFailed(
                f"{directory} holds {pickled[0]}, a pickle, which loramux refuses; "
                "save the adapter again with model.save_pretrained(DIR, safe_serialization=True) "
                f"to get {WEIGHTS_NAME}"
            )
        raise CommandFailed(f"{directory} has no {WEIGHTS_NAME} (PEFT's save_pretrained)")
    if not config.is_file():
        raise CommandFailed(f"{directory} has no {CONFIG_NAME}")
    return config, weights


def checked_name(name: str) -> str:
    problem = name_problem(name)
    if problem is not None:
        raise CommandFailed(f"adapter name {name!r}: {problem}")
    return name


def find(client: ApiClient, name: str) -> dict[str, Any] | None:
    """The adapter ``name``, or None if there is none the key may see. Also the cheap check
    of the server, the base URL and the key that ``push`` makes before uploading."""
    try:
        return client.call("GET", f"/v1/adapters/{checked_name(name)}")
    except ApiFailure as failure:
        # A 403 still proves the key genuine: a push-only key lacks adapters:read.
        if failure.code == "adapter_not_found" or failure.status == 403:
            return None
        raise


def _upload(client: ApiClient, name: str, config: Path, weights: Path) -> dict[str, Any]:
    total = config.stat().st_size + weights.stat().st_size
    progress = Progress(f"pushing {name}")
    try:
        with config.open("rb") as config_file, weights.open("rb") as weights_file:
            files: Any = {
                "config": (
                    CONFIG_NAME,
                    CountingFile(config_file, progress, total),
                    "application/json",
                ),
                "weights": (
                    WEIGHTS_NAME,
                    CountingFile(weights_file, progress, total),
                    "application/octet-stream",
                ),
            }
            return client.call("POST", "/v1/adapters", data={"name": name}, files=files)
    finally:
        progress.finish()


def _wait(client: ApiClient, name: str, version: int) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while True:
        versions = client.call("GET", f"/v1/adapters/{name}/versions")["data"]
        found = [v for v in versions if v["version"] == version]
        if found and found[0]["status"] in ("ready", "rejected"):
            result: dict[str, Any] = found[0]
            return result
        if time.monotonic() > deadline:
            raise CommandFailed(
                f"{name} version {version} is still validating after {WAIT_TIMEOUT_S:.0f} s; "
                f"check `loramux adapters get {name}`"
            )
        time.sleep(POLL_INTERVAL_S)


def push(args: argparse.Namespace) -> int:
    config, weights = adapter_files(Path(args.dir))
    name = checked_name(args.name)
    with ApiClient.from_settings(UPLOAD_TIMEOUT) as client:
        existing = find(client, name)
        if existing is not None:
            note = f"{name} exists (version {existing['version']}); pushing a new version"
            print(note, file=sys.stderr)
        body = _upload(client, name, config, weights)
        if not args.json:
            print(f"uploaded {body['name']} version {body['version']} (sha256 {body['sha256']})")
        if args.no_wait:
            emit(body, as_json=args.json, text=f"validating; see `loramux adapters get {name}`")
            return 0
        outcome = _wait(client, body["name"], body["version"])
    if args.json:
        print_json(outcome)
    elif outcome["status"] == "rejected":
        print(f"rejected: {outcome['reason']}")
    else:
        print(f"ready: use model={body['name']!r} (or '{body['name']}@{body['version']}')")
    return 1 if outcome["status"] == "rejected" else 0


def list_adapters(args: argparse.Namespace) -> int:
    with ApiClient.from_settings() as client:
        body = client.call("GET", "/v1/adapters")
    print_list(body, ADAPTER_COLUMNS, as_json=args.json, empty="no adapters yet")
    return 0


def get(args: argparse.Namespace) -> int:
    name = checked_name(args.name)
    with ApiClient.from_settings() as client:
        adapter = client.call("GET", f"/v1/adapters/{name}")
        versions = client.call("GET", f"/v1/adapters/{name}/versions")["data"]
    if args.json:
        print_json({**adapter, "versions": versions})
        return 0
    print(f"adapter {adapter['name']} ({adapter['id']}) on {adapter['base_model']}")
    print(f"  latest: version {adapter['version']}, {adapter['status']}")
    print(f"  serving: version {adapter['ready_version'] or '- (none ready)'}")
    print(f"  targets: {', '.join(adapter['target_modules']) or '-'}")
    print()
    print_table(versions, VERSION_COLUMNS)
    return 0


def delete(args: argparse.Namespace) -> int:
    name = checked_name(args.name)
    with ApiClient.from_settings() as client:
        body = client.call("DELETE", f"/v1/adapters/{name}")
    emit(body, as_json=args.json, text=f"deleted adapter {body['name']} ({body['id']})")
    return 0
