"""Bad input gets an error naming file, line and field, or a counted skip; never a silent drop."""

from __future__ import annotations

import json

import pytest

from ctrltok.core.chat import ChatError
from ctrltok.core.config import ConfigError, recipe_from_mapping
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
    with pytest.raises(ChatError, match=r"w: unknown role; conversations\[0\].from = 'robot'"):
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
    assert enc.skips.summary() == {"malformed JSON": 1, "unknown role": 1}
    strict = recipe_from_mapping({"data": {"train": str(_write(tmp_path, [GOOD, bad])), "eval_fraction": 0}})
    with pytest.raises(ChatError, match=r"chats.jsonl:2: unknown role; messages\[0\].role = 'robot'; expected"):
        build_examples(strict, tok)  # the whole message, not only what a skip is counted under


def test_gzipped_jsonl_is_read_not_refused_as_invalid_utf8(tmp_path):
    import gzip

    p = tmp_path / "chats.jsonl.gz"
    p.write_bytes(gzip.compress(GOOD + b"\n" + GOOD + b"\n"))
    skips = Skips()
    assert len(list(read_records(p, on_error="skip", skips=skips))) == 2
    assert not skips


def test_a_source_may_be_a_path_a_mapping_or_a_list(tmp_path):
    p = _write(tmp_path, [GOOD, GOOD])
    as_path = list(read_records(p))
    assert list(read_records(str(p))) == as_path
    assert list(read_records({"path": str(p)})) == as_path
    assert list(read_records([p])) == as_path  # a mixture of one source is that source
    assert sorted(read_records([p, {"path": str(p), "weight": 2.0}], seed=3)) == sorted(as_path * 2)


def test_data_train_string_and_set_override_unchanged(tmp_path):
    from ctrltok.core.records import read_sources

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("hello")
    recipe = recipe_from_mapping({"data": {"kind": "text", "train": ["x.jsonl", "y.jsonl"]}},
                                 overrides=[f"data.train={tmp_path / 'd'}"])
    assert recipe.data.train == str(tmp_path / "d")
    assert list(read_sources(recipe.data, recipe.train.seed)) == [(str(tmp_path / "d" / "a.txt"),
                                                                   {"id": "a", "text": "hello"})]
    with pytest.raises(ConfigError, match=r"r.yaml: data.train is missing.*--set data.train="):
        recipe_from_mapping({"data": {"kind": "text"}}, "r.yaml")  # no silent default: the shipped set is asked for
    assert recipe_from_mapping({}, "r.yaml", ["data.train=ctrltok:instructions"]).data.train == "ctrltok:instructions"


def test_eval_sources_are_read_like_train(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    a = _write(tmp_path, [GOOD] * 3)
    b = tmp_path / "held.json"
    b.write_text(json.dumps([json.loads(GOOD)] * 2))
    recipe = recipe_from_mapping({"data": {"train": str(a), "eval": [str(b), {"path": str(a), "weight": 0.5}]}})
    enc = build_examples(recipe, AutoTokenizer.from_pretrained(tiny_model_dir))
    assert len(enc.train) == 3 and len(enc.eval) == 5
