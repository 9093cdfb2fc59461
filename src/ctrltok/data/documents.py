"""One input record -> its documents (Examples) or a drop reason, per ``data.kind``; reading a
recipe's inputs (:func:`read_inputs`); and the held-out split. The one reading and encoding that both
the in-memory path (:func:`ctrltok.data.encode.build_examples`) and ``ctrltok prepare`` run, so
prepared data equals the in-memory encoding by construction.

Kinds: ``chat`` (any layout :mod:`ctrltok.core.conversation` reads, injection-safe
:class:`~ctrltok.core.chat.ChatEncoder`), ``text`` (``data.text_field`` plus the EOS, special-token
spellings kept as text), ``labelled`` (``ctrltok label`` output, or pre-scored / raw records labelled
here by :mod:`ctrltok.conditional.stream`; then :mod:`ctrltok.conditional.encode`),
``epe`` (an annotated document, :mod:`ctrltok.epe.reflection`). A document with no supervised
token is dropped with that reason, never trained on.

The held-out split is a keyed draw per input: input ``i`` (counted as read, after ``data.limit``)
is held out when ``u(seed, i) < eval_fraction``, ``u`` a 64-bit mix of the two numbers. It needs
no count of the inputs, so a streaming pass over 100B tokens routes each document as it comes, and
every command that re-creates the split (evaluation) gets the same one.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from ctrltok.conditional.encode import encode_labelled
from ctrltok.conditional.label import ALIGNED, MISALIGNED, LabelError
from ctrltok.conditional.stream import StreamLabeller
from ctrltok.core.chat import ChatEncoder, ChatError
from ctrltok.core.config import Recipe
from ctrltok.core.conversation import to_conversations
from ctrltok.core.example import IGNORE, Example
from ctrltok.core.records import RecordError, Skips, read_sources
from ctrltok.core.tokens import CharterItem
from ctrltok.epe.reflection import insert_reflection, read_annotated

_MASK = (1 << 64) - 1


def mix64(seed: int, index: int) -> int:
    """SplitMix64 of ``(seed, index)``: a well-spread 64-bit value, the same on every machine."""
    z = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def is_held_out(index: int, fraction: float, seed: int) -> bool:
    """Whether input ``index`` belongs to the held-out split (see the module docstring)."""
    return fraction > 0 and mix64(seed, index) < fraction * 2.0**64


def read_inputs(recipe: Recipe, which: str, skips: Skips, order: Sequence[str] | None = None) -> Iterator[Any]:
    """The inputs of ``data.train`` (``which="train"``) or ``data.eval``, streamed as read, cut at
    ``data.limit`` for train: what :class:`DocumentEncoder` takes. ``epe`` reads each document
    joined with its annotations (``epe.sidecar``; for eval ``epe.eval_sidecar``, else the same
    sidecar; ``order``: the charter's ids); every other kind, the records of the sources."""
    data = recipe.data
    if data.kind == "epe":
        epe = recipe.epe
        sidecar = epe.sidecar if which == "train" else (epe.eval_sidecar or epe.sidecar)
        items: Iterable[Any] = read_annotated(data.train if which == "train" else data.eval, sidecar, order,
                                              epe.reflection_column, "id", data.text_field, data.on_error, skips)
    else:
        items = read_sources(data, recipe.train.seed, skips, which=which)
    return itertools.islice(items, data.limit) if data.limit and which == "train" else iter(items)


# A drop: (reason, where). An encoded input: the documents it gives (one, or several for a tree).
Encoded = tuple[str, str] | list[Example]


class DocumentEncoder:
    """Encodes inputs of one recipe; ``encode(items)`` keeps the order, one result per input.

    ``items`` are ``(index, item)`` pairs: ``index`` the input's place as read (after
    ``data.limit``; the key of the labelled drop draw), ``item`` a ``(where, record)`` pair, or an
    :class:`~ctrltok.epe.reflection.AnnotatedDocument` for ``epe``. ``data.on_error: raise`` raises
    on a bad record (naming its place); ``skip`` returns a drop with the reason.
    """

    def __init__(self, recipe: Recipe, tokenizer: Any, charter: Sequence[CharterItem] | None = None):
        self.recipe = recipe
        self.data = recipe.data
        self.tokenizer = tokenizer
        self.kind = recipe.data.kind
        if self.kind == "chat":
            self.chat = ChatEncoder(tokenizer, self.data.template, self.data.loss_on)
        elif self.kind == "labelled":
            self.aligned = tokenizer.convert_tokens_to_ids(ALIGNED)
            self.misaligned = tokenizer.convert_tokens_to_ids(MISALIGNED)
            self.supervise = recipe.conditional.supervise_control if recipe.conditional else True
            self.labeller = StreamLabeller(recipe.conditional, self.data, recipe.train.seed)
        elif self.kind == "epe":
            if charter is None:
                raise ValueError("an epe DocumentEncoder needs the charter the run loaded")
            self.order = [c.id for c in charter]
        elif self.kind != "text":
            raise ValueError(f"data.kind = {self.kind!r}; expected chat, text, labelled or epe")

    def _bad(self, reason: str, where: str) -> tuple[str, str]:
        if self.data.on_error != "skip":
            raise RecordError(f"{where}: {reason}")
        return reason, where

    def encode(self, indexed: Sequence[tuple[int, Any]]) -> list[Encoded]:
        items = [item for _, item in indexed]
        if self.kind == "chat":
            out = self._chats(items)
        elif self.kind == "text":
            out = self._texts(items)
        elif self.kind == "labelled":
            out = self._labelled(indexed)
        else:
            epe = self.recipe.epe
            out = [[insert_reflection(d.text, d.annotations, self.tokenizer, self.order,
                                      reflection_weight=epe.reflection_weight, context_weight=epe.context_weight,
                                      source=d.where)] for d in items]
        return [self._supervised(r) for r in out]

    def _supervised(self, result: Encoded) -> Encoded:
        if isinstance(result, tuple):
            return result
        kept = [ex for ex in result if any(lab != IGNORE for lab in ex.labels[1:])]
        if not kept:
            return "no supervised tokens", result[0].source if result else ""
        return kept

    def _labelled(self, indexed: Sequence[tuple[int, tuple[str, dict]]]) -> list[Encoded]:
        """Records labelled (or taken as labelled) by the :class:`StreamLabeller`, then encoded with
        the control ids inserted from their segments."""
        out: list[Encoded] = []
        for (_, (where, _)), segments in zip(indexed, self.labeller.label(indexed)):
            if isinstance(segments, tuple):
                out.append(segments)
                continue
            try:
                out.append([encode_labelled({"segments": segments}, self.tokenizer, self.aligned, self.misaligned, None,
                                            supervise_control=self.supervise, eos_id=self.tokenizer.eos_token_id,
                                            source=where)])
            except LabelError:
                if self.data.on_error != "skip":
                    raise
                out.append(("bad segments", where))
        return out

    def _chats(self, items: Sequence[tuple[str, dict]]) -> list[Encoded]:
        out: list[Encoded | None] = []
        convs, wheres, slots = [], [], []
        for where, rec in items:
            try:
                found = to_conversations(rec, where, self.data.oasst_paths)  # an OASST tree may hold several
                for msgs in found:
                    self.chat.check_turns(msgs, where)
            except ChatError as exc:
                if self.data.on_error != "skip":
                    raise
                out.append((exc.reason, where))
                continue
            slots.append((len(out), len(found)))
            out.append([])
            for j, msgs in enumerate(found):
                convs.append(msgs)
                wheres.append(where if len(found) == 1 else f"{where} (thread {j + 1})")
        encoded = iter(self.chat.encode_many(convs, wheres) if convs else [])
        for slot, n in slots:
            out[slot] = [next(encoded) for _ in range(n)]
        return out

    def _texts(self, items: Sequence[tuple[str, dict]]) -> list[Encoded]:
        field = self.data.text_field
        out: list[Encoded | None] = []
        texts, wheres, slots = [], [], []
        for where, rec in items:
            text = rec.get(field)
            if not isinstance(text, str) or not text.strip():
                out.append(self._bad(f"field `{field}` missing or not text" if not isinstance(text, str)
                                     else "empty text", where))
                continue
            texts.append(text)
            wheres.append(where)
            slots.append(len(out))
            out.append(None)
        eos = self.tokenizer.eos_token_id
        encoded = self.tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"] if texts else []
        for slot, ids, where in zip(slots, encoded, wheres):
            out[slot] = [Example(ids + [eos], ids + [eos], source=where)]
        return out

