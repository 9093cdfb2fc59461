"""Chat encoding: ids equal apply_chat_template's, labels on assistant turns, injection-safe."""

from __future__ import annotations

import pytest
from conftest import SMOL_TOKENIZER, make_tiny_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from ctrltok.core.chat import ChatEncoder, ChatError, encode_chat, render_prompt, show
from ctrltok.core.example import IGNORE
from ctrltok.core.templates import install_templates
from ctrltok.core.tokens import resolve_tokens

TEMPLATES = ["default", "epe", "oasst", "eot", "model"]


@pytest.fixture(scope="module")
def tok():
    from ctrltok.core.tokens import add_tokens

    tokenizer = AutoTokenizer.from_pretrained(SMOL_TOKENIZER)
    model = make_tiny_llama(len(tokenizer))
    tokens = resolve_tokens(["eot", "oasst", "conditional"]) + resolve_tokens(["epe"])[:1]
    add_tokens(model, tokenizer, tokens, pad_to_multiple_of=64)
    install_templates(tokenizer)
    return tokenizer


CONVS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi there, how are you?"},
     {"role": "assistant", "content": "  Fine\n\nthanks."}, {"role": "user", "content": "Good"},
     {"role": "assistant", "content": "Bye!"}],
    [{"role": "user", "content": "def f(x):\n    return x  # code"}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "Ünïcödé 🙂 テスト"}, {"role": "assistant", "content": "ok 🙂"}],
]


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("conv", range(len(CONVS)))
def test_ids_equal_apply_chat_template(tok, template, conv):
    msgs = CONVS[conv]
    ex = encode_chat(msgs, tok, template)
    ref = tok.apply_chat_template(msgs, chat_template=template, tokenize=True, return_dict=True)["input_ids"]
    assert ex.input_ids == ref


@pytest.mark.parametrize("template", ["default", "eot", "oasst"])
def test_prompt_ids_equal_generation_prompt(tok, template):
    msgs = CONVS[0][:1]
    ref = tok.apply_chat_template(msgs, chat_template=template, tokenize=True, return_dict=True,
                                  add_generation_prompt=True)["input_ids"]
    assert render_prompt(msgs, tok, template) == ref


def _supervised_text(tok, ex):
    return tok.decode([i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])


@pytest.mark.parametrize("template,closer", [("default", "<|im_end|>"), ("eot", "<EOT>"), ("oasst", "<|endoftext|>"),
                                              ("epe", "<|im_end|>")])
def test_labels_cover_assistant_turns_and_their_closer(tok, template, closer):
    msgs = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Green."}]
    ex = encode_chat(msgs, tok, template)
    assert _supervised_text(tok, ex) == f"Blue.{closer}Green.{closer}"
    last = encode_chat(msgs, tok, template, loss_on="last")
    assert _supervised_text(tok, last) == f"Green.{closer}"
    every = encode_chat(msgs, tok, template, loss_on="all")
    assert "Name a colour." in _supervised_text(tok, every)


def test_show_marks_supervised_tokens(tok):
    ex = encode_chat(CONVS[0], tok, "eot")
    assert show(ex, tok, color=False) == "What is 2+2?<EOT>[4][.][<EOT>]"
    assert "[black on green]" in show(ex, tok)


CONTROL_SPELLINGS = ["<assistant>", "<|aligned|>", "<|misaligned|>", "<|im_end|>", "<|im_start|>", "<EOT>",
                     "<|prompter|>", "<|assistant|>", "<|endoftext|>", "<|ctrltok_filler_3|>", "<charter_1.1>"]
content = st.lists(st.one_of(st.sampled_from(CONTROL_SPELLINGS), st.text(st.characters(max_codepoint=0x2FFF, exclude_categories=("Cs", "Cn", "Cc")), max_size=12)), max_size=6).map("".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user=content, reply=content, template=st.sampled_from(["default", "eot", "oasst", "epe"]))
def test_no_content_yields_a_control_id(tok, user, reply, template):
    """Whatever the messages contain, control ids appear only where the template's markup puts them."""
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    ex = encode_chat(msgs, tok, template)
    clean = [{"role": m["role"], "content": ""} for m in msgs]
    markup = encode_chat(clean, tok, template)
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    got = [i for i in ex.input_ids if i in special]
    want = [i for i in markup.input_ids if i in special]
    assert got == want
    # ...and the text round-trips: decoding gives back the content verbatim.
    assert user in tok.decode(ex.input_ids) and reply in tok.decode(ex.input_ids)


@pytest.mark.parametrize("msgs,match", [
    ([], "non-empty list"),
    ([{"role": "robot", "content": "x"}], "role = 'robot'"),
    ([{"role": "user", "content": 3}], "content must be a string"),
    ("hello", "non-empty list"),
])
def test_bad_conversations_name_the_field(tok, msgs, match):
    with pytest.raises(ChatError, match=match):
        ChatEncoder(tok, "default").encode(msgs, source="chats.jsonl:7")


def test_error_names_source(tok):
    with pytest.raises(ChatError, match=r"chats.jsonl:7: unknown role; messages\[0\]"):
        ChatEncoder(tok, "default").encode([{"role": "x", "content": ""}], source="chats.jsonl:7")


def test_template_that_rewrites_content_is_refused(tok):
    from ctrltok.core.templates import Template

    bad = Template("bad", "{% for m in messages %}{{ m['content'] | upper }}<EOT>{% endfor %}", "<EOT>")
    with pytest.raises(ChatError, match="depends on message contents|exactly once"):
        ChatEncoder(tok, bad).encode(CONVS[0])
