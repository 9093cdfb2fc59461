"""Evaluation of a chat model with control tokens: held-out loss on supervised tokens and the
end-of-turn stop rate, before and after training (what ``ctrltok eval`` reports for a chat run).

Two numbers tell whether an SFT run taught its end-of-turn token (LIMA's ``<EOT>``, OASST's
``<|endoftext|>``):

* ``eval_loss``: mean cross-entropy per supervised target on held-out conversations, computed
  exactly as training computes its own eval loss: ``chat.ChatEncoder`` labels, the rows of
  :func:`ctrltok.data.encode.make_rows` under the run's ``data.max_length``, ``data.overlong``
  and ``data.packing`` (``DataConfig()``'s defaults for a model without a recipe), and the one
  forward of :mod:`ctrltok.core.loss`. So it is comparable with the training curve. Packing does
  not change it (tested against a per-conversation hand computation).
* ``eot_stop_rate``: the share of generations that end with the template's end-of-turn token
  within ``max_new_tokens``. The prompt of a conversation is every message before its last
  assistant message; the first ``n_generate`` such prompts are answered by
  :func:`ctrltok.generation.generate.generate_ids`, the function behind ``ctrltok generate``, so
  both count stops alike (batched, sorted by length, the template's shared prefix encoded once per
  batch) with the run's decoding (the recipe's ``decoding`` section, saved in the checkpoint's
  generation_config; the checkpoint's stop and suppressed ids apply).
  ``any_stop_rate`` counts any stop id (a base model often stops at its own EOS instead).

A third count says the control tokens kept their meaning at the boundary with user text:
``role_tokens`` (:func:`role_token_counts`) counts messages that spell a control token
(``<|assistant|>``, ``<EOT>``, ...) and how many of those spellings became the token's id, as
training encodes the conversations and as generation encodes the prompts (both must be 0), and
the control ids the model emitted inside its replies.

Everything here takes objects, so a model that is not on disk evaluates too (the demo's "before":
the base model with the new tokens added by ``training.setup.prepare_model``)::

    before = evaluate_model(base, tokenizer, conversations, "eot", data=recipe.data)
    after = evaluate_model(trained, tokenizer, conversations, "eot", data=recipe.data)
    compare(before, after)          # {metric: {"before", "after", "delta"}}

Loading checkpoints by name, reading ``--data`` and printing tables is the command layer's
(:mod:`ctrltok.cli.eval`).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import os
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

from ctrltok.core.chat import ChatEncoder, ChatError, get_encoder
from ctrltok.core.config import DataConfig, DecodingConfig, Recipe
from ctrltok.core.conversation import to_conversation
from ctrltok.core.decoding import resolve_decoding
from ctrltok.core.example import Example
from ctrltok.core.loss import LossModel, base_model
from ctrltok.core.loss import heldout_loss as batches_loss
from ctrltok.core.records import read_records, read_sources
from ctrltok.core.templates import get_template
from ctrltok.core.tokens import FILLER_FORMAT, padding_id
from ctrltok.data.documents import is_held_out
from ctrltok.data.encode import make_rows, to_batch
from ctrltok.generation.generate import generate_ids, prompt_ids
from ctrltok.training.checkpoint import RunManifest
from ctrltok.training.setup import prepare_model


# -- held-out loss -------------------------------------------------------------------------
def heldout_loss(model, examples: list[Example], pad: int, data: DataConfig | None = None,
                 rows_per_batch: int = 4) -> dict:
    """Mean cross-entropy over every supervised target of ``examples``, in the rows training makes.

    ``data`` (the run's data section; ``DataConfig()`` when ``None``) decides the rows:
    ``max_length``, ``overlong`` (truncate / split / error) and ``packing``, by
    :func:`ctrltok.data.encode.make_rows`; what was cut or split is counted in the result.
    The forward is :func:`ctrltok.core.loss.heldout_loss`'s (LM head on the supervised positions only).
    """
    data = data or DataConfig()
    rows, stats = make_rows(examples, data)
    impl = getattr(base_model(model).config, "_attn_implementation", None) or "sdpa"
    device = next(model.parameters()).device
    batches = [to_batch(rows[i:i + rows_per_batch], pad, data.packed) for i in range(0, len(rows), rows_per_batch)]
    out = batches_loss(LossModel(model), batches, impl, device)
    out.update({"max_length": data.max_length, "overlong": data.overlong,
                "truncated_examples": stats.get("truncated_examples", 0),
                "truncated_tokens": stats.get("truncated_tokens", 0)})
    if stats.get("split_examples"):
        out["split_examples"] = stats["split_examples"]
    return out


# -- stop rate -----------------------------------------------------------------------------
def generation_prompts(conversations: list[list[dict]], n: int) -> list[tuple[int, list[dict]]]:
    """``(index, messages before the last assistant message)`` of the first ``n`` conversations that
    have an assistant message after at least one other message."""
    out = []
    for i, conv in enumerate(conversations):
        if len(out) >= n:
            break
        last = max((k for k, m in enumerate(conv) if m.get("role") == "assistant"), default=0)
        if last > 0:
            out.append((i, conv[:last]))
    return out


def stop_counts(results: list[dict], eot_id: int | None) -> dict:
    """Counts and shares of generations that ended with the end-of-turn id / any stop id."""
    n = len(results)
    eot = sum(1 for r in results if r["stopped"] and r["ids"] and eot_id is not None and r["ids"][-1] == eot_id)
    any_stop = sum(1 for r in results if r["stopped"])
    return {"n_generated": n, "eot_stops": eot, "any_stops": any_stop,
            "eot_stop_rate": eot / n if n else None, "any_stop_rate": any_stop / n if n else None,
            "mean_new_tokens": sum(r["n_tokens"] for r in results) / n if n else None}


# -- forged control tokens -----------------------------------------------------------------
def control_spellings(tokenizer) -> dict[str, int]:
    """``{text: id}`` of every special token a user could spell (role markup, end of turn, the
    added control tokens); vocabulary filler rows are left out."""
    filler = FILLER_FORMAT.split("{")[0]
    return {t.content: i for i, t in tokenizer.added_tokens_decoder.items()
            if t.special and not t.content.startswith(filler)}


def forged_tokens(conversations: list[list[dict]], encode: Callable[[list[dict]], list[int]],
                  spellings: dict[str, int]) -> dict:
    """How often message text spells a control token, and how many of those spellings became the
    token's id in ``encode(conversation)``: must be 0 for ctrltok's encoder.

    A conversation's forged count is its control ids minus those of the same conversation with every
    spelling replaced by ``_``: the template's own markup does not depend on the content, so the
    difference is what the content produced.
    """
    if not spellings:
        return {"spelled": 0, "forged": 0, "by_token": {}}
    pattern = re.compile("|".join(re.escape(s) for s in sorted(spellings, key=len, reverse=True)))
    ids = set(spellings.values())
    spelled, forged, by_token = 0, 0, Counter()
    for conv in conversations:
        hits = [h for m in conv for h in pattern.findall(m["content"])]
        if not hits:
            continue
        spelled += len(hits)
        by_token.update(hits)
        plain = [{**m, "content": pattern.sub("_", m["content"])} for m in conv]
        forged += sum(t in ids for t in encode(conv)) - sum(t in ids for t in encode(plain))
    return {"spelled": spelled, "forged": forged, "by_token": dict(by_token)}


def role_token_counts(tokenizer, conversations: list[list[dict]], prompts: list[list[dict]], template: str,
                      loss_on: str, results: list[dict]) -> dict:
    """Control tokens where the text put them: spellings in the held-out messages and how many became
    control ids when encoded as training encodes them (``forged_in_training``) and as generation
    prompts (``forged_in_prompts``), both must be 0; and control ids the model emitted inside its
    replies before their stop (``emitted_in_replies``: the model writing turn markup itself)."""
    spellings = control_spellings(tokenizer)
    encoder = get_encoder(tokenizer, template, loss_on)
    training = forged_tokens(conversations, lambda c: encoder.encode(c).input_ids, spellings)
    inference = forged_tokens(prompts, lambda c: prompt_ids(tokenizer, [c], template)[0], spellings)
    ids = set(spellings.values())
    emitted = Counter(tokenizer.convert_ids_to_tokens(t) for r in results
                      for t in (r["ids"][:-1] if r["stopped"] else r["ids"]) if t in ids)
    return {"spelled_in_messages": training["spelled"], "forged_in_training": training["forged"],
            "spelled_in_prompts": inference["spelled"], "forged_in_prompts": inference["forged"],
            "spellings": training["by_token"], "emitted_in_replies": sum(emitted.values()),
            "emitted": dict(emitted)}


# -- the metric function of a chat run -----------------------------------------------------
def evaluate_model(model, tokenizer, conversations: list[list[dict]], template: str, *,
                   data: DataConfig | None = None, loss_on: str | None = None, n_generate: int = 16,
                   max_new_tokens: int | None = None, examples: list[Example] | None = None, batch_size: int = 32,
                   rows_per_batch: int = 4, sources: list[str] | None = None,
                   decoding: DecodingConfig | None = None, seed: int = 0) -> dict:
    """Held-out loss, end-of-turn stop rate and forged role tokens of a loaded model on ``conversations``.

    ``data``: the run's data section, whose ``max_length`` / ``overlong`` / ``packing`` make the
    rows of the loss and whose ``loss_on`` chooses the supervised turns (``loss_on`` overrides it);
    ``DataConfig()`` when ``None``. ``examples`` (already encoded, e.g. a recipe's held-out split
    from ``ctrltok.data.encode.build_examples``) replace the encoding of ``conversations`` for the loss;
    the stop rate always uses ``conversations``. Examples without a supervised target are counted
    in ``skipped_no_targets``. The first ``n_generate`` prompts are answered with ``decoding``
    (default: the model's generation_config, i.e. its recipe's decoding; ``max_new_tokens``
    overrides its length), ``batch_size`` sequences per generate call; ``role_tokens`` counts
    control-token spellings and what became of them (:func:`role_token_counts`).
    """
    data = data or DataConfig()
    loss_on = loss_on or data.loss_on
    tmpl = get_template(template, tokenizer)
    eot_id = tmpl.end_of_turn_id(tokenizer)
    if eot_id is None:
        raise ValueError(f"template {template!r} ends turns with {tmpl.end_of_turn!r}, which the tokenizer lacks; "
                         f"add the token preset(s) {list(tmpl.presets)} first (training.setup.prepare_model does)")
    if examples is None:
        encoder = ChatEncoder(tokenizer, tmpl, loss_on)
        examples = encoder.encode_many(conversations, sources) if conversations else []
    usable = [ex for ex in examples if ex.n_supervised > 0]
    out: dict[str, Any] = {"template": template, "end_of_turn": tmpl.end_of_turn, "loss_on": loss_on,
                           "conversations": len(conversations), "examples": len(examples),
                           "skipped_no_targets": len(examples) - len(usable)}
    if usable:
        loss = heldout_loss(model, usable, padding_id(tokenizer), data, rows_per_batch)
    else:
        loss = {"eval_loss": None, "eval_targets": 0, "max_length": data.max_length, "overlong": data.overlong,
                "truncated_examples": 0, "truncated_tokens": 0}
    loss.pop("ce_sum", None)
    out.update(loss)
    out["perplexity"] = math.exp(min(out["eval_loss"], 700.0)) if out["eval_loss"] is not None else None
    prompts = generation_prompts(conversations, n_generate) if n_generate > 0 else []
    decoding = resolve_decoding(model, decoding, max_new_tokens=max_new_tokens)
    results = generate_ids(model, tokenizer, prompt_ids(tokenizer, [p for _, p in prompts], template), template,
                           seed=seed, batch_size=batch_size, decoding=decoding, share_prefix=True)
    out.update(stop_counts(results, eot_id))
    out["max_new_tokens"] = decoding.max_new_tokens
    out["decoding"] = dataclasses.asdict(decoding)
    out["role_tokens"] = role_token_counts(tokenizer, conversations, [p for _, p in prompts], template, loss_on,
                                           results)
    out["generations"] = [
        {"index": i, "prompt": p[-1]["content"], "text": r["text"], "n_tokens": r["n_tokens"],
         "stopped": r["stopped"], "ended_with_eot": bool(r["stopped"] and r["ids"][-1] == eot_id)}
        for (i, p), r in zip(prompts, results)
    ]
    return out


# -- which conversations -------------------------------------------------------------------
def load_conversations(data: str | os.PathLike, limit: int | None = None, on_error: str = "raise",
                       text_field: str = "text") -> tuple[list[list[dict]], list[str]]:
    """Chat records (any layout :func:`ctrltok.core.conversation.to_conversation` reads) from a
    file, folder, ``ctrltok:<resource>`` or datasets name, with where each came from; the first
    ``limit`` of them. With ``on_error = "skip"`` records that are no conversation are left out."""
    convs, wheres = [], []
    source = str(data) if isinstance(data, os.PathLike) else data  # a path, or a source spec (list, mapping)
    for where, rec in read_records(source, on_error, None, text_field):
        if limit is not None and len(convs) >= limit:
            break
        try:
            convs.append(to_conversation(rec, where))
        except ChatError:
            if on_error != "skip":
                raise
            continue
        wheres.append(where)
    return convs, wheres


def heldout_conversations(manifest: RunManifest, limit: int | None = None) -> tuple[list[list[dict]], list[str], str]:
    """The held-out conversations of the run ``manifest`` records: its ``data.eval`` set, or the
    records of ``data.train`` that :func:`ctrltok.data.encode.split_heldout` held out of training
    (the same records as read, the same ``data.limit``, the same seed). Without a recipe in the
    manifest: the split of the default recipe (the shipped set). Returns
    ``(conversations, sources, description)``; ``limit`` keeps the first ones.
    """
    recipe = manifest.recipe() or Recipe()
    data = recipe.data
    if data.eval:
        convs, wheres = load_conversations(data.eval, limit, data.on_error, data.text_field)
        return convs, wheres, str(data.eval)
    where = manifest.path or "the default recipe"
    if data.kind != "chat":
        raise ValueError(f"{where}: the run trained on data.kind = {data.kind!r}, not chats; "
                         "pass --data with held-out chats")
    # The same records as training read (the mixture, the seed, data.limit), the same keyed draw.
    records = itertools.islice(read_sources(data, recipe.train.seed), data.limit) if data.limit else \
        read_sources(data, recipe.train.seed)
    held = [pair for i, pair in enumerate(records) if is_held_out(i, data.eval_fraction, recipe.train.seed)]
    if not held:
        raise ValueError(f"{where}: the run held out no data (data.eval unset, data.eval_fraction = "
                         f"{data.eval_fraction}); pass --data with held-out chats")
    # Records that fail to become a conversation are dropped after the split, as the encoder does
    # under on_error = skip, so the rest are exactly the held-out examples of training.
    convs, wheres = [], []
    for src, rec in held:
        try:
            convs.append(to_conversation(rec, src))  # an OASST tree: its best thread
        except ChatError:
            if data.on_error != "skip":
                raise
            continue
        wheres.append(src)
    if limit is not None:
        convs, wheres = convs[:limit], wheres[:limit]
    return convs, wheres, f"{data.train} (held-out {data.eval_fraction:g})"


def prepare_base(recipe: Recipe | None, name: str | os.PathLike, template: str):
    """``(model, tokenizer)``: the base model ``name`` given the same control tokens as a run (the
    "before"), made by :func:`ctrltok.training.setup.prepare_model` from the run's recipe (the
    default recipe when ``None``) with its model swapped for ``name``."""
    recipe = copy.deepcopy(recipe) if recipe is not None else Recipe()
    recipe.model.name = str(name)
    recipe.data.template = template
    prepared = prepare_model(recipe)
    return prepared.model.eval(), prepared.tokenizer


# -- comparing two results -----------------------------------------------------------------
def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def compare(before: dict, after: dict) -> dict:
    """``{metric: {"before", "after", "delta"}}`` for every number either result holds."""
    keys = [k for k in before if _numeric(before[k])] + [k for k in after if _numeric(after[k]) and k not in before]
    out = {}
    for k in keys:
        b, a = before.get(k), after.get(k)
        if not (_numeric(b) or _numeric(a)):
            continue
        out[k] = {"before": b, "after": a, "delta": a - b if _numeric(a) and _numeric(b) else None}
    return out
