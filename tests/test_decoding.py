"""Decoding is part of the recipe: `decoding` lands in generation_config.json beside the stop ids,
generation starts from it, the commands' flags override it, greedy stays available, and the
backend's knobs reach the GenerationConfig that model.generate gets."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import SMOL_TOKENIZER, make_tiny_llama

import ctrltok.generation.generate as gen
from ctrltok.cli.checks import UsageError
from ctrltok.cli.generate import model_decoding
from ctrltok.cli.main import main
from ctrltok.core.config import DecodingConfig, Recipe, load_recipe
from ctrltok.core.decoding import (
    apply_decoding,
    override_decoding,
    resolve_decoding,
    served_decoding,
)
from ctrltok.core.templates import install_templates
from ctrltok.core.tokens import add_tokens, apply_generation_config, resolve_tokens
from ctrltok.generation.completion import Sampling, TransformersBackend, VLLMBackend
from ctrltok.generation.generate import generate, prompt_ids
from ctrltok.training.setup import prepare_model

LIMA = DecodingConfig(do_sample=True, temperature=0.7, top_p=0.9, repetition_penalty=1.2, max_new_tokens=2048)
CONVS = [[{"role": "user", "content": "Name a river."}], [{"role": "user", "content": "x"}]]


def test_the_eot_recipes_decode_as_lima_did():
    """LIMA (Zhou et al. 2023, section 4.1): nucleus p 0.9, temperature 0.7, repetition penalty 1.2,
    2048 tokens; the CPU recipe keeps all but the length."""
    assert load_recipe("recipes/eot.yaml").decoding == LIMA
    cpu = load_recipe("recipes/eot-cpu.yaml").decoding
    assert cpu == DecodingConfig(**{**LIMA.__dict__, "max_new_tokens": cpu.max_new_tokens})


@pytest.mark.parametrize("decoding", [LIMA, DecodingConfig(), DecodingConfig(do_sample=True, top_k=40,
                                                                              no_repeat_ngram_size=3)])
def test_recipe_decoding_lands_in_generation_config_json(tiny_model_dir, tmp_path, decoding):
    from transformers import GenerationConfig

    recipe = Recipe(name="decoding")
    recipe.model.name = str(tiny_model_dir)
    recipe.tokens.presets = ["eot"]
    recipe.data.template = "eot"
    recipe.decoding = decoding
    prepared = prepare_model(recipe)
    prepared.model.save_pretrained(tmp_path)  # transformers refuses to save an inconsistent config
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert saved["do_sample"] is decoding.do_sample
    assert saved["repetition_penalty"] == decoding.repetition_penalty
    assert saved["max_new_tokens"] == decoding.max_new_tokens
    if decoding.do_sample:
        assert (saved["temperature"], saved["top_p"], saved["top_k"]) == (decoding.temperature, decoding.top_p,
                                                                            decoding.top_k or 0)
    else:
        assert "temperature" not in saved and "top_p" not in saved
    assert prepared.end_of_turn_id in saved["eos_token_id"]  # the stops set today stay
    assert served_decoding(GenerationConfig.from_pretrained(tmp_path)) == decoding


@pytest.fixture(scope="module")
def lima_model():
    """Tiny random Llama with the eot tokens, served with LIMA's decoding."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SMOL_TOKENIZER)
    tok.pad_token = tok.eos_token
    model = make_tiny_llama(len(tok))
    surgery = add_tokens(model, tok, resolve_tokens(["eot"]), pad_to_multiple_of=64)
    apply_generation_config(model, surgery, surgery.ids["<EOT>"])
    apply_decoding(model.generation_config, LIMA)
    install_templates(tok)
    return model, tok, surgery


@pytest.fixture
def configs(monkeypatch):
    """Every GenerationConfig generation.generate.generation_config hands to model.generate."""
    seen = []
    real = gen.generation_config

    def record(*args, **kwargs):
        config = real(*args, **kwargs)
        seen.append(copy.deepcopy(config))  # as resolved, before generate_batch moves the penalty to its processor
        return config

    monkeypatch.setattr(gen, "generation_config", record)
    return seen


def test_generate_starts_from_the_models_decoding(lima_model, configs):
    model, tok, _ = lima_model
    generate(model, tok, CONVS, "eot", max_new_tokens=3)
    got = configs[-1]
    assert got.do_sample and (got.temperature, got.top_p, got.top_k) == (0.7, 0.9, 0)
    assert got.repetition_penalty == 1.2 and got.max_new_tokens == 3


