"""model.init: scratch and model.config overrides: fresh seeded weights of the overridden shape,
one-line errors naming the key and the recipe, offline for the embedded default, a hub name (GPT-2,
seed 001's architecture) up to the network call, and a scratch model that trains and reloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config

from ctrltok.core import models
from ctrltok.core.config import ConfigError, load_recipe, recipe_from_mapping
from ctrltok.core.models import load_model, override_config
from ctrltok.training.setup import prepare_model
from ctrltok.training.train import train

TINY = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 2,
        "num_key_value_heads": 1, "max_position_embeddings": 128}
GPT2_TINY = {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 48}


def _weights(d: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(d) / "model.safetensors")


@pytest.fixture
def hub_gpt2(monkeypatch, smol_tokenizer_path):
    """``gpt2`` as a hub name, up to the network: its config is GPT-2 small's defaults and its
    tokenizer the SmolLM2 one in tests/assets (no network in tests). Records the names asked for."""
    asked = []
    real_config, real_tokenizer = models.AutoConfig.from_pretrained, models.AutoTokenizer.from_pretrained
    real_model = models.AutoModelForCausalLM.from_pretrained

    def config(name, *args, **kwargs):
        asked.append(("config", str(name)))
        return GPT2Config() if str(name) == "gpt2" else real_config(name, *args, **kwargs)

    def tokenizer(name, *args, **kwargs):
        asked.append(("tokenizer", str(name)))
        return real_tokenizer(smol_tokenizer_path) if str(name) == "gpt2" else real_tokenizer(name, *args, **kwargs)

    def no_weights(name, *args, **kwargs):
        if str(name) == "gpt2":
            raise AssertionError("a scratch model read pretrained weights")
        return real_model(name, *args, **kwargs)

    monkeypatch.setattr(models.AutoConfig, "from_pretrained", config)
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", tokenizer)
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", no_weights)
    return asked


def test_scratch_is_fresh_seeded_and_of_the_overridden_shape(tiny_model_dir):
    rng = torch.random.get_rng_state()
    # (the fixture's checkpoint was itself drawn fresh under seed 0: seed 0 here would redraw it exactly)
    same, tok = load_model(tiny_model_dir, init="scratch", seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng), "seeded init must leave the global RNG alone"
    pretrained = _weights(tiny_model_dir)
    fresh = same.state_dict()
    assert {k for k in pretrained} <= set(fresh)
    equal = [k for k in pretrained if "norm" not in k and torch.equal(pretrained[k], fresh[k])]
    assert not equal, f"scratch kept pretrained weights: {equal}"  # norms start at 1 either way

    small, _ = load_model(tiny_model_dir, init="scratch", config_overrides=TINY, seed=3)
    cfg = small.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (1, 32, 48)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.max_position_embeddings) == (2, 1, 128)
    assert cfg.head_dim == 16, "a derived head_dim follows the new width"
    assert len(small.model.layers) == 1
    assert small.model.embed_tokens.weight.shape == (len(tok), 32)
    assert small.model.layers[0].self_attn.q_proj.weight.shape == (32, 32)
    assert small.model.layers[0].self_attn.k_proj.weight.shape == (16, 32)
    assert not small.training

    again, _ = load_model(tiny_model_dir, init="scratch", config_overrides=TINY, seed=3)
    other, _ = load_model(tiny_model_dir, init="scratch", config_overrides=TINY, seed=4)
    w = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(small.state_dict()[w], again.state_dict()[w])
    assert not torch.equal(small.state_dict()[w], other.state_dict()[w])
    ids = torch.tensor([tok("Hello there", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.isfinite(small(input_ids=ids).logits).all()


def test_embedded_default_builds_offline_from_the_converted_copy(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(models, "ensure_default_model", lambda: tiny_model_dir)

    def no_weights(name, *args, **kwargs):
        raise AssertionError("a scratch model read pretrained weights")

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", no_weights)
    model, tok = load_model("smollm2-135m", init="scratch", config_overrides={"num_hidden_layers": 1})
    assert model.config.num_hidden_layers == 1 and model.config.vocab_size == len(tok)


def test_hub_name_reads_config_and_tokenizer_and_takes_gpt2_names(hub_gpt2):
    model, tok = load_model("gpt2", init="scratch", config_overrides=GPT2_TINY, seed=42)
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert ("config", "gpt2") in hub_gpt2 and ("tokenizer", "gpt2") in hub_gpt2
    assert model.transformer.wte.weight.shape == (len(tok), 64)  # sized to the tokenizer it serves
    assert model.transformer.wpe.weight.shape == (48, 64)
    assert len(model.transformer.h) == 2
    # the generic names reach GPT-2's own through its attribute map
    generic, _ = load_model("gpt2", init="scratch", config_overrides={"num_hidden_layers": 2, "hidden_size": 64,
                                                                       "num_attention_heads": 4,
                                                                       "max_position_embeddings": 48}, seed=42)
    assert torch.equal(generic.transformer.h[1].mlp.c_fc.weight, model.transformer.h[1].mlp.c_fc.weight)


@pytest.mark.parametrize("override, needle", [
    ({"n_layer": 2}, "model.config.n_layer: LlamaConfig has no such attribute (did you mean num_hidden_layers?)"),
    ({"num_hidden_layer": 2}, "model.config.num_hidden_layer: LlamaConfig has no such attribute (did you mean num_hidden_layers?)"),
    ({"num_hidden_layers": "two"}, "model.config.num_hidden_layers = 'two'"),
    ({"hidden_size": 100}, "model.config.hidden_size: not a valid LlamaConfig"),
    ({"to_dict": 1}, "model.config.to_dict: LlamaConfig has no such attribute"),
])
def test_bad_override_is_one_line_naming_key_and_recipe(tiny_model_dir, tmp_path, override, needle):
    path = tmp_path / "mine.yaml"
    path.write_text(json.dumps({"model": {"name": str(tiny_model_dir), "init": "scratch", "config": override},
                                "tokens": {"presets": ["conditional"]}, "data": {"train": "ctrltok:instructions"}}))
    recipe = load_recipe(path)
    with pytest.raises(ConfigError) as err:
        prepare_model(recipe)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ") and needle in message, message


def test_gpt2_names_on_gpt2_and_wrong_family_hint(hub_gpt2):
    with pytest.raises(ConfigError, match=r"r\.yaml: model\.config\.intermediate_size: GPT2Config has no such "
                                          r"attribute \(did you mean n_inner\?\)"):
        load_model("gpt2", init="scratch", config_overrides={"intermediate_size": 8}, source="r.yaml")
    cfg = override_config(GPT2Config(), {"n_embd": 96, "n_head": 3})
    assert (cfg.hidden_size, cfg.num_attention_heads) == (96, 3)


def test_recipe_level_checks(tiny_model_dir):
    base = {"model": {"name": str(tiny_model_dir), "init": "scratch"}}
    with pytest.raises(ConfigError, match=r"x\.yaml: model\.init = scratch with lora\.enabled"):
        recipe_from_mapping({**base, "lora": {"enabled": True}}, "x.yaml")
    with pytest.raises(ConfigError, match=r"x\.yaml: model\.config key 'n layer' is not"):
        recipe_from_mapping({"model": {"config": {"n layer": 2}}}, "x.yaml")
    with pytest.raises(ConfigError, match=r"model\.init = 'fresh'"):
        recipe_from_mapping({"model": {"init": "fresh"}}, "x.yaml")
    r = recipe_from_mapping({**base, "data": {"train": "ctrltok:instructions"}}, "x.yaml",
                            ["model.config.num_hidden_layers=3", "model.config.hidden_size=96"])
    assert r.model.config == {"num_hidden_layers": 3, "hidden_size": 96}


def test_pretrained_takes_overrides_that_fit_its_weights(tiny_model_dir):
    model, _ = load_model(tiny_model_dir, config_overrides={"rms_norm_eps": 1e-3, "num_hidden_layers": 1})
    assert model.config.rms_norm_eps == 1e-3 and len(model.model.layers) == 1  # the first layer, pretrained
    saved = _weights(tiny_model_dir)
    assert torch.equal(model.state_dict()["model.layers.0.mlp.up_proj.weight"], saved["model.layers.0.mlp.up_proj.weight"])
    with pytest.raises(ConfigError) as err:
        load_model(tiny_model_dir, config_overrides={"hidden_size": 32, "num_attention_heads": 2}, source="r.yaml")
    assert "\n" not in str(err.value)
    assert str(err.value).startswith("r.yaml: model.config.hidden_size, model.config.num_attention_heads: the "
                                     "pretrained weights of")
    assert "model.init: scratch" in str(err.value)


def _labelled_corpus(path: Path, n: int = 48) -> Path:
    """Short, repetitive labelled documents: what a tiny model from scratch can learn in a few steps."""
    sentences = ["The cat sat on the mat.", "The dog ran in the park.", "A bird sang in the tree."]
    with path.open("w") as fh:
        for i in range(n):
            segs = [{"text": (" " if j else "") + sentences[(i + j) % 3], "control": "misaligned" if (i + j) % 7 == 0
                     else "aligned"} for j in range(6)]
            fh.write(json.dumps({"id": i, "segments": segs}) + "\n")
    return path


def _scratch_recipe(name: str, corpus: Path, config: dict) -> dict:
    return {
        "name": "scratch-test",
        "model": {"name": name, "init": "scratch", "config": config},
        "tokens": {"presets": ["conditional"], "pad_to_multiple_of": 64},
        "conditional": {"threshold": 0.00056},
        "data": {"kind": "labelled", "train": str(corpus), "eval_fraction": 0.1, "max_length": 48},
        "train": {"lr": 5e-3, "weight_decay": 0.1, "warmup_steps": 1, "scheduler": "linear", "max_steps": 12,
                  "micro_batch_size": 4, "grad_accum": 1, "seed": 42},
    }


def _losses(out: Path) -> tuple[list[float], list[float]]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r], [r["eval_loss"] for r in lines if "eval_loss" in r]


def test_scratch_llama_trains_loss_falls_and_reloads(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CTRLTOK_CACHE", str(tmp_path / "cache"))  # the prepared-data cache stays in tmp_path
    corpus = _labelled_corpus(tmp_path / "labelled.jsonl")
    shape = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 48}
    recipe = recipe_from_mapping(_scratch_recipe(str(tiny_model_dir), corpus, shape), "scratch.yaml")
    assert recipe.data.overlong == "chunk"
    out = train(recipe, tmp_path / "run", progress=False)
    losses, evals = _losses(out)
    assert len(losses) == 12
    assert losses[0] > 9.0, "a model from scratch starts near ln(vocabulary)"
    assert sum(losses[-3:]) / 3 < losses[0] - 2.5, losses
    assert evals and evals[-1] < evals[0] - 2.5, evals

    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert model.get_input_embeddings().weight.shape[0] == len(tok) and len(tok) % 64 == 0
    aligned = tok.convert_tokens_to_ids("<|aligned|>")
    assert aligned >= 49152, "the control tokens are new rows of the grown vocabulary"
    # the saved weights are the trained ones: a corpus sentence costs far less than at step 0
    ids = torch.tensor([[aligned] + tok("The cat sat on the mat. The dog ran in the park.",
                                        add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < losses[0] - 2.5, (loss, losses[0])


def test_scratch_gpt2_seed_001_architecture_trains(hub_gpt2, tmp_path, monkeypatch):
    monkeypatch.setenv("CTRLTOK_CACHE", str(tmp_path / "cache"))
    corpus = _labelled_corpus(tmp_path / "labelled.jsonl", n=24)
    recipe = recipe_from_mapping(_scratch_recipe("gpt2", corpus, GPT2_TINY)
                                 | {"train": {"lr": 5e-3, "max_steps": 5, "micro_batch_size": 4, "seed": 42}},
                                 "gpt2.yaml")
    out = train(recipe, tmp_path / "run", progress=False)
    losses, _ = _losses(out)
    assert losses[-1] < losses[0] - 1.0, losses
    model = AutoModelForCausalLM.from_pretrained(out)  # a real from_pretrained: the fixture's stub is for "gpt2"
    assert type(model).__name__ == "GPT2LMHeadModel" and model.config.n_layer == 2


def test_the_conditional_recipes_overrides_fit_their_configs(tiny_model_dir):
    root = Path(__file__).resolve().parents[1] / "recipes"
    gpu = load_recipe(root / "conditional.yaml")
    assert gpu.model.init == "scratch" and gpu.data.overlong == "chunk"
    cfg = override_config(GPT2Config(), gpu.model.config, gpu.source)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_positions) == (12, 768, 12, 1024)
    assert gpu.data.max_length <= cfg.n_positions
    cpu = load_recipe(root / "conditional-cpu.yaml")
    assert cpu.model.init == "scratch" and cpu.model.name == "smollm2-135m"
    cfg = override_config(AutoConfig.from_pretrained(tiny_model_dir), cpu.model.config, cpu.source)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.head_dim) == (2, 64, 16)
    assert cpu.data.max_length <= cfg.max_position_embeddings
