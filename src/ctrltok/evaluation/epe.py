"""Evaluation of an EPE checkpoint (seed 000): reflection loss, charter F1, and the equivalence check.

``ctrltok eval --epe --model DIR`` calls :func:`evaluate_epe` and prints :func:`print_epe`::

    result = evaluate_epe("runs/epe-cpu")                      # the run's own held-out documents
    result = evaluate_epe("runs/epe-cpu", "docs.jsonl", "side.jsonl")   # every annotated document
    print_epe(result)

The held-out set is re-created exactly as training held it out: the recipe stored in the
checkpoint's ``ctrltok.json`` (``recipe_values``) goes through ``config.recipe_from_mapping`` and
``reflection.build_epe_examples``, whose ``eval`` part is the same seeded split (or ``data.eval``
with ``epe.eval_sidecar``). With ``corpus`` and ``sidecar`` given, every document of that corpus
with its annotations is evaluated instead.

Each document is run alone in its own row (over-long documents are truncated to ``max_length``,
like the training packer does, and counted), with the explicit mask of ``attention.build_mask``:
the hole and the aliased positions come from the Example's structure, never from transformers'
inference of documents from ``position_ids``.

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

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ctrltok.core.attention import build_mask
from ctrltok.core.example import IGNORE, Example
from ctrltok.core.packing import collate, slice_example

EQUIVALENCE_ATOL = 1e-4
THRESHOLD = 0.5
MANIFEST = "ctrltok.json"


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
def _manifest(model_dir: Path) -> dict:
    path = model_dir / MANIFEST
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def _recipe(model_dir: Path, manifest: dict):
    from ctrltok.core.config import recipe_from_mapping

    values = manifest.get("recipe_values")
    if not isinstance(values, dict):
        return None
    values = {k: v for k, v in values.items() if k != "source" and v is not None}
    return recipe_from_mapping(values, f"{model_dir / MANIFEST}:recipe_values")


def _examples(model_dir: Path, recipe: Any, tokenizer: Any, corpus: str | None, sidecar: str | None,
              order: list[str]) -> tuple[list[Example], str]:
    from ctrltok.epe.reflection import (
        build_epe_examples,
        insert_reflection,
        read_annotated,
    )

    if (corpus is None) != (sidecar is None):
        raise ValueError("evaluate_epe: give both `corpus` and `sidecar` (--data and --sidecar), or neither "
                         "to use the run's own held-out documents")
    if corpus is not None:
        column = recipe.epe.reflection_column if recipe is not None and recipe.epe else "reflection_3p"
        text_field = recipe.data.text_field if recipe is not None else "text"
        docs = read_annotated(corpus, sidecar, order, column, "id", text_field)
        examples = [insert_reflection(d.text, d.annotations, tokenizer, order, source=d.where) for d in docs]
        return [ex for ex in examples if ex.head_positions], f"{corpus} + {sidecar}"
    if recipe is None:
        raise ValueError(f"{model_dir / MANIFEST}: no `recipe_values` to re-create the held-out split from; "
                         "pass corpus and sidecar (--data and --sidecar)")
    if recipe.data.kind != "epe":
        raise ValueError(f"{model_dir / MANIFEST}: recipe_values.data.kind = {recipe.data.kind!r}, not 'epe'; "
                         "this checkpoint was not trained with reflections")
    held = build_epe_examples(recipe, tokenizer).eval
    if not held:
        raise ValueError(f"{model_dir / MANIFEST}: the run held out no documents (data.eval unset, "
                         f"data.eval_fraction = {recipe.data.eval_fraction}); pass corpus and sidecar")
    where = recipe.data.eval or f"{recipe.data.train} (held-out {recipe.data.eval_fraction:g}, seed {recipe.train.seed})"
    return held, str(where)


@torch.no_grad()
def _forward(model: Any, example: Example, impl: str, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Hidden states ``[T, H]`` and logits ``[T, V]`` of one example alone in a row, explicit mask."""
    batch = collate([[example]], pad_id)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    batch = batch.to(device)
    mask = build_mask(batch, impl, dtype=dtype)
    hidden = model.get_decoder()(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=mask,
                                 use_cache=False).last_hidden_state[0]
    logits = model.get_output_embeddings()(hidden).float()
    return hidden, logits, batch


