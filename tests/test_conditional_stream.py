"""Conditional training at scale: pre-scored records labelled without the scorer, raw text labelled
in the prepare pass equal to `ctrltok label` then encoded (1 and 2 workers), calibration, bad records."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
from pathlib import Path

import pytest

from ctrltok.cli.label import label_file
from ctrltok.conditional.encode import encode_labelled
from ctrltok.conditional.label import (
    SEED_DROP_FRACTION,
    SEED_THRESHOLD,
    LabelError,
    is_dropped,
    label_segments,
)
from ctrltok.conditional.stream import StreamLabeller
from ctrltok.core.config import ConfigError, recipe_from_mapping
from ctrltok.core.records import RecordError
from ctrltok.data.encode import build_examples
from ctrltok.data.prepare import prepare
from ctrltok.training.setup import prepare_tokenizer

ABOVE = math.nextafter(SEED_THRESHOLD, 1.0)
WORDS = "river stone light quick brown fox jumps over the lazy dog <|aligned|> again".split()

SCORER_SRC = '''
calls = []
def leading_number(texts):
    calls.append(len(texts))
    return [float(t.split()[0]) for t in texts]
def explode(texts):
    raise RuntimeError("the scorer was called")
'''


@pytest.fixture
def scorers(tmp_path, monkeypatch):
    d = tmp_path / "mods"
    d.mkdir()
    (d / "stream_scorers.py").write_text(SCORER_SRC)
    monkeypatch.syspath_prepend(str(d))
    yield d
    sys.modules.pop("stream_scorers", None)


def _write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _sentence(rng: random.Random, score: str) -> str:
    return f"{score} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) + rng.choice([". ", "! ", ".\n"])


def _raw(n: int, seed: int = 0) -> list[dict]:
    """Raw documents whose sentences start with their own score (read by `leading_number`)."""
    rng = random.Random(seed)
    vals = ["0.0001", repr(SEED_THRESHOLD), repr(ABOVE), "0.3", "0.9"]
    return [{"id": i, "text": "".join(_sentence(rng, rng.choice(vals)) for _ in range(rng.randint(1, 6)))}
            for i in range(n)]


def _prescored(n: int, seed: int = 0) -> list[dict]:
    """The detoxify-pile layout: sentences with their whitespace, one score each, and the other fields."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) + ". " for _ in range(rng.randint(1, 6))]
        scores = [rng.choice([0.0001, SEED_THRESHOLD, ABOVE, 0.02, 0.9]) for _ in texts]
        out.append({"texts": texts, "scores": scores, "avg_score": sum(scores) / len(scores), "num_sents": len(texts),
                    "meta": {"pile_set_name": "Pile-CC", "i": i}})
    return out


def _recipe(model: Path, train: Path, conditional: dict | None, **data) -> object:
    mapping = {"model": {"name": str(model)}, "tokens": {"presets": ["conditional"]}, "train": {"seed": 42},
               "data": {"kind": "labelled", "train": str(train), "eval_fraction": 0.1, **data}}
    if conditional is not None:
        mapping["conditional"] = conditional
    return recipe_from_mapping(mapping)


def _plain(examples) -> list:
    """Examples without their source (the labelled file and the raw file have different names)."""
    return [dataclasses.replace(ex, source="") for ex in examples]


