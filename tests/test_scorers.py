"""Scorers: the default offline scorer, user callables, output validation, provenance."""

from __future__ import annotations

import math
import sys
import textwrap

import pytest

from ctrltok.conditional.scorers import (
    CallableScorer,
    ScorerError,
    get_scorer,
    validate_scores,
)


@pytest.fixture
def scorer_module(tmp_path, monkeypatch):
    """An importable module of user scorers, some of them broken on purpose."""
    (tmp_path / "my_scorers.py").write_text(textwrap.dedent('''
        __version__ = "1.2"
        def by_length(texts):
            return [min(1.0, len(t) / 100) for t in texts]
        def nan_on_bad(texts):
            return [float("nan") if "bad" in t else 0.1 for t in texts]
        def one_short(texts):
            return [0.1] * (len(texts) - 1)
        def strings(texts):
            return ["0.5" for t in texts]
        def too_big(texts):
            return [1.5 for t in texts]
        NOT_CALLABLE = 3
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_scorers"
    sys.modules.pop("my_scorers", None)


def test_profanity_is_default_and_separates_obvious_cases() -> None:
    import profanity_check

    scorer = get_scorer()
    texts = ["The weather is lovely today.", "You are a fucking idiot, shit."]
    scores = scorer.score(texts)
    assert scorer.name == "profanity"
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert scores[1] > 0.5 > scores[0]
    # same numbers as the package's own API (we skip its per-row loop, not its model)
    assert scores == pytest.approx(list(profanity_check.predict_prob(texts)), abs=1e-12)


def test_profanity_provenance() -> None:
    prov = get_scorer("profanity").provenance()
    assert prov["name"] == "profanity"
    assert prov["version"].startswith("alt-profanity-check ")
    assert len(prov["settings"]["model_sha256"]) == 16


def test_callable_scorer_by_name(scorer_module) -> None:
    scorer = get_scorer(f"{scorer_module}:by_length")
    assert scorer.score(["x" * 10, "y" * 50]) == [0.1, 0.5]
    prov = scorer.provenance()
    assert prov["name"] == "my_scorers:by_length"
    assert prov["version"] == "my_scorers 1.2"
    assert "source_sha256" in prov["settings"]
    assert scorer.default_threshold is None


@pytest.mark.parametrize(
    "fn, match",
    [
        ("nan_on_bad", r"'my_scorers:nan_on_bad' returned nan for doc.jsonl:7 segment 1"),
        ("one_short", r"'my_scorers:one_short' returned 1 scores for 2 texts"),
        ("strings", r"'my_scorers:strings' returned '0.5' \(str\) for doc.jsonl:7 segment 0"),
        ("too_big", r"returned 1.5 for doc.jsonl:7 segment 0; expected a float in \[0, 1\]"),
    ],
)
def test_invalid_output_names_scorer_and_record(scorer_module, fn: str, match: str) -> None:
    scorer = get_scorer(f"{scorer_module}:{fn}")
    with pytest.raises(ScorerError, match=match):
        scorer.score(["fine", "bad"], sources=["doc.jsonl:7 segment 0", "doc.jsonl:7 segment 1"])


def test_validate_scores_rejects_bool_inf_and_non_sequences() -> None:
    with pytest.raises(ScorerError, match="True"):
        validate_scores([True], 1, "s")
    with pytest.raises(ScorerError, match="inf"):
        validate_scores([math.inf], 1, "s")
    with pytest.raises(ScorerError, match="returned float"):
        validate_scores(0.3, 1, "s")
    assert validate_scores((0, 1), 2, "s") == [0.0, 1.0]


@pytest.mark.parametrize(
    "name, match",
    [
        ("nope", "unknown scorer 'nope'"),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("my_scorers:missing", "has no attribute 'missing'"),
        ("my_scorers:NOT_CALLABLE", "is not callable"),
        ("detoxify:huge", "detoxify model type 'huge' unknown"),
    ],
)
def test_bad_names(scorer_module, name: str, match: str) -> None:
    with pytest.raises(ScorerError, match=match):
        get_scorer(name)


def test_detoxify_never_downloads(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("CTRLTOK_DETOXIFY_CHECKPOINT", raising=False)
    with pytest.raises(ScorerError) as err:
        get_scorer("detoxify")
    msg = str(err.value)
    # either the package is missing, or its weights are: both say how to fix it
    assert ("pip install detoxify" in msg) or ("CTRLTOK_DETOXIFY_CHECKPOINT" in msg and "never downloads" in msg)


def test_instance_passes_through() -> None:
    s = CallableScorer("inline:fn", fn=lambda texts: [0.0] * len(texts))
    assert get_scorer(s) is s
    assert s.score(["a", "b"]) == [0.0, 0.0]