def test_greedy_keeps_the_penalty_and_is_deterministic(lima_model, configs):
    model, tok, _ = lima_model
    greedy = override_decoding(served_decoding(model.generation_config), greedy=True, max_new_tokens=4)
    first = generate(model, tok, CONVS, "eot", decoding=greedy)
    assert not configs[-1].do_sample and configs[-1].repetition_penalty == 1.2
    alone = [generate(model, tok, [c], "eot", decoding=greedy)[0] for c in CONVS]
    assert [o["ids"] for o in first] == [o["ids"] for o in alone]
    assert generate(model, tok, CONVS, "eot", max_new_tokens=4, temperature=0)[0]["ids"] == first[0]["ids"]


def test_override_decoding():
    base = LIMA
    assert override_decoding(base, temperature=0).do_sample is False
    assert override_decoding(DecodingConfig(), temperature=0.5) == DecodingConfig(do_sample=True, temperature=0.5)
    changed = override_decoding(base, top_k=5, repetition_penalty=1.0, no_repeat_ngram_size=2)
    assert (changed.top_k, changed.repetition_penalty, changed.no_repeat_ngram_size) == (5, 1.0, 2)
    assert override_decoding(changed, top_k=0).top_k is None
    assert base == LIMA  # a copy, not changed in place
    with pytest.raises(ValueError, match="top_p"):
        override_decoding(base, top_p=1.5)


def test_resolve_decoding_takes_every_flag(lima_model):
    """The one resolver the commands and evaluation call: the model's decoding, any flag on top."""
    model, _, _ = lima_model
    assert resolve_decoding(model) == LIMA
    got = resolve_decoding(model, greedy=True, top_k=3, no_repeat_ngram_size=2, max_new_tokens=5, top_p=None)
    assert (got.do_sample, got.top_k, got.no_repeat_ngram_size, got.max_new_tokens, got.top_p) == (False, 3, 2, 5, 0.9)
    assert resolve_decoding(model, DecodingConfig(), temperature=0.5).repetition_penalty == 1.0  # given, not served
    with pytest.raises(ValueError, match="repetition_penalty"):
        resolve_decoding(model, repetition_penalty=0)


def test_model_decoding_turns_a_bad_flag_into_a_usage_error(lima_model):
    model, _, _ = lima_model
    assert model_decoding(model, {"max_new_tokens": 9, "temperature": 0}, max_new_tokens=4).max_new_tokens == 4
    with pytest.raises(UsageError, match="top_p"):
        model_decoding(model, {"top_p": 2.0})


def test_sampling_left_to_the_model_is_resolved_from_its_generation_config():
    """None in a Sampling means the served value; backends that build their own parameters (vLLM)
    take it from generation_config.json, no_repeat_ngram_size included."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=True, top_k=7, repetition_penalty=1.3, no_repeat_ngram_size=3)
    served = Sampling(temperature=0.5).served(config)
    assert (served.top_k, served.repetition_penalty, served.no_repeat_ngram_size) == (7, 1.3, 3)
    mine = Sampling(top_k=0, repetition_penalty=1.0, no_repeat_ngram_size=0).served(config)
    assert (mine.top_k, mine.repetition_penalty, mine.no_repeat_ngram_size) == (0, 1.0, 0)


def test_vllm_refuses_the_models_no_repeat_ngram_size(lima_model):
    """vLLM has no no_repeat_ngram_size: one the model's generation_config asks for is an error, not
    silently dropped. The backend is built without vLLM (its model is never called)."""
    from transformers import GenerationConfig

    _, tok, _ = lima_model
    backend = VLLMBackend.__new__(VLLMBackend)  # __init__ needs vLLM and a GPU
    backend.tokenizer, backend.gen_config = tok, GenerationConfig(no_repeat_ngram_size=3)
    with pytest.raises(ValueError, match="no_repeat_ngram_size.*got 3"):
        backend.complete(["Hi"], Sampling(max_new_tokens=2))


def test_backend_knobs_reach_model_generate(lima_model, configs):
    model, tok, _ = lima_model
    backend = TransformersBackend(model, tok, batch_size=4)
    prompts = prompt_ids(tok, CONVS, "eot")
    backend.generate(prompts, Sampling(max_new_tokens=2, temperature=0.5, top_k=7, repetition_penalty=1.3,
                                       no_repeat_ngram_size=2))
    got = configs[-1]
    assert (got.temperature, got.top_k, got.repetition_penalty, got.no_repeat_ngram_size) == (0.5, 7, 1.3, 2)
    backend.generate(prompts, Sampling(max_new_tokens=2))  # None: the model's (the recipe's) penalty
    assert configs[-1].repetition_penalty == 1.2 and not configs[-1].do_sample
    assert Sampling.from_decoding(LIMA).top_k == 0 and Sampling.from_decoding(DecodingConfig()).temperature == 0


def test_the_repetition_penalty_counts_generated_ids_and_spares_the_stop_ids(lima_model, monkeypatch):
    """LIMA penalised previously generated tokens; its template puts <EOT> after the user's turn
    too, so transformers' penalty, which counts the prompt, would push every reply off its stop."""
    eot, other, quoted = 7, 9, 6
    scores = torch.tensor([[0.0] * 5 + [-2.0, 3.0, 3.0, 0.0, 3.0]])
    seen = torch.tensor([[quoted, eot, other, 5]])  # a prompt of two ids, then two generated
    got = gen.GeneratedRepetitionPenalty(1.5, [eot], prompt_length=2)(seen, scores.clone())
    assert got[0, other] == 2.0 and got[0, 5] == -3.0  # generated: /1.5 and *1.5, as transformers does
    assert got[0, quoted] == 3.0 and got[0, eot] == 3.0  # the prompt's ids and the stop id: untouched
    assert gen.GeneratedRepetitionPenalty(1.5, [eot], 0)(seen, scores.clone())[0, eot] == 3.0  # a stop, generated
    model, tok, surgery = lima_model
    used = {}

    def spy(**kwargs):
        used["processors"], used["penalty"] = list(kwargs["logits_processor"]), kwargs["generation_config"].repetition_penalty
        used["width"] = kwargs["input_ids"].shape[1]
        return torch.cat([kwargs["input_ids"], torch.full((kwargs["input_ids"].shape[0], 1), eot)], 1)

    monkeypatch.setattr(model, "generate", spy)
    generate(model, tok, CONVS[:1], "eot", max_new_tokens=2)
    penalty = [p for p in used["processors"] if isinstance(p, gen.GeneratedRepetitionPenalty)]
    assert used["penalty"] == 1.0 and len(penalty) == 1 and penalty[0].inner.penalty == 1.2
    assert penalty[0].inner.prompt_ignore_length == used["width"]
    assert surgery.ids["<EOT>"] in penalty[0].stops.tolist()