def test_prescored_records_are_labelled_without_the_scorer(tmp_path, tiny_model_dir, scorers):
    records = _prescored(120)
    train = _write(tmp_path / "pile.jsonl", records)
    recipe = _recipe(tiny_model_dir, train, {"threshold": SEED_THRESHOLD, "drop_token_fraction": 0.2,
                                             "scorer": "stream_scorers:explode"})
    tokenizer, _ = prepare_tokenizer(recipe)
    aligned, misaligned = (tokenizer.convert_tokens_to_ids(t) for t in ("<|aligned|>", "<|misaligned|>"))
    expected = [encode_labelled({"segments": label_segments(r["texts"], r["scores"], SEED_THRESHOLD, 0.2, 42, i)},
                                tokenizer, aligned, misaligned, eos_id=tokenizer.eos_token_id, source=f"{train}:{i + 1}")
                for i, r in enumerate(records)]
    memory = build_examples(recipe, tokenizer)
    assert sorted(memory.train + memory.eval, key=lambda ex: int(ex.source.rsplit(":", 1)[1])) == expected
    data = prepare(recipe, tokenizer, tmp_path / "prepared", workers=2, shard_size=17)
    assert list(data.train) == memory.train and list(data.eval) == memory.eval
    # The seed's rule, segment by segment: threshold inclusive, keyed drops, the text unchanged.
    segs = [label_segments(r["texts"], r["scores"], SEED_THRESHOLD, 0.2, 42, i) for i, r in enumerate(records)]
    flat = [(i, j, s) for i, doc in enumerate(segs) for j, s in enumerate(doc)]
    assert all((s["control"] is None) == is_dropped(42, i, j, 0.2) for i, j, s in flat)
    assert {s["control"] for _, _, s in flat} == {"aligned", "misaligned", None}
    assert all(s["control"] in (None, "aligned" if s["score"] <= SEED_THRESHOLD else "misaligned") for _, _, s in flat)
    # The scorer the recipe names is recorded by provenance (built, never called).
    assert data.manifest["scorer"]["name"] == "stream_scorers:explode" and "version" in data.manifest["scorer"]


def test_seed_scorer_need_not_exist_for_prescored_records(tmp_path, tiny_model_dir):
    """Seed 001's recipe (detoxify, 0.00056, 0.01) on the pile layout: no detoxify needed."""
    train = _write(tmp_path / "pile.jsonl", _prescored(30))
    recipe = _recipe(tiny_model_dir, train, {"threshold": SEED_THRESHOLD, "drop_token_fraction": SEED_DROP_FRACTION,
                                             "scorer": "detoxify"})
    tokenizer, _ = prepare_tokenizer(recipe)
    data = prepare(recipe, tokenizer, tmp_path / "prepared")
    assert data.manifest["splits"]["train"]["documents"] + data.manifest["splits"]["eval"]["documents"] == 30
    assert data.manifest["scorer"]["name"] == "detoxify" and "unavailable" in data.manifest["scorer"]


@pytest.mark.parametrize("conditional,label_kwargs", [
    ({"threshold": SEED_THRESHOLD, "drop_token_fraction": 0.2}, {"threshold": SEED_THRESHOLD, "drop_fraction": 0.2}),
    ({"threshold": None, "misaligned_fraction": 0.3, "drop_token_fraction": 0.05},
     {"misaligned_fraction": 0.3, "drop_fraction": 0.05}),
], ids=["threshold", "calibrated"])
def test_raw_text_labelled_in_prepare_equals_label_then_encode(tmp_path, tiny_model_dir, scorers, conditional,
                                                              label_kwargs):
    raw = _write(tmp_path / "raw.jsonl", _raw(150))
    labelled = tmp_path / "labelled.jsonl"
    summary = label_file(str(raw), labelled, scorer="stream_scorers:leading_number", seed=42, quiet=True,
                         **label_kwargs)
    scorer = "stream_scorers:leading_number"
    via_label = _recipe(tiny_model_dir, labelled, {**conditional, "scorer": scorer})
    streamed = _recipe(tiny_model_dir, raw, {**conditional, "scorer": scorer})
    tokenizer, _ = prepare_tokenizer(streamed)
    expected = build_examples(via_label, tokenizer)
    got = build_examples(streamed, tokenizer)
    assert _plain(got.train) == _plain(expected.train) and _plain(got.eval) == _plain(expected.eval)
    assert got.train[0].source.startswith(str(raw))
    for workers in (1, 2):
        data = prepare(streamed, tokenizer, tmp_path / f"prepared-{workers}", workers=workers, shard_size=23)
        assert _plain(data.train) == _plain(expected.train) and _plain(data.eval) == _plain(expected.eval)
    assert data.manifest["scorer"]["name"] == scorer
    # The labeller's threshold is the one `ctrltok label` chose (absolute, or calibrated on the same sample).
    labeller = StreamLabeller(streamed.conditional, streamed.data, 42)
    assert labeller.threshold() == summary["threshold"]
    if summary["calibration"]:
        assert labeller.calibration == summary["calibration"]
    assert summary["misaligned"] and summary["aligned"] and summary["unprefixed"]


