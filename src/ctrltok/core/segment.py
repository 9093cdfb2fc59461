"""Sentence segmentation that loses nothing: the pieces concatenate back to the exact text.

Conditional training puts a control token in front of every sentence, so the labelled text is
``token + piece`` for each piece; if the pieces did not add up to the document, labelling would
silently edit the training data. :func:`split_sentences` guarantees
``"".join(split_sentences(t)) == t`` for every string ``t`` (a property test checks it on
arbitrary text).

Whitespace rule:

* whitespace *after* a sentence (spaces, newlines) belongs to that sentence;
* leading whitespace of the text belongs to the first sentence;
* so every piece holds some non-whitespace text, except when the whole text is whitespace
  (then it is one piece); the empty text gives no pieces.

Splitters (chosen by measurement, see ``bench/README.md``, section label_throughput):

* ``regex`` (default): a boundary is a line break, or ``.``/``!``/``?``/``…`` (plus closing
  quotes/brackets) followed by whitespace and a character that is not lower case, unless the
  word before the period is a known abbreviation (``Dr.``, ``e.g.``, ``Fig.``, ``Jan.``) or a
  single-letter initial (``J. Smith``). Decimals (``3.5``) never split: no whitespace follows.
* ``pysbd``: pysbd's English rules (more careful, about two orders of magnitude slower); its
  sentences are re-anchored in the original text so the same whitespace rule holds.

Usage::

    split_sentences("Dr. Smith arrived. He sat down.\\n")
    # -> ["Dr. Smith arrived. ", "He sat down.\\n"]
"""

from __future__ import annotations

import re
from collections.abc import Callable

# Words that end in a period without ending the sentence. Lower case, without the final dot.
# Deliberately small: each entry is a word that in running English text is followed by a capital
# far more often as a title/abbreviation than as a sentence end ("etc." and "Inc." are not here,
# they end sentences as often as not).
ABBREVIATIONS = frozenset(
    """
    mr mrs ms dr prof sr jr st mt rev hon gen col lt sgt capt cmdr gov sen rep pres supt
    vs v cf e.g i.e viz al approx ca no nos fig figs vol vols pp p ed eds ch sec art para
    dept univ assn bros mfg
    jan feb mar apr jun jul aug sep sept oct nov dec
    """.split()
)

_CANDIDATE = re.compile(r"[.!?…]+[\"'”’»)\]]*\s+|\n\s*")
_WORD_BEFORE = re.compile(r"(\S+)$")
_NOT_A_START = frozenset(",;:)]}%")
# "J.D. Power", "S.I. No. 83": dotted initialisms are part of a name far more often than a
# sentence end ("in the U.S. The ..." loses a split, which costs less than a cut inside a name).
_INITIALISM = re.compile(r"^(?:[a-z]\.)+[a-z]$")


def _regex_boundaries(text: str) -> list[int]:
    """Offsets where a new sentence starts (after the whitespace that closes the previous one)."""
    cuts: list[int] = []
    for m in _CANDIDATE.finditer(text):
        end = m.end()
        if end >= len(text):
            break  # trailing whitespace: stays with the last sentence
        chunk = m.group()
        if "\n" not in chunk:
            nxt = text[end]
            if nxt.islower() or nxt in _NOT_A_START:
                continue
            if chunk[0] == "." and _is_abbreviation(text, m.start()):
                continue
        cuts.append(end)
    return cuts


def _is_abbreviation(text: str, dot: int) -> bool:
    # Look at the word ending just before the period (up to 40 chars back is plenty).
    w = _WORD_BEFORE.search(text, max(0, dot - 40), dot)
    if w is None:
        return False
    word = w.group(1).lstrip("(\"'“‘[").lower()
    if len(word) == 1 and word.isalpha():
        return True  # an initial: "J. Smith", "Fig. 3 b. The" is rarer than initials
    return word in ABBREVIATIONS or _INITIALISM.match(word) is not None


def _pysbd_boundaries(text: str) -> list[int]:
    import pysbd

    seg = _pysbd_segmenter(pysbd)
    cuts: list[int] = []
    pos = 0
    for sent in seg.segment(text):
        core = sent.strip()
        if not core:
            continue
        at = text.find(core, pos)
        if at < 0:  # pysbd altered the text (it should not with clean=False); keep what we have
            continue
        if at > 0:
            cuts.append(at)
        pos = at + len(core)
    return cuts


_SEGMENTER = None


def _pysbd_segmenter(pysbd):  # one per process: building it compiles many regexes
    global _SEGMENTER
    if _SEGMENTER is None:
        _SEGMENTER = pysbd.Segmenter(language="en", clean=False)
    return _SEGMENTER


SPLITTERS: dict[str, Callable[[str], list[int]]] = {
    "regex": _regex_boundaries,
    "pysbd": _pysbd_boundaries,
}


def split_sentences(text: str, method: str = "regex") -> list[str]:
    """Split ``text`` into sentences that concatenate back to exactly ``text``.

    See the module docstring for the whitespace rule. ``method`` is ``"regex"`` (default) or
    ``"pysbd"``.
    """
    if method not in SPLITTERS:
        raise ValueError(f"unknown sentence splitter {method!r}; expected one of {sorted(SPLITTERS)}")
    if not text:
        return []
    return _cut(text, SPLITTERS[method](text))


def _cut(text: str, cuts: list[int]) -> list[str]:
    """Slice at ``cuts``, moving each cut past whitespace so whitespace trails its sentence,
    and dropping cuts that would leave a piece with no visible text."""
    pieces: list[str] = []
    start = 0
    n = len(text)
    for c in sorted(set(cuts)):
        while c < n and text[c].isspace():
            c += 1
        if c <= start or c >= n:
            continue
        piece = text[start:c]
        if piece.isspace():
            continue  # leading whitespace joins the next sentence
        pieces.append(piece)
        start = c
    pieces.append(text[start:])
    return pieces
