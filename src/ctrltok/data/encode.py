"""A recipe's `data` section -> encoded Examples, with every skip counted.

Dispatches on ``data.kind``:

* ``chat``: records with ``messages`` (also accepted: ``instruction``/``input``/``output`` as in
  Alpaca, ``prompt``/``response``, ``instruction``/``response``), encoded by :mod:`ctrltok.core.chat`;
* ``text``: plain next-token prediction over ``data.text_field``, special-token spellings in the
  text kept as text;
* ``labelled``: the output of ``ctrltok label`` (conditional training, :mod:`ctrltok.conditional.label`);
* ``epe``: a corpus plus a sidecar of reflections (:mod:`ctrltok.epe.reflection`).

Examples with no supervised token (for instance a reply cut off by truncation) are reported and
left out, never silently trained on.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Sequence, TypeVar

from ctrltok.conditional.encode import encode_labelled
from ctrltok.core.chat import ChatEncoder, ChatError
from ctrltok.core.config import DataConfig, Recipe
from ctrltok.core.conversation import to_conversation
from ctrltok.core.example import IGNORE, Example
from ctrltok.core.packing import Batch, collate, pack, pad_batch, slice_example
from ctrltok.core.records import RecordError, Skips, read_records
from ctrltok.core.tokens import CharterItem, load_charter
from ctrltok.epe.reflection import insert_reflection, read_annotated

T = TypeVar("T")


@dataclass
class Encoded:
    train: list[Example]
    eval: list[Example]
    skips: Skips = field(default_factory=Skips)
    records: int = 0


def heldout_indices(n: int, fraction: float, seed: int) -> set[int]:
    """The held-out split, the one draw every command uses: of ``n`` items (records as read, after
    ``data.limit``), a seeded shuffle's first ``round(n * fraction)`` (at least 1). Empty when
    ``fraction`` is 0 or there are fewer than 2 items (nothing would be left to train on)."""
    if fraction <= 0 or n < 2:
        return set()
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return set(order[:max(1, int(round(n * fraction)))])


def split_heldout(items: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """``(train, held out)`` by :func:`heldout_indices`, each in the original order."""
    held = heldout_indices(len(items), fraction, seed)
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def _encode_chats(pairs: list[tuple[str, dict]], tokenizer, data: DataConfig, skips: Skips) -> list[Example]:
    encoder = ChatEncoder(tokenizer, data.template, data.loss_on)
    convs, wheres = [], []
    for where, rec in pairs:
        try:
            msgs = to_conversation(rec, where)
        except ChatError as exc:
            if data.on_error == "skip":
                skips.add(str(exc).split(": ", 1)[-1].split(";")[0], where)
                continue
            raise
        convs.append(msgs)
        wheres.append(where)
    out: list[Example] = []
    for i in range(0, len(convs), 256):
        out.extend(encoder.encode_many(convs[i:i + 256], wheres[i:i + 256]))
    return out


def _encode_text(pairs: list[tuple[str, dict]], tokenizer, data: DataConfig, skips: Skips) -> list[Example]:
    texts, wheres = [], []
    for where, rec in pairs:
        text = rec.get(data.text_field)
        if not isinstance(text, str) or not text.strip():
            reason = f"field `{data.text_field}` missing or not text" if not isinstance(text, str) else "empty text"
            if data.on_error == "skip":
                skips.add(reason, where)
                continue
            raise RecordError(f"{where}: {reason}")
        texts.append(text)
        wheres.append(where)
    eos = tokenizer.eos_token_id
    enc = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"] if texts else []
    return [Example(ids + [eos], ids + [eos], source=w) for ids, w in zip(enc, wheres)]


def encode_records(pairs: list[tuple[str, dict]], tokenizer, recipe: Recipe, skips: Skips) -> list[Example]:
    data = recipe.data
    if data.kind == "chat":
        examples = _encode_chats(pairs, tokenizer, data, skips)
    elif data.kind == "text":
        examples = _encode_text(pairs, tokenizer, data, skips)
    elif data.kind == "labelled":
        aligned = tokenizer.convert_tokens_to_ids("<|aligned|>")
        misaligned = tokenizer.convert_tokens_to_ids("<|misaligned|>")
        supervise = recipe.conditional.supervise_control if recipe.conditional else True
        # No max_length here: over-long documents go to the packer, which applies data.overlong and
        # counts what it cuts. Each document ends with the EOS so the model learns where text ends.
        examples = [encode_labelled(rec, tokenizer, aligned, misaligned, None, supervise_control=supervise,
                                    eos_id=tokenizer.eos_token_id, source=where) for where, rec in pairs]
    else:
        raise ValueError(f"data.kind = {data.kind!r} is encoded by its own module")
    kept = []
    for ex in examples:
        if not any(lab != IGNORE for lab in ex.labels[1:]):
            skips.add("no supervised tokens", ex.source)
            continue
        kept.append(ex)
    return kept


def _epe_examples(recipe: Recipe, tokenizer, charter: list[CharterItem]) -> Encoded:
    """EPE data (``data.train`` corpus + ``epe.sidecar``): reflections inserted, holes and aliased
    positions set (:mod:`ctrltok.epe.reflection`). Evaluation documents come from ``data.eval``
    with ``epe.eval_sidecar`` when given, else the held-out split of the corpus."""
    data, epe = recipe.data, recipe.epe
    if epe is None or not epe.sidecar:
        raise ValueError(f"{recipe.source}: data.kind = epe needs epe.sidecar")
    skips = Skips()
    order = [c.id for c in charter]

    def encode(corpus: str, sidecar: str) -> list[Example]:
        docs = list(read_annotated(corpus, sidecar, order, epe.reflection_column, "id", data.text_field,
                                   data.on_error, skips))
        if data.limit:
            docs = docs[: data.limit]
        return [insert_reflection(d.text, d.annotations, tokenizer, order, reflection_weight=epe.reflection_weight,
                                  context_weight=epe.context_weight, source=d.where) for d in docs]

    train = encode(data.train, epe.sidecar)
    records = len(train)
    if data.eval:
        evals = encode(data.eval, epe.eval_sidecar or epe.sidecar)
    else:
        train, evals = split_heldout(train, data.eval_fraction, recipe.train.seed)
    return Encoded(train, evals, skips, records)


def build_examples(recipe: Recipe, tokenizer, charter: list[CharterItem] | None = None) -> Encoded:
    """Read and encode the train (and eval) data of a recipe; hold out `eval_fraction` if no eval set.

    ``charter``: the EPE charter the run already loaded (read from ``tokens.charter`` if not given).
    """
    data = recipe.data
    skips = Skips()
    if data.kind == "epe":
        return _epe_examples(recipe, tokenizer, charter if charter is not None else load_charter(recipe.tokens.charter))
    train_pairs = list(read_records(data.train, data.on_error, skips, data.text_field))
    if data.limit:
        train_pairs = train_pairs[: data.limit]
    n_records = len(train_pairs)
    if data.eval:
        eval_pairs = list(read_records(data.eval, data.on_error, skips, data.text_field))
    else:
        train_pairs, eval_pairs = split_heldout(train_pairs, data.eval_fraction, recipe.train.seed)
    train = encode_records(train_pairs, tokenizer, recipe, skips)
    evals = encode_records(eval_pairs, tokenizer, recipe, skips)
    if not train:
        raise RecordError(f"{data.train}: no usable training examples (skips: {skips.summary()})")
    return Encoded(train, evals, skips, n_records)


def make_rows(examples: list[Example], data: DataConfig) -> tuple[list[list[Example]], dict]:
    """Rows as the run trains on them: packed (``data.packing``) or one example per row, over-long
    examples handled by ``data.overlong`` and counted. Training and every held-out loss use this."""
    d = data
    if d.packing or d.overlong == "chunk":  # chunked rows are full rows by construction
        result = pack(examples, d.max_length, d.overlong)
        return result.rows, asdict(result.stats)
    rows, stats = [], {"examples": len(examples), "truncated_examples": 0, "truncated_tokens": 0}
    for ex in examples:
        if len(ex) > d.max_length:
            if d.overlong == "error":
                raise ValueError(f"{ex.source}: {len(ex)} tokens > data.max_length = {d.max_length}")
            stats["truncated_examples"] += 1
            stats["truncated_tokens"] += len(ex) - d.max_length
            ex = slice_example(ex, 0, d.max_length)
        rows.append([ex])
    stats["rows"] = len(rows)
    return rows, stats


def to_batch(rows: list[list[Example]], pad_id: int, packed: bool) -> Batch:
    if packed:
        return collate(rows, pad_id)
    return pad_batch([r[0] for r in rows], pad_id)
