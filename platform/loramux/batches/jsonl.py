"""Batch input files: one JSON request per line, checked line by line.

A refusal names the first bad line (1-based, as an editor shows it) so a user can fix it.
Lines are read with the bounded JSON loader: nesting too deep, an integer too long, NaN or
Infinity, a lone surrogate or bytes that are not UTF-8 make the line (and so the upload) a
400, never an error in whoever later reads the line.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from loramux.errors import InvalidRequest
from loramux_engine.utils.bounded_json import JSONLimitError, loads

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
MAX_CUSTOM_ID = 64


@dataclass(frozen=True, slots=True)
class InputLine:
    index: int  # 0-based position among the file's requests
    number: int  # 1-based line number in the file
    custom_id: str
    url: str
    body: dict[str, Any]


def invalid_line(number: int, message: str) -> InvalidRequest:
    return InvalidRequest(f"line {number}: {message}", param="file", code="invalid_batch_line")


def parse_line(raw: bytes, number: int, index: int) -> InputLine:
    try:
        item = loads(raw)
    except JSONLimitError as error:
        raise invalid_line(number, str(error)) from None
    if not isinstance(item, dict):
        raise invalid_line(number, "each line must be a JSON object")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= MAX_CUSTOM_ID:
        raise invalid_line(number, f"custom_id must be a string of 1 to {MAX_CUSTOM_ID} characters")
    if item.get("method") != "POST":
        raise invalid_line(number, 'method must be "POST"')
    url = item.get("url")
    if url not in ENDPOINTS:
        raise invalid_line(number, f"url must be one of {', '.join(ENDPOINTS)}, got {url!r}")
    body = item.get("body")
    if not isinstance(body, dict):
        raise invalid_line(number, "body must be a JSON object")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise invalid_line(number, "body.model is required")
    unknown = sorted(set(item) - {"custom_id", "method", "url", "body"})
    if unknown:
        raise invalid_line(number, f"unexpected field {unknown[0]!r}")
    return InputLine(index, number, custom_id, url, body)


def parse_lines(raw_lines: Iterable[bytes], *, max_lines: int) -> Iterator[InputLine]:
    """Every request in the file, in order; blank lines are skipped, custom_ids are unique."""
    seen: dict[str, int] = {}
    index = 0
    for number, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            continue
        if index >= max_lines:
            raise invalid_line(number, f"a batch file holds at most {max_lines} requests")
        line = parse_line(raw, number, index)
        first = seen.setdefault(line.custom_id, number)
        if first != number:
            raise invalid_line(
                number, f"custom_id {line.custom_id!r} repeats the one on line {first}"
            )
        index += 1
        yield line
    if index == 0:
        raise InvalidRequest("the file holds no requests", param="file", code="invalid_batch_line")


def count_lines(raw_lines: Iterable[bytes], *, max_lines: int) -> int:
    return sum(1 for _ in parse_lines(raw_lines, max_lines=max_lines))
