"""Bad input gets an error naming file, line and field, or a counted skip; never a silent drop."""

from __future__ import annotations

import json

import pytest

from ctrltok.core.chat import ChatError
from ctrltok.core.config import recipe_from_mapping
from ctrltok.core.conversation import to_conversation
from ctrltok.core.records import RecordError, Skips, read_records
from ctrltok.data.encode import build_examples


def _write(tmp_path, lines: list[bytes]):
    p = tmp_path / "chats.jsonl"
    p.write_bytes(b"\n".join(lines) + b"\n")
    return p


GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}).encode()


@pytest.mark.parametrize("bad,match", [
    (b'{"messages": [', r"chats.jsonl:2: malformed JSON"),
    (b'\xff\xfe{"a": 1}', r"chats.jsonl:2: invalid UTF-8"),
    (b'[1, 2]', r"chats.jsonl:2: expected a JSON object"),
])
def test_errors_name_file_and_line(tmp_path, bad, match):
    p = _write(tmp_path, [GOOD, bad])
    with pytest.raises(RecordError, match=match):
        list(read_records(p))


def test_skips_are_counted_with_reasons(tmp_path):
    p = _write(tmp_path, [GOOD, b"{oops", b"\xff", GOOD])
    skips = Skips()
    got = list(read_records(p, on_error="skip", skips=skips))
    assert len(got) == 2
    assert skips.summary() == {"malformed JSON": 1, "invalid UTF-8": 1}
    assert skips.examples["malformed JSON"] == [f"{p}:2"]


def test_missing_messages_names_the_field():
    with pytest.raises(ChatError, match=r"x.jsonl:3: no conversation found.*found fields \['text'\]"):
        to_conversation({"text": "hello"}, "x.jsonl:3")


def test_lima_and_alpaca_layouts():
    assert [m["role"] for m in to_conversation({"conversations": ["q", "a", "q2", "a2"]}, "w")] == \
        ["user", "assistant", "user", "assistant"]
    assert to_conversation({"instruction": "Do", "input": "this", "output": "done"}, "w")[0]["content"] == "Do\n\nthis"


def test_sharegpt_and_prompt_only_layouts():
    conv = to_conversation({"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                                              {"from": "gpt", "value": "a"}]}, "w")
    assert [m["role"] for m in conv] == ["system", "user", "assistant"]
    with pytest.raises(ChatError, match=r"w: conversations\[0\].from = 'robot'"):
        to_conversation({"conversations": [{"from": "robot", "value": "x"}]}, "w")
    assert to_conversation({"prompt": "hi", "system": "s"}, "w", prompt_only=True) == \
        [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]
    with pytest.raises(ChatError, match="no conversation found"):
        to_conversation({"prompt": "hi"}, "w")  # a training record needs a reply


def test_recipe_data_with_bad_records(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    bad = json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode()
    p = _write(tmp_path, [GOOD, bad, GOOD, b"{nope"])
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    strict = recipe_from_mapping({"data": {"train": str(p), "eval_fraction": 0}})
    with pytest.raises(RecordError, match=r"chats.jsonl:4: malformed JSON"):
        build_examples(strict, tok)
    lenient = recipe_from_mapping({"data": {"train": str(p), "eval_fraction": 0, "on_error": "skip"}})
    enc = build_examples(lenient, tok)
    assert len(enc.train) == 2
    assert enc.skips.summary() == {"malformed JSON": 1, "messages[0].role = 'robot'": 1}
