"""The README's examples, pasted in order by a new user, succeed; pasted again, they succeed again.

A fenced block right after an ``<!-- example -->`` line (invisible when rendered) is an
example; other blocks (settings, output, ``make``, compose, benchmarks) are prose. The test
does what a new user does: ``make serve`` in one terminal (its two commands, ``loramux models
pull`` and ``loramux serve --demo``, from the repository's ``.venv`` with a fresh ``HOME``
and no ``LORAMUX_*`` variables), then every example in order in one bash session in a fresh
directory holding only ``.venv``, Python examples through ``.venv/bin/python``. The only
edits are a user's: the two keys ``make serve`` printed in place of ``lmx_...``, and the
port it listens on (a free one here) in place of 8000. The whole sequence runs twice.

An example fails the test by a non-zero exit: a CLI error, a Python exception, or an HTTP
error from curl (the session's ``curl`` adds ``--fail-with-body``; what it prints is
unchanged). To keep the run short, the fresh home's model directory links to the one the
``smollm2_dir`` fixture converted (so ``models pull`` finds it pulled); the conversion
itself is tested with that fixture.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
README = REPO_ROOT / "README.md"
VENV = REPO_ROOT / ".venv"
MARK = "<!-- example -->"
DEFAULT_ADDRESS = "127.0.0.1:8000"
# `export KEY=lmx_...` and `ADMIN=lmx_...`: what the user pastes from make serve's output.
KEY_PLACEHOLDERS = {"KEY": "demo tenant key", "ADMIN": "admin key"}
# Anything else of the form `thing_...` would be a value the user must invent or copy.
UNFILLED = re.compile(r"\b\w+_\.\.\.")
PYTHON_END = "LORAMUX_README_PYTHON"
RUN_TIMEOUT_S = 900


@dataclass(frozen=True)
class Example:
    line: int  # of the opening fence, 1-based
    lang: str
    code: str


def readme_examples(text: str) -> list[Example]:
    """The marked blocks in order; a mark not followed by a bash or python fence is an error."""
    lines = text.splitlines()
    examples = []
    for i, line in enumerate(lines):
        if line.strip() != MARK:
            continue
        fence = i + 1
        while fence < len(lines) and not lines[fence].strip():
            fence += 1
        opening = lines[fence] if fence < len(lines) else ""
        assert opening in ("```bash", "```python"), f"README.md:{i + 1}: {MARK} before {opening!r}"
        end = next((j for j in range(fence + 1, len(lines)) if lines[j] == "```"), None)
        assert end is not None, f"README.md:{fence + 1}: unclosed fence"
        examples.append(Example(fence + 1, opening[3:], "\n".join(lines[fence + 1 : end])))
    return examples


def filled(code: str, keys: dict[str, str], port: int) -> str:
    """The example as the user pastes it: the printed keys and make serve's port filled in."""
    for name, key in keys.items():
        code = re.sub(rf"\b{name}=lmx_\.\.\.", f"{name}={key}", code)
    return code.replace(DEFAULT_ADDRESS, f"127.0.0.1:{port}")


def session_script(examples: list[Example], keys: dict[str, str], port: int) -> str:
    parts = [
        "set -eu -o pipefail",
        # An HTTP error fails the example; the body is printed as before.
        'curl() { command curl --fail-with-body "$@"; }',
    ]
    for example in examples:
        code = filled(example.code, keys, port)
        # After output that ends without a newline (curl's JSON), the mark starts a line.
        parts.append(f"echo; echo {shlex.quote(f'### README.md:{example.line} ({example.lang})')}")
        if example.lang == "bash":
            parts.append(code)
        else:
            parts.append(f".venv/bin/python - <<'{PYTHON_END}'\n{code}\n{PYTHON_END}")
    return "\n".join(parts) + "\n"


def user_env(home: Path) -> dict[str, str]:
    """A new user's shell: a fresh home, no loramux or OpenAI settings of the test run's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORAMUX_", "OPENAI_"))}
    return {**env, "HOME": str(home)}


def test_the_examples_are_marked_and_need_only_what_make_serve_prints() -> None:
    examples = readme_examples(README.read_text())
    assert examples, f"no {MARK} blocks in the README"
    code = "\n".join(e.code for e in examples)
    for name in KEY_PLACEHOLDERS:
        assert re.search(rf"\b{name}=lmx_\.\.\.", code), f"no {name}=lmx_... to fill in"
    assert code.count(DEFAULT_ADDRESS) == 1, "make serve's address belongs in one place"
    rest = filled(code, {name: "lmx_x" for name in KEY_PLACEHOLDERS}, 1)
    assert UNFILLED.findall(rest) == [], "placeholders a user cannot fill from earlier output"


def test_make_serve_runs_the_two_commands_this_test_runs() -> None:
    recipe = (REPO_ROOT / "Makefile").read_text().split("\nserve:", 1)[1].split("\n\n", 1)[0]
    commands = [line.strip() for line in recipe.splitlines()[1:]]
    assert commands[0] == "$(BIN)/loramux models pull"
    assert commands[1].startswith("$(BIN)/loramux serve --demo ")


@dataclass
class MakeServe:
    port: int
    keys: dict[str, str]
    env: dict[str, str]
    log: Path


def printed_keys(log: Path) -> dict[str, str] | None:
    found = {}
    for name, label in KEY_PLACEHOLDERS.items():
        match = re.search(rf"^\s*{label}:\s+(lmx_\S+)$", log.read_text(), re.MULTILINE)
        if match is None:
            return None
        found[name] = match.group(1)
    return found


@pytest.fixture
def make_serve(tmp_path: Path, smollm2_dir: Path) -> Iterator[MakeServe]:
    """`make serve` in another terminal, for a user whose HOME is new."""
    home = tmp_path / "home"
    models = home / ".loramux" / "models"
    models.mkdir(parents=True)
    (models / smollm2_dir.name).symlink_to(smollm2_dir, target_is_directory=True)
    env = user_env(home)
    loramux = str(VENV / "bin" / "loramux")
    pull = subprocess.run(
        [loramux, "models", "pull"], env=env, capture_output=True, text=True, timeout=600
    )
    assert pull.returncode == 0, pull.stdout + pull.stderr

    port = free_port()
    log = tmp_path / "make-serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [loramux, "serve", "--demo", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 180
        keys = None
        while time.monotonic() < deadline:
            assert process.poll() is None, f"loramux serve exited:\n{log.read_text()}"
            keys = keys or printed_keys(log)
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                ready = False
            if ready and keys:
                break
            time.sleep(0.3)
        else:
            pytest.fail(f"loramux serve --demo did not come up with keys:\n{log.read_text()}")
        yield MakeServe(port, keys, env, log)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_the_readme_examples_run_in_order_twice(make_serve: MakeServe, tmp_path: Path) -> None:
    assert (VENV / "bin" / "python").exists(), "the README's examples use the repository's .venv"
    workdir = tmp_path / "clone"
    workdir.mkdir()
    (workdir / ".venv").symlink_to(VENV, target_is_directory=True)
    script = workdir.parent / "examples.sh"
    script.write_text(
        session_script(readme_examples(README.read_text()), make_serve.keys, make_serve.port)
    )
    for attempt in ("first", "second"):
        result = subprocess.run(
            ["bash", str(script)],
            cwd=workdir,
            env=make_serve.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=RUN_TIMEOUT_S,
        )
        assert result.returncode == 0, (
            f"the {attempt} run of the README's examples failed (the last ### line names the "
            f"example):\n{result.stdout[-6000:]}\n--- server log ---\n"
            f"{make_serve.log.read_text()[-3000:]}"
        )