def test_the_scorer_is_built_once_and_called_once_per_batch(tmp_path, scorers, tiny_model_dir):
    train = _write(tmp_path / "raw.jsonl", _raw(20))
    recipe = _recipe(tiny_model_dir, train, {"threshold": 0.5, "scorer": "stream_scorers:leading_number"})
    labeller = StreamLabeller(recipe.conditional, recipe.data, 42)
    items = [(i, (f"raw.jsonl:{i + 1}", r)) for i, r in enumerate(_raw(20))]
    first = labeller.label(items[:10])
    scorer = labeller.scorer
    labeller.label(items[10:])
    assert labeller.scorer is scorer
    import stream_scorers

    assert len(stream_scorers.calls) == 2 and stream_scorers.calls[0] == sum(len(s) for s in first)
    # Segments and records mix in one call: labelled records pass as they are, in their place.
    given = [{"text": "x. ", "score": 0.1, "control": "aligned"}]
    out = labeller.label([(0, ("a", {"segments": given})), (1, ("b", {"text": "0.9 bad. 0.1 good."})),
                          (2, ("c", {"texts": ["y. "], "scores": [0.7]}))])
    assert out[0] == given
    assert [s["control"] for s in out[1]] == ["misaligned", "aligned"]
    assert out[2] == [{"text": "y. ", "score": 0.7, "control": "misaligned"}]


BAD = [
    ({"text": "   "}, "empty document", "empty or whitespace"),
    ({"id": 1}, "missing text field", "no field 'text'"),
    ({"texts": ["a. ", "b. "], "scores": [0.1]}, "scores do not match texts", "one score per sentence"),
    ({"texts": ["a. "], "scores": ["high"]}, "bad score", "not a finite number"),
    ({"texts": ["a. "], "scores": [float("nan")]}, "bad score", "not a finite number"),
    ({"texts": "a. b.", "scores": [0.1]}, "bad texts", "list of strings"),
    ({"segments": [{"control": "aligned"}]}, "bad segments", "segment 0"),
]


@pytest.mark.parametrize("record,reason,message", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_records_name_their_line_or_are_counted(tmp_path, tiny_model_dir, record, reason, message):
    good = {"texts": ["fine. "], "scores": [0.0]}
    train = _write(tmp_path / "in.jsonl", [good, record, good])
    conditional = {"threshold": SEED_THRESHOLD, "scorer": "profanity"}
    recipe = _recipe(tiny_model_dir, train, conditional, eval_fraction=0.0)
    tokenizer, _ = prepare_tokenizer(recipe)
    with pytest.raises((LabelError, RecordError), match=rf"in\.jsonl:2.*{message}"):
        build_examples(recipe, tokenizer)
    skipping = _recipe(tiny_model_dir, train, conditional, eval_fraction=0.0, on_error="skip")
    encoded = build_examples(skipping, tokenizer)
    assert encoded.skips.summary() == {reason: 1} and len(encoded.train) == 2
    data = prepare(skipping, tokenizer, tmp_path / "prepared")
    assert data.manifest["skips"] == {reason: 1} and data.manifest["skip_places"][reason] == [f"{train}:2"]


def test_labelling_needs_a_conditional_section_and_one_threshold_rule(tmp_path, tiny_model_dir):
    train = _write(tmp_path / "raw.jsonl", [{"text": "Some text."}])
    tokenizer, _ = prepare_tokenizer(_recipe(tiny_model_dir, train, None))
    with pytest.raises(ConfigError, match="raw.jsonl:1: .*needs a `conditional` section"):
        build_examples(_recipe(tiny_model_dir, train, None, eval_fraction=0.0), tokenizer)
    both = _recipe(tiny_model_dir, train, {"threshold": 0.5, "misaligned_fraction": 0.1}, eval_fraction=0.0)
    with pytest.raises(ConfigError, match="threshold: null"):
        build_examples(both, tokenizer)
    # Already labelled records need neither.
    labelled = _write(tmp_path / "l.jsonl", [{"segments": [{"text": "Hi. ", "control": "aligned"}]}])
    assert len(build_examples(_recipe(tiny_model_dir, labelled, None, eval_fraction=0.0), tokenizer).train) == 1
