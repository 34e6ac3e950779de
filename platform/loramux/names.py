"""The rule for tenant, key and adapter names, in a module light enough for the CLI to check a
name before it sends anything (the registry imports SQLAlchemy, which takes seconds to load)."""

from __future__ import annotations

import re

NAME_MAX = 64  # also the length of the registry's name columns (db/models.py)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def name_problem(name: object) -> str | None:
    """Why ``name`` is not a valid name, or None when it is."""
    if not isinstance(name, str) or not name:
        return "name must be a non-empty string"
    if len(name) > NAME_MAX:
        return f"name is longer than {NAME_MAX} characters"
    if not _NAME_RE.match(name):
        return (
            "name may hold letters, digits, '_', '-' and '.', and must start with a letter or digit"
        )
    return None
