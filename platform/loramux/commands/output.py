"""What the CLI shows: one-line errors, tables or JSON, and progress that suits its stream.

Every command prints the same way: a table for people by default, ``--json`` for scripts (a
list command prints ``{"object": "list", "data": [...]}`` like the API), and a failure as one
``error: ...`` line on stderr with exit status 1, never a traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import IO, Any, TextIO

Row = dict[str, Any]
Column = tuple[str, Callable[[Row], object]]


class CommandFailed(Exception):
    """A failure the user can act on; ``loramux`` prints it as one line and exits 1."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))  # one line, whatever a server sent


def when(timestamp: int | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M")


def size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "-"
    scaled, unit = float(num_bytes), "B"
    for larger in ("kB", "MB", "GB"):
        if scaled < 1000:
            break
        scaled, unit = scaled / 1000, larger
    return f"{num_bytes} B" if unit == "B" else f"{scaled:.1f} {unit}"


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


def print_json(value: object, out: TextIO | None = None) -> None:
    print(json.dumps(value), file=out or sys.stdout)


def emit(value: object, *, as_json: bool, text: str) -> None:
    """``value`` as JSON for scripts, or ``text`` for people."""
    if as_json:
        print_json(value)
    else:
        print(text)


def print_table(rows: Sequence[Row], columns: Sequence[Column], out: TextIO | None = None) -> None:
    """Left-aligned columns under upper-case headers; times are UTC."""
    cells = [[header for header, _ in columns]]
    cells += [[_cell(value(row)) for _, value in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        text = "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True))
        print(text.rstrip(), file=out or sys.stdout)


def print_list(
    body: Row, columns: Sequence[Column], *, as_json: bool, empty: str, more: str = ""
) -> None:
    """A list object as the API returns it: JSON as is, or a table (``empty`` if none)."""
    if as_json:
        print_json(body)
        return
    if not body["data"]:
        print(empty)
        return
    print_table(body["data"], columns)
    if body.get("has_more") and more:
        print(more.format(last_id=body.get("last_id")), file=sys.stderr)


class Progress:
    """A bar redrawn in place on a terminal. Anything else (a pipe, a CI log) gets plain
    lines instead: one at each tenth of the way and one at each change of ``state``."""

    def __init__(self, label: str, out: TextIO | None = None, width: int = 30) -> None:
        self.label, self.out, self.width = label, out or sys.stderr, width
        self.tty = self.out.isatty()
        self._shown: tuple[int, str] | None = None
        self._drawn = 0
        self.sent = 0  # bytes counted by the CountingFiles that share this bar

    def update(self, done: int, total: int, detail: str = "", state: str = "") -> None:
        percent = min(100, done * 100 // total) if total > 0 else 0
        tail = " ".join(part for part in (detail, state) if part)
        if self.tty:
            filled = self.width * percent // 100
            bar = "#" * filled + "-" * (self.width - filled)
            text = f"{self.label} [{bar}] {percent:3d}% {tail}".rstrip()
            self.out.write("\r" + text.ljust(self._drawn))  # pad over a longer previous line
            self._drawn = len(text)
        else:
            shown = (percent // 10, state)
            if shown == self._shown:
                return
            self._shown = shown
            self.out.write(f"{self.label}: {percent}% {tail}".rstrip() + "\n")
        self.out.flush()

    def finish(self) -> None:
        if self.tty and self._drawn:
            self.out.write("\n")
            self.out.flush()


class CountingFile:
    """A file whose reads advance a progress bar while httpx streams it; ``total`` is the
    size of everything sent under the same bar."""

    def __init__(self, file: IO[bytes], progress: Progress, total: int) -> None:
        self._file, self._progress, self._total = file, progress, total

    def read(self, size: int = -1) -> bytes:
        chunk = self._file.read(size)
        self._progress.sent += len(chunk)
        detail = f"{self._progress.sent / 1e6:.1f}/{self._total / 1e6:.1f} MB"
        self._progress.update(self._progress.sent, self._total, detail)
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def fileno(self) -> int:
        return self._file.fileno()
