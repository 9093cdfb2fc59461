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
from dataclasses import dataclass, field

from ctrltok.core.chat import ChatEncoder, ChatError
from ctrltok.core.config import DataConfig, Recipe
from ctrltok.core.example import IGNORE, Example
from ctrltok.core.records import RecordError, Skips, read_records


@dataclass
class Encoded:
    train: list[Example]
    eval: list[Example]
    skips: Skips = field(default_factory=Skips)
    records: int = 0


def to_messages(rec: dict, where: str) -> list[dict]:
    if "messages" in rec:
        return rec["messages"]
    if isinstance(rec.get("conversations"), list) and all(isinstance(c, str) for c in rec["conversations"]):
        # LIMA's layout: utterances alternating user / assistant.
        roles = ("user", "assistant")
        return [{"role": roles[i % 2], "content": c} for i, c in enumerate(rec["conversations"])]
    if "instruction" in rec and ("output" in rec or "response" in rec):
        prompt = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": rec.get("output", rec.get("response"))}]
    if "prompt" in rec and "response" in rec:
        return [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["response"]}]
    raise ChatError(f"{where}: missing field `messages` (or instruction/output, prompt/response); "
                    f"found fields {sorted(rec)}")


def _encode_chats(pairs: list[tuple[str, dict]], tokenizer, data: DataConfig, skips: Skips) -> list[Example]:
    encoder = ChatEncoder(tokenizer, data.template, data.loss_on)
    convs, wheres = [], []
    for where, rec in pairs:
        try:
            msgs = to_messages(rec, where)
            from ctrltok.core.chat import validate_messages

            validate_messages(msgs, where)
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
        from ctrltok.conditional.encode import encode_labelled

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


def build_examples(recipe: Recipe, tokenizer) -> Encoded:
    """Read and encode the train (and eval) data of a recipe; hold out `eval_fraction` if no eval set."""
    data = recipe.data
    skips = Skips()
    if data.kind == "epe":
        from ctrltok.epe.reflection import build_epe_examples

        return build_epe_examples(recipe, tokenizer)
    train_pairs = list(read_records(data.train, data.on_error, skips, data.text_field))
    if data.limit:
        train_pairs = train_pairs[: data.limit]
    n_records = len(train_pairs)
    if data.eval:
        eval_pairs = list(read_records(data.eval, data.on_error, skips, data.text_field))
    elif data.eval_fraction > 0 and len(train_pairs) > 1:
        order = list(range(len(train_pairs)))
        random.Random(recipe.train.seed).shuffle(order)
        k = max(1, int(round(len(order) * data.eval_fraction)))
        held = set(order[:k])
        eval_pairs = [p for i, p in enumerate(train_pairs) if i in held]
        train_pairs = [p for i, p in enumerate(train_pairs) if i not in held]
    else:
        eval_pairs = []
    train = encode_records(train_pairs, tokenizer, recipe, skips)
    evals = encode_records(eval_pairs, tokenizer, recipe, skips)
    if not train:
        raise RecordError(f"{data.train}: no usable training examples (skips: {skips.summary()})")
    return Encoded(train, evals, skips, n_records)
