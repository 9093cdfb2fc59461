"""Evaluation of an EPE checkpoint (seed 000): reflection loss, charter F1, the equivalence
check; and reading the constitution head on a chat.

Everything here takes objects (model, head, tokenizer, :class:`~ctrltok.core.config.Recipe`);
``ctrltok eval --epe`` and ``ctrltok constitution`` (:mod:`ctrltok.cli.eval`) load a checkpoint,
read its recipe through :class:`~ctrltok.training.checkpoint.RunManifest`, call these and print::

    recipe = RunManifest.read("runs/epe-cpu").recipe()
    result = evaluate_epe(model, head, tokenizer, recipe)              # the run's own held-out documents
    result = evaluate_epe(model, head, tokenizer, recipe, "docs.jsonl", "side.jsonl")   # every annotated document

The held-out set is re-created exactly as training held it out: the recipe goes through
:func:`ctrltok.data.encode.build_examples`, whose ``eval`` part is the same seeded split (or
``data.eval`` with ``epe.eval_sidecar``). With ``corpus`` and ``sidecar`` given, every document
of that corpus with its annotations is evaluated instead.

Each document is run alone in its own row (over-long documents are truncated to ``max_length``
and counted, as the packer's default ``overlong = truncate`` does; the equivalence check needs each
document from its start) through the one forward of :mod:`ctrltok.core.loss`,
with the explicit mask of ``attention.build_mask``: the hole and the aliased positions come from
the Example's structure, never from transformers' inference of documents from ``position_ids``.

What is reported:

* ``reflection_loss``: mean cross-entropy (unweighted, nats per token) over the targets whose
  token lies inside a reflection region (``<assistant>`` + the reflection tokens; ``<assistant>``
  itself is not a target by default, so these are the reflection tokens).
  ``context_loss``: the same over every other supervised target (the document's text, including
  the resume target ``r_last -> c0``).
* ``micro_f1`` / ``macro_f1``: the constitution head's ``sigmoid`` at each ``<assistant>``
  position, predicted positive when ``>= 0.5``, against the sidecar's charter labels. Micro pools
  true/false positives and false negatives over all labels; macro averages the per-label F1 over
  the labels that occur in the gold set *or* in the predictions (``macro_labels``): a label that
  is neither annotated nor predicted anywhere has no defined F1 and is left out rather than
  counted as 0 or 1. With no positive anywhere both are ``None``.
* ``baseline``: the same F1 of the majority baseline, which predicts at every position the label
  set most frequent among the *training* documents' ``<assistant>`` positions (the evaluated
  documents' own, when a corpus and sidecar are given instead of the run's split: an easier
  baseline to be measured against, since it has seen the answers). ``beats_baseline`` says the
  head's micro-F1 is above it.
* ``equivalence``: for every document, the largest absolute difference between the logits of its
  context tokens with the reflection inserted and the logits of the plain document (no reflection,
  positions ``0..n-1``, plain causal mask), separately before the first reflection (``pre``) and
  after it (``post``). It passes when both are ``< 1e-4`` (:data:`EQUIVALENCE_ATOL`) for every
  document: what makes inference without reflections equivalent to training holds for the trained
  weights, not only for a random model (``tests/test_reflection.py``).

The plain document is the Example's context tokens: by the snapping rule
(``reflection.insert_reflection``) they are exactly the tokens of the unannotated text.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ctrltok.core.chat import encode_chat
from ctrltok.core.config import DataConfig, Recipe
from ctrltok.core.example import IGNORE, Example
from ctrltok.core.heads import ConstitutionHead
from ctrltok.core.loss import base_model, hidden_states, logits
from ctrltok.core.packing import collate, slice_example
from ctrltok.core.tokens import padding_id
from ctrltok.data.encode import build_examples
from ctrltok.epe.reflection import charter_ids, insert_reflection, read_annotated

EQUIVALENCE_ATOL = 1e-4
THRESHOLD = 0.5


# -- charter F1 ------------------------------------------------------------------------------
def charter_f1(pred: Any, gold: Any, labels: Sequence[str] | None = None) -> dict:
    """Micro and macro F1 of multi-hot predictions ``pred [K, C]`` against ``gold [K, C]``.

    Macro averages over the labels that are positive somewhere in ``gold`` or ``pred`` (see the
    module docstring); ``labels`` names the columns in the returned ``macro_labels`` and
    ``per_label``. F1 is ``2 TP / (2 TP + FP + FN)``; ``None`` where that is 0 / 0.
    """
    p = torch.as_tensor(pred).bool()
    g = torch.as_tensor(gold).bool()
    if p.shape != g.shape or p.dim() != 2:
        raise ValueError(f"charter_f1: predictions {tuple(p.shape)} and gold {tuple(g.shape)} must both be [K, C]")
    names = list(labels) if labels is not None else [str(i) for i in range(p.shape[1])]
    if len(names) != p.shape[1]:
        raise ValueError(f"charter_f1: {len(names)} label names for {p.shape[1]} columns")
    tp = (p & g).sum(0)
    fp = (p & ~g).sum(0)
    fn = (~p & g).sum(0)
    per_label = {}
    for j, name in enumerate(names):
        denom = int(2 * tp[j] + fp[j] + fn[j])
        if denom:
            per_label[name] = {"f1": 2 * int(tp[j]) / denom, "tp": int(tp[j]), "fp": int(fp[j]), "fn": int(fn[j]),
                               "support": int(tp[j] + fn[j])}
    TP, FP, FN = int(tp.sum()), int(fp.sum()), int(fn.sum())
    micro = 2 * TP / (2 * TP + FP + FN) if (2 * TP + FP + FN) else None
    macro = sum(v["f1"] for v in per_label.values()) / len(per_label) if per_label else None
    return {
        "micro_f1": micro,
        "macro_f1": macro,
        "micro_precision": TP / (TP + FP) if TP + FP else None,
        "micro_recall": TP / (TP + FN) if TP + FN else None,
        "macro_labels": list(per_label),
        "per_label": per_label,
        "positions": int(p.shape[0]),
    }


def majority_baseline(reference: Sequence[Sequence[float]], gold: Any, labels: Sequence[str]) -> dict:
    """Charter F1 (:func:`charter_f1`) of predicting, at every position of ``gold [K, C]``, the label
    set that is most frequent among the ``reference`` positions (ties: the first seen);
    ``label_set`` names it."""
    sets = Counter(tuple(int(v > 0.5) for v in row) for row in reference)
    mode = max(sets, key=sets.__getitem__) if sets else tuple(0 for _ in labels)
    g = torch.as_tensor(gold).bool().reshape(-1, len(labels))
    pred = torch.tensor([mode], dtype=torch.bool).expand(g.shape[0], -1)
    f1 = charter_f1(pred, g, labels)
    return {"label_set": [name for name, v in zip(labels, mode) if v], "micro_f1": f1["micro_f1"],
            "macro_f1": f1["macro_f1"], "reference_positions": sum(sets.values())}


# -- structure of one example ----------------------------------------------------------------
def reflection_regions(example: Example) -> list[tuple[int, int]]:
    """``[start, end)`` of each reflection region (``<assistant>`` + reflection) of ``example``.

    A region starts at a head position; it ends where the hole that hides it from the rest of the
    document starts (``blocked`` span ``(end, n, start, end)``), or at the end of the example when
    no such span exists (a reflection that closes the document, or a truncated one).
    """
    ends = {k0: k1 for _, _, k0, k1 in example.blocked}
    return [(h, ends.get(h, len(example))) for h in example.head_positions]


def _inside(example: Example) -> list[bool]:
    flags = [False] * len(example)
    for s, e in reflection_regions(example):
        for i in range(s, e):
            flags[i] = True
    return flags


def plain_document(example: Example) -> Example:
    """The same document without its reflections: context tokens, positions ``0..n-1``, LM labels."""
    inside = _inside(example)
    ids = [t for t, r in zip(example.input_ids, inside) if not r]
    return Example(input_ids=ids, labels=list(ids), source=f"{example.source} (plain)")


# -- evaluation ------------------------------------------------------------------------------
def epe_documents(recipe: Recipe | None, tokenizer: Any, corpus: str | None = None, sidecar: str | None = None,
                  order: list[str] | None = None) -> tuple[list[Example], str, list[list[float]] | None]:
    """``(examples, description, training label rows)``: the run's held-out documents (training's
    own split, by :func:`ctrltok.data.encode.build_examples`) with the charter labels of every
    training position (the majority baseline's reference), or every annotated document of
    ``corpus`` + ``sidecar`` (those with at least one reflection) and ``None``. ``order``: the
    charter ids in head order."""
    if (corpus is None) != (sidecar is None):
        raise ValueError("evaluate_epe: give both `corpus` and `sidecar` (--data and --sidecar), or neither "
                         "to use the run's own held-out documents")
    if corpus is not None:
        order = order if order is not None else charter_ids(recipe.tokens.charter if recipe is not None else None)
        column = recipe.epe.reflection_column if recipe is not None and recipe.epe else "reflection_3p"
        text_field = recipe.data.text_field if recipe is not None else "text"
        docs = read_annotated(corpus, sidecar, order, column, "id", text_field)
        examples = [insert_reflection(d.text, d.annotations, tokenizer, order, source=d.where) for d in docs]
        return [ex for ex in examples if ex.head_positions], f"{corpus} + {sidecar}", None
    if recipe is None:
        raise ValueError("no recipe (ctrltok.json `recipe_values`) to re-create the held-out split from; "
                         "pass corpus and sidecar (--data and --sidecar)")
    if recipe.data.kind != "epe":
        raise ValueError(f"{recipe.source}: data.kind = {recipe.data.kind!r}, not 'epe'; "
                         "this checkpoint was not trained with reflections")
    encoded = build_examples(recipe, tokenizer)
    held = encoded.eval
    if not held:
        raise ValueError(f"{recipe.source}: the run held out no documents (data.eval unset, "
                         f"data.eval_fraction = {recipe.data.eval_fraction}); pass corpus and sidecar")
    where = recipe.data.eval or f"{recipe.data.train} (held-out {recipe.data.eval_fraction:g}, seed {recipe.train.seed})"
    return held, str(where), [list(row) for ex in encoded.train for row in ex.head_targets]


def evaluate_epe(model: Any, head: ConstitutionHead, tokenizer: Any, recipe: Recipe | None,
                 corpus: str | None = None, sidecar: str | None = None, max_length: int | None = None,
                 impl: str | None = None) -> dict:
    """Evaluate an EPE model and its head on the run's held-out documents (or ``corpus`` + ``sidecar``).

    ``recipe`` is the run's (``RunManifest.recipe()``; ``None`` without one, then ``corpus`` and
    ``sidecar`` are needed). ``max_length`` defaults to the run's ``data.max_length``
    (``DataConfig``'s 512 without a recipe). Returns the metrics described in the module docstring
    plus ``data`` (what was evaluated) and ``max_length``.
    """
    order = charter_ids(recipe.tokens.charter if recipe is not None else None)
    if order != list(head.labels):
        raise ValueError(f"the constitution head's labels ({len(head.labels)}) differ from the charter of the run "
                         f"({len(order)}); was tokens.charter changed after training?")
    examples, described, reference = epe_documents(recipe, tokenizer, corpus, sidecar, order)
    if max_length is None:
        max_length = recipe.data.max_length if recipe is not None else DataConfig().max_length
    result = evaluate_examples(model, head, examples, padding_id(tokenizer), max_length=max_length, impl=impl,
                               reference=reference)
    return {"data": described, "max_length": max_length, **result}


@torch.no_grad()
def evaluate_examples(model: Any, head: Any, examples: Sequence[Example], pad_id: int,
                      max_length: int | None = None, impl: str | None = None,
                      reference: Sequence[Sequence[float]] | None = None) -> dict:
    """The metrics of :func:`evaluate_epe` for a loaded model, head and encoded EPE examples;
    ``reference``: the training positions' label rows for the majority baseline (``None``: the
    evaluated positions' own)."""
    impl = impl or base_model(model).config._attn_implementation
    head = head.to(next(model.parameters()).device)
    lm_head = base_model(model).get_output_embeddings()
    refl_sum = ctx_sum = bce_sum = 0.0
    refl_n = ctx_n = 0
    probs, gold, docs = [], [], []
    truncated = 0
    for ex in examples:
        if max_length is not None and len(ex) > max_length:
            ex = slice_example(ex, 0, max_length)
            truncated += 1
        inside = _inside(ex)
        batch = collate([[ex]], pad_id)
        hidden = hidden_states(model, batch, impl)[0]
        full = lm_head(hidden).float()
        targets = batch.targets[0].to(full.device)
        sup = targets != IGNORE
        ce = F.cross_entropy(full[sup], targets[sup], reduction="none")
        # targets[t] is token t+1: it is a reflection target when token t+1 lies in a region.
        in_region = torch.tensor(inside[1:] + [False], device=targets.device)[sup]
        refl_sum += float(ce[in_region].sum())
        ctx_sum += float(ce[~in_region].sum())
        refl_n += int(in_region.sum())
        ctx_n += int((~in_region).sum())
        if ex.head_positions:
            h_logits = head(hidden[ex.head_positions].float())
            g = torch.tensor(ex.head_targets, dtype=torch.float32, device=h_logits.device)
            bce_sum += float(F.binary_cross_entropy_with_logits(h_logits, g, reduction="none").mean(1).sum())
            probs.append(torch.sigmoid(h_logits).cpu())
            gold.append(g.cpu())
        # Equivalence: the context tokens' logits against the plain document's.
        plain = plain_document(ex)
        ref = logits(model, collate([[plain]], pad_id), impl)[0]
        cols = [i for i, r in enumerate(inside) if not r]
        first = ex.head_positions[0] if ex.head_positions else len(ex)
        got = full[cols]
        diff = (got - ref).abs().amax(dim=1)
        pre = [k for k, i in enumerate(cols) if i < first]
        post = [k for k, i in enumerate(cols) if i > first]
        docs.append({
            "source": ex.source,
            "tokens": len(ex),
            "reflections": len(ex.head_positions),
            "pre_tokens": len(pre),
            "post_tokens": len(post),
            "pre_max_abs_diff": float(diff[pre].max()) if pre else 0.0,
            "post_max_abs_diff": float(diff[post].max()) if post else 0.0,
        })
    labels = list(head.labels)
    if probs:
        p = torch.cat(probs)
        f1 = charter_f1(p >= THRESHOLD, torch.cat(gold) > 0.5, labels)
    else:
        f1 = charter_f1(torch.zeros((0, len(labels))), torch.zeros((0, len(labels))), labels)
    gold_rows = torch.cat(gold).tolist() if gold else []
    baseline = majority_baseline(reference if reference is not None else gold_rows, gold_rows, labels)
    baseline["reference"] = "training documents" if reference is not None else "the evaluated documents"
    pre_max = max((d["pre_max_abs_diff"] for d in docs), default=0.0)
    post_max = max((d["post_max_abs_diff"] for d in docs), default=0.0)
    return {
        "documents": len(docs),
        "truncated_documents": truncated,
        "reflection_loss": refl_sum / refl_n if refl_n else math.nan,
        "reflection_targets": refl_n,
        "context_loss": ctx_sum / ctx_n if ctx_n else math.nan,
        "context_targets": ctx_n,
        "head_bce": bce_sum / f1["positions"] if f1["positions"] else math.nan,
        "threshold": THRESHOLD,
        **f1,
        "baseline": baseline,
        "beats_baseline": f1["micro_f1"] is not None and f1["micro_f1"] > (baseline["micro_f1"] or 0.0),
        "equivalence": {
            "atol": EQUIVALENCE_ATOL,
            "pre_max_abs_diff": pre_max,
            "post_max_abs_diff": post_max,
            "post_tokens": sum(d["post_tokens"] for d in docs),
            "passed": bool(docs) and pre_max < EQUIVALENCE_ATOL and post_max < EQUIVALENCE_ATOL,
            "per_document": docs,
        },
    }


# -- reading the head on a chat --------------------------------------------------------------
@torch.no_grad()
def read_constitution(model: Any, head: ConstitutionHead, tokenizer: Any, messages: list[dict]) -> list[dict[str, float]]:
    """``{charter id: probability}`` for each assistant turn of ``messages`` (in order).

    The chat is rendered with the ``epe`` template (injection-safe: a user typing ``<assistant>``
    gets text tokens), and the head reads the hidden state at each ``<assistant>`` token that the
    template writes, i.e. at the opening of each assistant turn, where it was trained. The hidden
    states come from the one forward of :func:`ctrltok.core.loss.hidden_states` (the chat alone in
    one row, causal mask).
    """
    assistant = tokenizer.convert_tokens_to_ids("<assistant>")
    if tokenizer.convert_ids_to_tokens(assistant) != "<assistant>":
        raise ValueError("the tokenizer has no <assistant> token; is this an `epe` checkpoint?")
    example = encode_chat(messages, tokenizer, "epe", loss_on="all")
    cols = [i for i, t in enumerate(example.input_ids) if t == assistant]
    if not cols:
        return []
    hidden = hidden_states(model, collate([[example]], padding_id(tokenizer)))[0]
    probs = torch.sigmoid(head.to(hidden.device)(hidden[cols].float())).cpu()
    return [{label: float(p) for label, p in zip(head.labels, row)} for row in probs]
