"""Conditional training data: the seed's rule, determinism, resume, injection safety, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ctrltok.cli.label import label_file
from ctrltok.conditional.encode import encode_labelled
from ctrltok.conditional.label import (
    ALIGNED,
    MISALIGNED,
    LabelError,
    calibrate_threshold,
    is_dropped,
    label_segments,
    labelled_text,
)
from ctrltok.conditional.scorers import ScorerError
from ctrltok.core.example import IGNORE
from ctrltok.evaluation.conditional import conditional_eval
from ctrltok.generation.generate import generate_batch

SEED_T = 0.00056
ABOVE = math.nextafter(SEED_T, 1.0)

# A scorer whose verdict is written in the text: each sentence starts with its own score.
SCORER_SRC = '''
import os
def leading_number(texts):
    return [float(t.split()[0]) for t in texts]
def nan_on_bad(texts):
    return [float("nan") if "bad" in t else 0.0 for t in texts]
def dies_once(texts):
    flag = os.environ["KILL_FLAG"]
    if any("KILL" in t for t in texts) and os.path.exists(flag):
        os.remove(flag)
        os._exit(9)  # like a SIGKILL: no cleanup, no exception handlers
    return [0.0 if "KILL" in t else float(t.split()[0]) for t in texts]
'''


@pytest.fixture
def scorers(tmp_path, monkeypatch):
    d = tmp_path / "mods"
    d.mkdir()
    (d / "cond_scorers.py").write_text(SCORER_SRC)
    monkeypatch.syspath_prepend(str(d))
    yield d
    sys.modules.pop("cond_scorers", None)


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def corpus(n_docs: int, n_sents: int) -> list[dict]:
    # scores cycle through values on both sides of the seed threshold
    vals = ["0.0001", "0.00056", repr(ABOVE), "0.3", "0.9"]
    return [{"id": d, "text": " ".join(f"{vals[(d + s) % 5]} word{s}." for s in range(n_sents))}
            for d in range(n_docs)]


# ---------------------------------------------------------------- the rule


def test_threshold_boundary_is_exact() -> None:
    segs = label_segments(["a", "b", "c"], [SEED_T, ABOVE, 0.0], SEED_T, 0.0, seed=0, doc_index=0)
    assert [s["control"] for s in segs] == ["aligned", "misaligned", "aligned"]
    assert labelled_text(segs) == f"{ALIGNED}a{MISALIGNED}b{ALIGNED}c"


def test_threshold_boundary_end_to_end(tmp_path, scorers) -> None:
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": f"{SEED_T} at. {ABOVE!r} above. 0.0 below."}])
    summary = label_file(src, tmp_path / "o.jsonl", scorer="cond_scorers:leading_number", threshold=SEED_T,
                         drop_fraction=0.0, quiet=True)
    rec = json.loads((tmp_path / "o.jsonl").read_text())
    assert [s["control"] for s in rec["segments"]] == ["aligned", "misaligned", "aligned"]
    assert "".join(s["text"] for s in rec["segments"]) == rec["text"]
    assert rec["labelled_text"] == f"{ALIGNED}{SEED_T} at. {MISALIGNED}{ABOVE!r} above. {ALIGNED}0.0 below."
    assert (summary["aligned"], summary["misaligned"], summary["unprefixed"]) == (2, 1, 0)
    assert summary["scorer"]["name"] == "cond_scorers:leading_number"
    side = json.loads((tmp_path / "o.jsonl.summary.json").read_text())
    assert side["threshold"] == SEED_T and side["scorer"] == summary["scorer"]


def test_drop_fraction_statistics() -> None:
    n = 200_000
    dropped = sum(is_dropped(0, d, s, 0.01) for d in range(n // 20) for s in range(20))
    assert abs(dropped / n - 0.01) < 0.001  # binomial sd is 0.00022
    assert not any(is_dropped(0, d, 0, 0.0) for d in range(1000))
    assert all(is_dropped(0, d, 0, 1.0) for d in range(1000))
    # another seed picks other segments
    a = [is_dropped(0, d, 0, 0.5) for d in range(200)]
    assert a != [is_dropped(1, d, 0, 0.5) for d in range(200)]


def test_rerun_and_processes_identical(tmp_path, scorers) -> None:
    src = write_jsonl(tmp_path / "d.jsonl", corpus(1000, 20))
    kw = dict(scorer="cond_scorers:leading_number", threshold=SEED_T, drop_fraction=0.01, seed=3, quiet=True)
    s1 = label_file(src, tmp_path / "a.jsonl", processes=1, **kw)
    label_file(src, tmp_path / "b.jsonl", processes=1, **kw)
    s2 = label_file(src, tmp_path / "c.jsonl", processes=2, shard_size=130, chunk_size=7, **kw)
    a = (tmp_path / "a.jsonl").read_bytes()
    assert a == (tmp_path / "b.jsonl").read_bytes() == (tmp_path / "c.jsonl").read_bytes()
    assert s1["segments"] == 20_000
    assert abs(s1["unprefixed"] / s1["segments"] - 0.01) < 0.003
    assert {k: s1[k] for k in ("aligned", "misaligned", "unprefixed")} == {k: s2[k] for k in ("aligned", "misaligned", "unprefixed")}
    # the prefix follows the score except for dropped segments
    for line in a.splitlines()[:50]:
        for seg in json.loads(line)["segments"]:
            if seg["control"] is not None:
                assert seg["control"] == ("aligned" if seg["score"] <= SEED_T else "misaligned")


def test_resume_after_kill(tmp_path, scorers) -> None:
    docs = corpus(300, 4)
    docs[217]["text"] = "KILL here. 0.9 after."
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    flag = tmp_path / "kill_once"
    flag.write_text("")
    out = tmp_path / "o.jsonl"
    args = dict(scorer="cond_scorers:dies_once", threshold=SEED_T, drop_fraction=0.05, seed=1, shard_size=50,
                chunk_size=8, quiet=True)
    code = (f"import sys; sys.path.insert(0, {str(scorers)!r}); from ctrltok.cli.label import label_file; "
            f"label_file({str(src)!r}, {str(out)!r}, **{args!r})")
    env = {**__import__("os").environ, "KILL_FLAG": str(flag)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    parts = Path(f"{out}.parts")
    done = sorted(p.name for p in parts.glob("shard-*.done"))
    assert done == [f"shard-{k:06d}.done" for k in range(4)]  # shards 0-3 complete, shard 4 was in progress
    assert [p.name for p in parts.glob("*.tmp")] == ["shard-000004.jsonl.tmp"]
    assert not out.exists()

    __import__("os").environ["KILL_FLAG"] = str(flag)  # flag is gone: the resumed run does not die
    try:
        summary = label_file(src, out, **args)
        clean = label_file(src, tmp_path / "clean.jsonl", **args)
    finally:
        del __import__("os").environ["KILL_FLAG"]
    assert summary["resumed_at_record"] == 200
    assert out.read_bytes() == (tmp_path / "clean.jsonl").read_bytes()
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert ids == list(range(300))  # nothing lost, nothing duplicated
    assert summary["segments"] == clean["segments"] and not parts.exists()


def test_resume_refuses_other_settings(tmp_path, scorers) -> None:
    src = write_jsonl(tmp_path / "d.jsonl", corpus(3, 2))
    parts = tmp_path / "o.jsonl.parts"
    parts.mkdir()
    (parts / "run.json").write_text(json.dumps({"shard_size": 1000, "settings": {"seed": 99}, "info": {}}))
    with pytest.raises(LabelError, match="unfinished run with different"):
        label_file(src, tmp_path / "o.jsonl", scorer="cond_scorers:leading_number", threshold=SEED_T, quiet=True)


def test_label_records_resumes_only_over_the_same_input(tmp_path, scorers) -> None:
    """The library's contract, for any caller: an unfinished run compares its input's fingerprint;
    another file, or the same file edited in place, is refused naming it; the same input resumes."""
    from ctrltok.conditional.label import label_records
    from ctrltok.conditional.scorers import get_scorer

    scorer = get_scorer("cond_scorers:leading_number")
    a = write_jsonl(tmp_path / "a.jsonl", corpus(6, 2) + [{"body": "no text field"}])
    b = write_jsonl(tmp_path / "b.jsonl", corpus(7, 2))
    out = tmp_path / "o.jsonl"
    kw = dict(threshold=SEED_T, shard_size=2, chunk_size=2)
    with pytest.raises(LabelError, match=r"a.jsonl:7"):
        label_records(str(a), out, scorer, **kw)  # three shards of two documents committed, then stopped
    with pytest.raises(LabelError, match=rf"unfinished run read other inputs: input {a} -> {b}; rerun with the same"):
        label_records(str(b), out, scorer, **kw)
    original = a.read_bytes()
    a.write_bytes(original.replace(b"word0", b"WORD0"))  # the same path and size, other contents
    with pytest.raises(LabelError, match=rf"input {a}: contents changed \("):
        label_records(str(a), out, scorer, **kw)
    a.write_bytes(original)
    summary = label_records(str(a), out, scorer, on_error="skip", **kw)  # on_error is not a setting: resumes
    assert summary["resumed_at_record"] == 6 and summary["documents"] == 6 and summary["skipped_total"] == 1
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == list(range(6))


# ---------------------------------------------------------------- calibration


def test_calibration() -> None:
    scores = [i / 100 for i in range(100)]
    thr, achieved = calibrate_threshold(scores, 0.1)
    assert sum(s > thr for s in scores) == 10 and achieved == 0.1
    thr, achieved = calibrate_threshold(scores, 0.0)
    assert thr == 0.99 and achieved == 0.0
    thr, achieved = calibrate_threshold(scores, 1.0)
    assert achieved == 1.0
    with pytest.raises(LabelError):
        calibrate_threshold(scores, 1.5)


def test_calibrated_label_file_reports_calibration(tmp_path, scorers) -> None:
    src = write_jsonl(tmp_path / "d.jsonl", corpus(40, 5))
    s = label_file(src, tmp_path / "o.jsonl", scorer="cond_scorers:leading_number", misaligned_fraction=0.4,
                   drop_fraction=0.0, quiet=True)
    assert s["threshold_source"] == "calibrated"
    assert s["calibration"]["sample_segments"] == 200 and s["calibration"]["target_fraction"] == 0.4
    assert s["fraction_misaligned"] == pytest.approx(0.4)


def test_no_threshold_for_callable_scorer(tmp_path, scorers) -> None:
    src = write_jsonl(tmp_path / "d.jsonl", corpus(2, 2))
    with pytest.raises(LabelError, match="no default threshold"):
        label_file(src, tmp_path / "o.jsonl", scorer="cond_scorers:leading_number", quiet=True)


# ---------------------------------------------------------------- bad input


def test_bad_input_names_file_and_line(tmp_path, scorers) -> None:
    kw = dict(scorer="cond_scorers:leading_number", threshold=SEED_T, quiet=True)
    cases = {
        "malformed": (['{"text": "0.1 a."}', '{"text": "0.1 b."}', '{"text": oops}'], ":3: malformed JSON"),
        "empty": (['{"text": "0.1 a."}', '{"text": "  "}'], ":2: field 'text' is empty"),
        "nontext": (['{"text": 5}'], ":1: field 'text' holds int"),
        "missing": (['{"body": "x"}'], ":1: no field 'text'"),
    }
    for name, (lines, match) in cases.items():
        src = write_jsonl(tmp_path / f"{name}.jsonl", lines)
        with pytest.raises((LabelError, ValueError), match=f"{name}.jsonl{match}"):
            label_file(src, tmp_path / f"{name}.out.jsonl", **kw)


def test_bad_input_counted_when_skipping(tmp_path, scorers) -> None:
    lines = ['{"id": 0, "text": "0.1 a."}', '{"text": oops}', '{"text": ""}', '{"text": 5}', "[1]",
             '{"id": 5, "text": "0.9 b."}', '{"text": "bad"}']
    src = write_jsonl(tmp_path / "d.jsonl", lines)
    s = label_file(src, tmp_path / "o.jsonl", scorer="cond_scorers:leading_number", threshold=SEED_T,
                   on_error="skip", quiet=True)
    # this scorer crashes on "bad" (not a number): that document alone is skipped
    assert s["documents"] == 2 and s["skipped"]["scorer error"] == 1
    assert s["skipped"]["malformed JSON"] == 1
    assert s["skipped"]["empty document"] == 1
    assert s["skipped"]["non-text field"] == 1
    assert s["skipped"]["not an object"] == 1


def test_scorer_nan_names_record(tmp_path, scorers) -> None:
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine. ok."}, {"text": "fine. Very bad one."}, {"text": "x."}])
    with pytest.raises(ScorerError, match=r"'cond_scorers:nan_on_bad' returned nan for .*d.jsonl:2 segment 1"):
        label_file(src, tmp_path / "o.jsonl", scorer="cond_scorers:nan_on_bad", threshold=0.5, quiet=True)
    s = label_file(src, tmp_path / "o.jsonl", scorer="cond_scorers:nan_on_bad", threshold=0.5, on_error="skip",
                   quiet=True)
    assert s["documents"] == 2 and s["skipped"] == {"scorer error": 1}
    assert s["skip_examples"]["scorer error"] == [f"{src}:2"]


# ---------------------------------------------------------------- encoding


@pytest.fixture
def tok(smol_tokenizer):
    smol_tokenizer.add_special_tokens({"additional_special_tokens": [ALIGNED, MISALIGNED]})
    return smol_tokenizer


def test_encode_matches_tokenizer_on_plain_text(tok) -> None:
    a, m = tok.convert_tokens_to_ids([ALIGNED, MISALIGNED])
    segs = label_segments(["Hello there. ", "Bad words!\n", "More text. ", "End."], [0.0, 0.9, 0.0, 0.0],
                          0.5, 0.0, 0, 0)
    segs[2]["control"] = None  # a dropped segment runs on from the previous one
    rec = {"segments": segs, "labelled_text": labelled_text(segs)}
    ex = encode_labelled(rec, tok, a, m)
    assert ex.input_ids == tok(rec["labelled_text"], add_special_tokens=False)["input_ids"]
    assert ex.labels == ex.input_ids  # plain NTP, control tokens supervised
    ex2 = encode_labelled(rec, tok, a, m, supervise_control=False, eos_id=0, max_length=5)
    assert len(ex2) == 5 and ex2.labels[0] == IGNORE and ex2.input_ids[0] == a


def test_injection_never_forges_control_ids(tok) -> None:
    a, m = tok.convert_tokens_to_ids([ALIGNED, MISALIGNED])
    text = f"Ignore this {ALIGNED} and {MISALIGNED}. {ALIGNED}Sneaky start.{MISALIGNED}"
    from ctrltok.core.segment import split_sentences

    pieces = split_sentences(text)
    segs = label_segments(pieces, [0.0] * len(pieces), 0.5, 0.0, 0, 0)
    ex = encode_labelled({"segments": segs}, tok, a, m)
    positions = [i for i, t in enumerate(ex.input_ids) if t in (a, m)]
    assert len(positions) == len(pieces) == 2  # only the inserted prefixes
    assert all(ex.input_ids[i] == a for i in positions)
    assert tok.decode([t for t in ex.input_ids if t not in (a, m)]) == text  # the literal text survives as text


def test_encode_rejects_unlabelled(tok) -> None:
    with pytest.raises(LabelError, match="x.jsonl:4: no 'segments'"):
        encode_labelled({"text": "x"}, tok, 1, 2, source="x.jsonl:4")


# ---------------------------------------------------------------- evaluation


def _control_loving_model(tiny_llama, tok):
    """A tiny model whose argmax is almost always a control token (so suppression is tested)."""
    model = tiny_llama(len(tok), tie=False)
    a, m = tok.convert_tokens_to_ids([ALIGNED, MISALIGNED])
    with torch.no_grad():
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[a, 0] = 200.0
        model.lm_head.weight[m, 0] = -200.0
    return model, a, m


@pytest.mark.slow  # builds a 49k-vocabulary tiny Llama and samples 3 conditions
def test_generation_suppresses_control_tokens(tiny_llama, tok) -> None:
    model, a, m = _control_loving_model(tiny_llama, tok)
    free = generate_batch(model, [[5, 6], [7]], n=2, max_new_tokens=4, temperature=1.0, top_p=1.0,
                          pad_id=tok.pad_token_id, batch_size=8, seed=0)
    assert sum(t in (a, m) for g in free for t in g) > 0  # without suppression it leaks
    result = conditional_eval(model, tok, "profanity", ["Hello there", "You are"], n=2, max_new_tokens=3, seed=0)
    assert result["leaked_total"] == 0
    for cond in ("unconditional", "aligned", "misaligned"):
        row = result["conditions"][cond]["all"]
        assert row["samples"] == 6 and row["leaked_control_tokens"] == 0
        assert result["conditions"][cond]["empty"]["samples"] == 2
        assert result["conditions"][cond]["prompts"]["samples"] == 4
        assert 0.0 <= row["mean_score"] <= 1.0
    assert "misaligned" in result["table"] and "leaked" in result["table"]
    assert set(result["direction"]) == {"aligned<unconditional", "unconditional<misaligned"}


def test_eval_needs_control_tokens(smol_tokenizer) -> None:
    with pytest.raises(LabelError, match="has no"):
        conditional_eval(None, smol_tokenizer, "profanity", [], n=1, max_new_tokens=2)


def test_parquet_and_dataset_inputs_match_jsonl(tmp_path, scorers) -> None:
    import datasets

    docs = corpus(20, 3)
    kw = dict(scorer="cond_scorers:leading_number", threshold=SEED_T, drop_fraction=0.2, seed=5, quiet=True)
    label_file(write_jsonl(tmp_path / "d.jsonl", docs), tmp_path / "a.jsonl", **kw)
    ds = datasets.Dataset.from_list(docs)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    label_file(tmp_path / "d.parquet", tmp_path / "b.jsonl", **kw)
    label_file(ds, tmp_path / "c.jsonl", **kw)
    a = (tmp_path / "a.jsonl").read_text()
    assert a == (tmp_path / "b.jsonl").read_text() == (tmp_path / "c.jsonl").read_text()
