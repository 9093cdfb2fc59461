"""The embedding rows a LoRA adapter carries, read once (``core.models.adapter_rows``) from the
safetensors header, by every reader: loading an adapter-only run, ``ctrltok inspect`` and the model
card. Tiny PEFT adapters are built here directly, without a training run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SMOL_TOKENIZER, make_tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
)

from ctrltok.core.models import ADAPTER, adapter_rows, load_adapter_run
from ctrltok.evaluation.doctor import inspect_checkpoint
from ctrltok.training.card import adapter_embedding


def _adapter(model, folder: Path, base: str = "base", embedding: bool = False, **lora) -> Path:
    """``model`` wrapped in LoRA and saved as PEFT saves it in a run's ``DIR/adapter``."""
    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, **lora))
    peft.peft_config["default"].base_model_name_or_path = base
    with torch.no_grad():  # LoRA's B starts at zero: give the adapter an effect once merged
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    peft.save_pretrained(folder / ADAPTER, safe_serialization=True, save_embedding_layers=embedding)
    return folder / ADAPTER


def test_the_resized_embedding_is_found_by_its_module_name_in_llama_and_gpt2(tmp_path):
    llama = make_tiny_llama(100, tie=False)
    llama.resize_token_embeddings(110, mean_resizing=False)
    tokens = {"embed_tokens": [100, 101], "lm_head": [100, 101]}
    assert adapter_rows(_adapter(llama, tmp_path / "llama", target_modules=["q_proj"], trainable_token_indices=tokens,
                                 embedding=True)) == 110
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    gpt2.resize_token_embeddings(110, mean_resizing=False)
    adapter = _adapter(gpt2, tmp_path / "gpt2", target_modules=["c_attn"], trainable_token_indices={"wte": [100]},
                       embedding=True)
    assert adapter_rows(adapter) == 110  # GPT-2's embedding is `transformer.wte`


def test_no_saved_embedding_is_none_even_with_a_vocabulary_sized_lora_factor(tmp_path):
    """A LoRA on the untied head saves ``lm_head.lora_B`` of shape (vocab, r): not an embedding."""
    adapter = _adapter(make_tiny_llama(100, tie=False), tmp_path / "run", target_modules=["q_proj", "lm_head"])
    assert adapter_rows(adapter) is None
    assert adapter_embedding(tmp_path / "run") is None  # the card shows no resize
    with pytest.raises(FileNotFoundError):
        adapter_rows(tmp_path / "missing")
    assert adapter_embedding(tmp_path / "missing") is None  # no adapter: the card drops the line


def _adapter_only_run(tmp_path: Path, base_rows: int) -> tuple[Path, Path, object]:
    """A base whose embedding outnumbers its tokenizer (as Qwen2.5's 151,936 rows for 151,665
    tokens), and an adapter-only run on it that added no tokens (so it saved no embedding)."""
    tok = AutoTokenizer.from_pretrained(SMOL_TOKENIZER)
    base = tmp_path / "base"
    make_tiny_llama(base_rows, tie=False).save_pretrained(base)
    tok.save_pretrained(base)
    run = tmp_path / "run"
    _adapter(make_tiny_llama(base_rows, tie=False), run, base=str(base), target_modules=["q_proj", "v_proj"])
    tok.save_pretrained(run)
    return run, base, tok


def test_an_adapter_without_an_embedding_keeps_the_base_rows(tmp_path):
    tok = AutoTokenizer.from_pretrained(SMOL_TOKENIZER)
    rows = len(tok) + 64
    run, base, tok = _adapter_only_run(tmp_path, rows)
    assert adapter_rows(run / ADAPTER) is None
    model, tokenizer = load_adapter_run(run)
    assert model.get_input_embeddings().weight.shape[0] == rows, "the base's embedding was resized to the tokenizer"
    assert len(tokenizer) == len(tok)
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), run / ADAPTER).merge_and_unload()
    probe = torch.tensor([[1, 5, 9, 20, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=probe).logits, expected.eval()(input_ids=probe).logits)


def test_inspect_reports_an_adapter_only_folder_without_weights_as_a_problem(tmp_path):
    run, _, _ = _adapter_only_run(tmp_path, 49152)
    (run / ADAPTER / "adapter_model.safetensors").unlink()
    report = inspect_checkpoint(run)
    assert any("adapter weights cannot be read" in p for p in report.problems), report.problems
    assert report.model_rows is None


def test_inspect_reads_a_gpt2_adapter_only_folder_s_rows(tmp_path):
    tok = AutoTokenizer.from_pretrained(SMOL_TOKENIZER)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tok) - 8))
    gpt2.resize_token_embeddings(len(tok), mean_resizing=False)
    run = tmp_path / "run"
    _adapter(gpt2, run, target_modules=["c_attn"], trainable_token_indices={"wte": [len(tok) - 1]}, embedding=True)
    tok.save_pretrained(run)
    assert not (run / "config.json").exists() and json.loads((run / ADAPTER / "adapter_config.json").read_text())
    report = inspect_checkpoint(run)
    assert report.model_rows == len(tok) and not any("embedding rows" in p for p in report.problems)
