"""JSON from tenants, parsed with every size bounded before any work depends on it.

Python's ``json`` accepts input that later breaks whoever holds the result: nesting a
hundred thousand levels deep (``RecursionError``), integers of thousands of digits
(``ValueError`` past 4,300 digits, slow arithmetic below), ``NaN`` and ``Infinity``
(not JSON, and not encodable back), and lone UTF-16 surrogates (``UnicodeEncodeError``
as soon as the string is encoded). ``loads`` refuses each of them with one error type,
:class:`JSONLimitError`, that every caller maps to its own clear refusal: a 400 for a
request body or a batch line, a rejected adapter for a config or a safetensors header.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

MAX_DEPTH = 64
MAX_INT_DIGITS = 40  # enough for any 128-bit integer; a seed is at most 19 digits


class JSONLimitError(ValueError):
    """The text is not JSON, or it is JSON beyond one of the limits above."""


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise JSONLimitError(f"an integer has more than {MAX_INT_DIGITS} digits")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONLimitError(f"the number {text[:32]} is out of range")
    return value


def _parse_constant(name: str) -> float:
    raise JSONLimitError(f"{name} is not a JSON value")


def _check(value: Any, max_depth: int, check_strings: bool) -> None:
    # Iterative, so the check itself cannot overflow the stack it protects.
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
            if check_strings:
                for key in item:
                    _check_string(key)
        elif isinstance(item, list):
            children = item
        else:
            if check_strings and isinstance(item, str):
                _check_string(item)
            continue
        if depth > max_depth:
            raise JSONLimitError(f"JSON nested deeper than {max_depth} levels")
        stack.extend((child, depth + 1) for child in children)


def _check_string(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise JSONLimitError("a string holds a lone UTF-16 surrogate (invalid Unicode)") from None


def loads(
    data: bytes | str,
    *,
    max_depth: int = MAX_DEPTH,
    object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None,
) -> Any:
    """``json.loads`` that raises JSONLimitError (a ValueError) for anything out of bounds."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
        value = json.loads(
            text,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_parse_constant,
            object_pairs_hook=object_pairs_hook,
        )
    except JSONLimitError:
        raise
    except RecursionError:
        raise JSONLimitError(f"JSON nested deeper than {max_depth} levels") from None
    except UnicodeDecodeError:
        raise JSONLimitError("the text is not valid UTF-8") from None
    except json.JSONDecodeError as error:
        raise JSONLimitError(f"not valid JSON: {error}") from None
    # In decoded UTF-8 a lone surrogate can only come from a \u escape: skip the string
    # walk when there is none.
    _check(value, max_depth, check_strings=not isinstance(data, bytes | bytearray) or "\\u" in text)
    return value
