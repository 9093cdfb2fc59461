"""Shared fixtures: the real SmolLM2 tokenizer (shipped in tests/assets) and tiny random Llamas."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).parent / "assets"
SMOL_TOKENIZER = ASSETS / "smollm2-tokenizer"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Data that runs prepare goes to a folder of this test session, not the user's cache (subprocesses inherit it).
os.environ.setdefault("CTRLTOK_DATA_CACHE", tempfile.mkdtemp(prefix="ctrltok-prepared-"))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def smol_tokenizer_path() -> Path:
    return SMOL_TOKENIZER


@pytest.fixture
def smol_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SMOL_TOKENIZER)


def make_tiny_llama(vocab_size: int, tie: bool = True, seed: int = 0, layers: int = 2, attn: str = "sdpa"):
    """A random 2-layer Llama small enough for CPU unit tests, with the real vocabulary size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    config._attn_implementation = attn
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny random Llama with the real SmolLM2 tokenizer: a model *name* for recipes."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(SMOL_TOKENIZER)
    make_tiny_llama(len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def shared_data(*parts: str) -> Path:
    """A file under ../shared/data, or skip the test when it is absent (a user's fresh clone)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared is not part of a fresh clone)")
    return path
