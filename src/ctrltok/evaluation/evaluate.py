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
  assistant message; the first ``n_generate`` such prompts are generated greedily with
  :func:`ctrltok.generation.generate.generate` (the checkpoint's stop and suppressed ids apply).
  ``any_stop_rate`` counts any stop id (a base model often stops at its own EOS instead).

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
import itertools
import math
import os
from typing import Any

from ctrltok.core.chat import ChatEncoder, ChatError
from ctrltok.core.config import DataConfig, Recipe
from ctrltok.core.conversation import to_conversation
from ctrltok.core.example import Example
from ctrltok.core.loss import LossModel, base_model
from ctrltok.core.loss import heldout_loss as batches_loss
from ctrltok.core.records import read_records, read_sources
from ctrltok.core.templates import get_template
from ctrltok.data.documents import is_held_out
from ctrltok.data.encode import make_rows, to_batch
from ctrltok.generation.generate import generate
from ctrltok.training.checkpoint import RunManifest
from ctrltok.training.setup import prepare_model


# -- held-out loss -------------------------------------------------------------------------
def pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
    return int(pad)


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
    batches = [to_batch(rows[i:i + rows_per_batch], pad, data.packing) for i in range(0, len(rows), rows_per_batch)]
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


# -- the metric function of a chat run -----------------------------------------------------
def evaluate_model(model, tokenizer, conversations: list[list[dict]], template: str, *,
                   data: DataConfig | None = None, loss_on: str | None = None, n_generate: int = 16,
                   max_new_tokens: int = 64, examples: list[Example] | None = None, batch_size: int = 8,
                   rows_per_batch: int = 4, sources: list[str] | None = None) -> dict:
    """Held-out loss and end-of-turn stop rate of a loaded model on ``conversations``.

    ``data``: the run's data section, whose ``max_length`` / ``overlong`` / ``packing`` make the
    rows of the loss and whose ``loss_on`` chooses the supervised turns (``loss_on`` overrides it);
    ``DataConfig()`` when ``None``. ``examples`` (already encoded, e.g. a recipe's held-out split
    from ``training.data.build_examples``) replace the encoding of ``conversations`` for the loss;
    the stop rate always uses ``conversations``. Examples without a supervised target are counted
    in ``skipped_no_targets``.
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
        loss = heldout_loss(model, usable, pad_id(tokenizer), data, rows_per_batch)
    else:
        loss = {"eval_loss": None, "eval_targets": 0, "max_length": data.max_length, "overlong": data.overlong,
                "truncated_examples": 0, "truncated_tokens": 0}
    loss.pop("ce_sum", None)
    out.update(loss)
    out["perplexity"] = math.exp(min(out["eval_loss"], 700.0)) if out["eval_loss"] is not None else None
    prompts = generation_prompts(conversations, n_generate) if n_generate > 0 else []
    results = generate(model, tokenizer, [p for _, p in prompts], template, max_new_tokens=max_new_tokens,
                       batch_size=batch_size) if prompts else []
    out.update(stop_counts(results, eot_id))
    out["max_new_tokens"] = max_new_tokens
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