def test_no_repeat_ngram_size_changes_what_is_generated(lima_model):
    """The knob is not only passed on: with every logit pushed towards "!", greedy repeats it, and
    no_repeat_ngram_size = 1 forbids the second one."""
    from test_generate import boosted

    model, tok, _ = lima_model
    bang = tok.convert_tokens_to_ids("!")
    prompts = prompt_ids(tok, CONVS[:1], "eot")
    with boosted(model, [bang]):
        plain = TransformersBackend(model, tok).generate(prompts, Sampling(max_new_tokens=4, repetition_penalty=1.0))
        once = TransformersBackend(model, tok).generate(prompts, Sampling(max_new_tokens=4, repetition_penalty=1.0,
                                                                          no_repeat_ngram_size=1))
    assert plain[0].token_ids == [bang] * 4
    assert once[0].token_ids.count(bang) == 1 and len(set(once[0].token_ids)) == len(once[0].token_ids)


@pytest.fixture(scope="module")
def lima_checkpoint(lima_model, tmp_path_factory):
    model, tok, surgery = lima_model
    out = tmp_path_factory.mktemp("lima")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "ctrltok.json").write_text(json.dumps({**surgery.manifest(), "template": "eot"}))
    return out


@pytest.mark.parametrize("flags,want", [
    ([], {"do_sample": True, "temperature": 0.7, "repetition_penalty": 1.2}),
    (["--greedy"], {"do_sample": False, "repetition_penalty": 1.2}),
    (["--temperature", "0"], {"do_sample": False}),
    (["--temperature", "0.5", "--repetition-penalty", "1", "--top-k", "3"],
     {"do_sample": True, "temperature": 0.5, "repetition_penalty": 1.0, "top_k": 3}),
])
def test_generate_command_flags_override_the_checkpoint(lima_checkpoint, configs, capsys, flags, want):
    assert main(["generate", "--model", str(lima_checkpoint), "--prompt", "Hi", "--max-new-tokens", "2", *flags]) == 0
    got = configs[-1]
    assert got.max_new_tokens == 2
    assert {k: getattr(got, k) for k in want} == want
    assert "decoding: " in capsys.readouterr().err


def test_chat_says_its_decoding(lima_checkpoint, configs):
    import io

    from ctrltok.cli.generate import chat_loop

    out = io.StringIO()
    chat_loop(lima_checkpoint, stdin=io.StringIO("Hello\n"), stdout=out, decoding={"max_new_tokens": 2})
    assert "sampling T 0.7, top-p 0.9, repetition penalty 1.2, <= 2 new tokens" in out.getvalue().splitlines()[0]
    assert configs[-1].do_sample and configs[-1].max_new_tokens == 2
