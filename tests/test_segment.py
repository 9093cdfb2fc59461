"""Sentence splitting: lossless by construction (property test), sensible on real text."""

from __future__ import annotations

import json

import pytest
from conftest import shared_data
from hypothesis import given, settings
from hypothesis import strategies as st

from ctrltok.core.segment import split_sentences


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Dr. Smith arrived. He sat down.\n", ["Dr. Smith arrived. ", "He sat down.\n"]),
        ("Use tools, e.g. Hammers. They help.", ["Use tools, e.g. Hammers. ", "They help."]),
        ("It cost 3.5 million. Then it fell.", ["It cost 3.5 million. ", "Then it fell."]),
        ("J. K. Rowling wrote it. Yes!  Really?", ["J. K. Rowling wrote it. ", "Yes!  ", "Really?"]),
        ("He said \"stop.\" Then left.", ["He said \"stop.\" ", "Then left."]),
        ("a title\nbody text. more text", ["a title\n", "body text. more text"]),
        ("J.D. Power says so. Right.", ["J.D. Power says so. ", "Right."]),
        ("  \n Hello. World", ["  \n Hello. ", "World"]),  # leading whitespace joins the first sentence
        ("Hello.  \n\n", ["Hello.  \n\n"]),  # trailing whitespace stays with its sentence
        ("   ", ["   "]),
        ("", []),
    ],
)
def test_examples(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected


def _check_rule(text: str, pieces: list[str]) -> None:
    assert "".join(pieces) == text
    assert all(pieces)
    if len(pieces) > 1:
        # every piece holds visible text; no piece after the first starts with whitespace
        assert all(not p.isspace() for p in pieces)
        assert all(not p[0].isspace() for p in pieces[1:])


SENTENCEY = st.text(alphabet=st.sampled_from(list("aAbZ .!?\n\t\"')…3,e.gDr") + ["\u2028", "\x0b", "é"]), max_size=300)


@given(st.one_of(st.text(max_size=300), SENTENCEY))
@settings(max_examples=400, deadline=None)
def test_concatenation_is_the_original_regex(text: str) -> None:
    _check_rule(text, split_sentences(text))


@given(SENTENCEY)
@settings(max_examples=60, deadline=None)
def test_concatenation_is_the_original_pysbd(text: str) -> None:
    _check_rule(text, split_sentences(text, method="pysbd"))


def test_unknown_method() -> None:
    with pytest.raises(ValueError, match="unknown sentence splitter 'nltk'"):
        split_sentences("x", method="nltk")


def test_real_c4_text_round_trips_and_splits() -> None:
    path = shared_data("c4_sample", "c4_demo.jsonl")
    docs = [json.loads(line)["text"] for line in path.open()][:100]
    n = 0
    for doc in docs:
        pieces = split_sentences(doc)
        _check_rule(doc, pieces)
        n += len(pieces)
    assert n > 5 * len(docs)  # web documents have many sentences; a no-op splitter fails here