@torch.no_grad()
def evaluate_examples(model: Any, head: Any, examples: Sequence[Example], pad_id: int,
                      max_length: int | None = None, impl: str | None = None) -> dict:
    """The metrics of :func:`evaluate_epe` for a loaded model, head and encoded EPE examples."""
    impl = impl or model.config._attn_implementation
    head = head.to(next(model.parameters()).device)
    refl_sum = ctx_sum = bce_sum = 0.0
    refl_n = ctx_n = 0
    probs, gold, docs = [], [], []
    truncated = 0
    for ex in examples:
        if max_length is not None and len(ex) > max_length:
            ex = slice_example(ex, 0, max_length)
            truncated += 1
        inside = _inside(ex)
        hidden, logits, batch = _forward(model, ex, impl, pad_id)
        targets = batch.targets[0]
        sup = targets != IGNORE
        ce = F.cross_entropy(logits[sup], targets[sup], reduction="none")
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
        _, ref, _ = _forward(model, plain, impl, pad_id)
        cols = [i for i, r in enumerate(inside) if not r]
        first = ex.head_positions[0] if ex.head_positions else len(ex)
        got = logits[cols]
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
        "equivalence": {
            "atol": EQUIVALENCE_ATOL,
            "pre_max_abs_diff": pre_max,
            "post_max_abs_diff": post_max,
            "post_tokens": sum(d["post_tokens"] for d in docs),
            "passed": bool(docs) and pre_max < EQUIVALENCE_ATOL and post_max < EQUIVALENCE_ATOL,
            "per_document": docs,
        },
    }


def evaluate_epe(model_dir: str | Path, corpus: str | None = None, sidecar: str | None = None,
                 max_length: int | None = None) -> dict:
    """Evaluate an EPE checkpoint on its held-out documents (or ``corpus`` + ``sidecar``).

    ``max_length`` defaults to the run's ``data.max_length`` (512 without a manifest). Returns the
    metrics described in the module docstring plus ``model`` and ``data`` (what was evaluated).
    """
    from ctrltok.core.heads import load_head
    from ctrltok.core.models import load_model, resolve_model
    from ctrltok.epe.reflection import charter_ids

    where = resolve_model(model_dir)
    if not isinstance(where, Path):
        raise ValueError(f"{model_dir}: an EPE evaluation needs a local checkpoint directory (with its head)")
    manifest = _manifest(where)
    recipe = _recipe(where, manifest)
    head = load_head(where)
    order = charter_ids(recipe.tokens.charter if recipe is not None else None)
    if order != head.labels:
        raise ValueError(f"{where}: the constitution head's labels ({len(head.labels)}) differ from the charter "
                         f"of the run ({len(order)}); was tokens.charter changed after training?")
    attn = recipe.model.attn if recipe is not None and recipe.model.attn in ("sdpa", "eager") else "sdpa"
    model, tokenizer = load_model(where, attn=attn)
    examples, described = _examples(where, recipe, tokenizer, corpus, sidecar, order)
    if max_length is None:
        max_length = recipe.data.max_length if recipe is not None else 512
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    result = evaluate_examples(model, head, examples, int(pad_id or 0), max_length=max_length, impl=attn)
    return {"model": str(where), "data": described, "max_length": max_length, **result}


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.{digits}f}"
    return str(x)


def print_epe(result: dict, console: Any = None) -> None:
    """``result`` of :func:`evaluate_epe` as rich tables (to stderr, so ``--json`` keeps stdout)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(stderr=True)
    eq = result["equivalence"]
    table = Table(title=f"EPE evaluation of {result.get('model', 'model')} on {result.get('data', 'data')}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("note")
    truncated = result.get("truncated_documents", 0)
    table.add_row("documents", str(result["documents"]),
                  f"{truncated} truncated to {result.get('max_length')} tokens" if truncated else "")
    table.add_row("reflection loss", _fmt(result["reflection_loss"]), f"mean CE over {result['reflection_targets']} reflection targets")
    table.add_row("context loss", _fmt(result["context_loss"]), f"mean CE over {result['context_targets']} other targets")
    table.add_row("head BCE", _fmt(result["head_bce"]), f"{result['positions']} <assistant> positions")
    table.add_row("charter micro-F1", _fmt(result["micro_f1"]),
                  f"threshold {result['threshold']:g}; P {_fmt(result['micro_precision'], 3)} R {_fmt(result['micro_recall'], 3)}")
    table.add_row("charter macro-F1", _fmt(result["macro_f1"]),
                  f"over {len(result['macro_labels'])} labels present in gold or predictions")
    table.add_row("equivalence pre (max |diff|)", f"{eq['pre_max_abs_diff']:.2e}", "logits before the reflection vs plain document")
    table.add_row("equivalence post (max |diff|)", f"{eq['post_max_abs_diff']:.2e}",
                  f"{eq['post_tokens']} post-reflection tokens vs plain document")
    verdict = "[green]PASS[/green]" if eq["passed"] else "[red]FAIL[/red]"
    table.add_row("equivalence", verdict, f"both < {eq['atol']:g}")
    console.print(table)
