"""Vocabulary surgery: seed-000 sizes, presets, init strategies, fillers, ties, round trip."""

from __future__ import annotations

import pytest
import torch

from ctrltok.core.tokens import (
    FILLER_FORMAT,
    ControlToken,
    add_tokens,
    check_sizes,
    is_tied,
    load_charter,
    resolve_tokens,
)


def test_epe_preset_reproduces_seed_000(smol_tokenizer, tiny_llama):
    model = tiny_llama(len(smol_tokenizer))
    s = add_tokens(model, smol_tokenizer, resolve_tokens(["epe"]), pad_to_multiple_of=128)
    assert len(smol_tokenizer) == 49_280
    assert model.get_input_embeddings().weight.shape[0] == 49_280
    assert s.ids["<assistant>"] == 49_152
    charter = load_charter()
    assert len(charter) == 35
    assert load_charter("ctrltok:charter.jsonl") == charter  # the shipped file, as a resource name
    assert [s.ids[c.token] for c in charter] == list(range(49_153, 49_188))
    assert s.filler_ids == list(range(49_188, 49_280))


@pytest.mark.parametrize("preset", ["eot", "oasst", "conditional", "epe"])
def test_every_preset(smol_tokenizer, tiny_llama, preset):
    model = tiny_llama(len(smol_tokenizer))
    tokens = resolve_tokens([preset])
    s = add_tokens(model, smol_tokenizer, tokens, pad_to_multiple_of=64)
    check_sizes(model, smol_tokenizer)
    for t in tokens:
        ids = smol_tokenizer(t.text, add_special_tokens=False).input_ids
        assert ids == [s.ids[t.text]], f"{t.text} is not atomic"
    gc = model.generation_config
    for t in tokens:
        if t.stop:
            assert s.ids[t.text] in gc.eos_token_id
        if t.blocked:
            assert s.ids[t.text] in gc.suppress_tokens


def test_oasst_reuses_endoftext(smol_tokenizer, tiny_llama):
    model = tiny_llama(len(smol_tokenizer))
    s = add_tokens(model, smol_tokenizer, resolve_tokens(["oasst"]))
    assert s.ids["<|endoftext|>"] == 0
    assert len(s.new_ids) == 2


@pytest.mark.parametrize("init", ["mvn", "mean", "mean_noise", "describe", "copy:<|im_end|>"])
@pytest.mark.parametrize("tie", [True, False])
def test_init_changes_only_new_rows(smol_tokenizer, tiny_llama, init, tie):
    model = tiny_llama(len(smol_tokenizer), tie=tie)
    before_in = model.get_input_embeddings().weight.detach().clone()
    before_out = model.get_output_embeddings().weight.detach().clone()
    s = add_tokens(model, smol_tokenizer, resolve_tokens(["conditional"]), init=init, pad_to_multiple_of=64)
    w_in = model.get_input_embeddings().weight
    w_out = model.get_output_embeddings().weight
    n = before_in.shape[0]
    assert torch.equal(w_in[:n], before_in)
    assert torch.equal(w_out[:n], before_out)
    assert is_tied(model) == tie
    new = w_in[s.new_ids]
    assert torch.isfinite(new).all()
    mean = before_in.mean(0)
    if init == "mean":
        assert torch.allclose(new, mean.expand_as(new))
    elif init == "mean_noise":
        assert not torch.allclose(new[0], new[1])
        assert (new - mean).abs().max() < 0.1
    elif init.startswith("copy:"):
        assert torch.equal(new[0], before_in[2])
    elif init == "describe":
        ids = smol_tokenizer("aligned", add_special_tokens=False).input_ids
        assert torch.allclose(new[0], before_in[ids].mean(0))
    if not tie:  # an untied head gets its new rows initialised as well, not left random
        assert torch.isfinite(w_out[s.new_ids]).all()
        if init == "mean":
            assert torch.allclose(w_out[s.new_ids], before_out.mean(0).expand_as(new))


def test_size_mismatch_is_refused_with_both_numbers(smol_tokenizer, tiny_llama):
    model = tiny_llama(len(smol_tokenizer) - 100)
    with pytest.raises(ValueError, match=r"49,152.*49,052"):
        add_tokens(model, smol_tokenizer, resolve_tokens(["eot"]))


def test_existing_token_needs_reuse(smol_tokenizer, tiny_llama):
    model = tiny_llama(len(smol_tokenizer))
    with pytest.raises(ValueError, match="already exists"):
        add_tokens(model, smol_tokenizer, [ControlToken("<|im_end|>", "x")])


def test_fillers_are_never_generated(smol_tokenizer, tiny_llama):
    model = tiny_llama(len(smol_tokenizer))
    s = add_tokens(model, smol_tokenizer, resolve_tokens(["conditional"]), pad_to_multiple_of=128)
    # Make the filler and blocked rows overwhelmingly likely, then check generation still avoids them.
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[s.filler_ids + s.blocked_ids] = head[s.filler_ids + s.blocked_ids] * 0 + 5.0
        model.model.norm.weight.fill_(5.0)
    ids = torch.tensor([smol_tokenizer("Hello there", add_special_tokens=False).input_ids])
    out = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    bad = set(s.filler_ids) | set(s.blocked_ids)
    assert out and not bad & set(out)
    assert all(smol_tokenizer.convert_ids_to_tokens(i).startswith(FILLER_FORMAT.split("{")[0]) for i in s.filler_ids)


def test_round_trip_with_plain_transformers(smol_tokenizer, tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ctrltok.core.templates import install_templates

    model = tiny_llama(len(smol_tokenizer))
    s = add_tokens(model, smol_tokenizer, resolve_tokens(["epe"]), pad_to_multiple_of=128)
    install_templates(smol_tokenizer)
    model.save_pretrained(tmp_path)
    smol_tokenizer.save_pretrained(tmp_path)
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path)
    t2 = AutoTokenizer.from_pretrained(tmp_path)
    assert len(t2) == 49_280 == m2.get_input_embeddings().weight.shape[0]
    assert t2.convert_tokens_to_ids("<assistant>") == 49_152
    assert torch.equal(m2.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert is_tied(m2)
    assert set(m2.generation_config.suppress_tokens) == set(s.blocked_ids + s.filler_ids)
    text = t2.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                  chat_template="epe", tokenize=False)
    assert "<assistant>\nyo<|im_end|>" in text
