"""`ctrltok eval` and `ctrltok constitution`: checkpoints by name or path in, tables out.

``ctrltok eval`` dispatches on the kind of run that made the checkpoint: ``--epe`` or
``--conditional`` when given, else the ``data.kind`` its ``ctrltok.json`` records (a model without
a manifest is a chat model):

============  ================================================  =====================================
kind          what is measured                                  library metric function
============  ================================================  =====================================
chat, text    held-out loss and end-of-turn stop rate           ``evaluation.evaluate.evaluate_model``
epe           reflection loss, charter F1, equivalence check    ``evaluation.epe.evaluate_epe``
labelled      aligned / unconditional / misaligned sampling     ``evaluation.conditional.conditional_eval``
============  ================================================  =====================================

The functions here load (the model by name, the run's recipe through
:class:`~ctrltok.training.checkpoint.RunManifest`), call the library with objects, and print to
stderr, so that ``--json`` keeps stdout for the result.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ctrltok.cli.checks import UsageError
from ctrltok.conditional.label import LabelError
from ctrltok.conditional.scorers import DEFAULT_SCORER
from ctrltok.core.config import DataConfig
from ctrltok.core.conversation import to_conversation
from ctrltok.core.heads import load_head
from ctrltok.core.models import load_model, resolve_model
from ctrltok.core.records import read_records
from ctrltok.core.tokens import load_charter
from ctrltok.evaluation.conditional import DEFAULT_EVAL_PROMPTS, conditional_eval
from ctrltok.evaluation.epe import evaluate_epe, read_constitution
from ctrltok.evaluation.evaluate import (
    compare,
    evaluate_model,
    heldout_conversations,
    load_conversations,
    prepare_base,
)
from ctrltok.training.checkpoint import RunManifest

# Scalars that are better when lower / higher (for the comparison table's verdict column).
LOWER_IS_BETTER = ("eval_loss", "perplexity")
HIGHER_IS_BETTER = ("eot_stop_rate",)
MAX_PROMPTS = 16  # prompts read from a --data file for --conditional


# -- the handlers ----------------------------------------------------------------------------
def evaluate(a):
    kind = eval_kind(a.model, epe=a.epe, conditional=a.conditional)
    result = KINDS[kind](a)
    if a.json:
        print(json.dumps(result, indent=1, default=str))


def constitution(a):
    show_constitution(a.model, a.input, as_json=a.json)


def manifest_of(model: str | os.PathLike) -> RunManifest:
    """The run manifest of a checkpoint folder (or alias); an empty one for a hub name."""
    where = resolve_model(model)
    try:
        return RunManifest.read(where) if isinstance(where, Path) else RunManifest()
    except ValueError as exc:  # a damaged ctrltok.json
        raise UsageError(f"--model {model}: {exc}") from None


def eval_kind(model: str | os.PathLike, epe: bool = False, conditional: bool = False) -> str:
    """``epe`` / ``labelled`` when asked for, else the ``data.kind`` the checkpoint's manifest records
    (``chat`` without a recipe)."""
    if epe and conditional:
        raise UsageError("--epe and --conditional exclude each other; give one")
    if epe:
        return "epe"
    if conditional:
        return "labelled"
    recipe = manifest_of(model).recipe()
    kind = recipe.data.kind if recipe is not None else "chat"
    if kind not in KINDS:
        raise UsageError(f"--model {model}: no evaluation for data.kind = {kind!r} (known: {', '.join(KINDS)})")
    return kind


def _chat(a) -> dict:
    return eval_chat(a.model, a.data, a.template, before=a.before, n_generate=a.n, max_new_tokens=a.max_new_tokens)


def _epe(a) -> dict:
    return eval_epe(a.model, corpus=a.data, sidecar=a.sidecar)


def _conditional(a) -> dict:
    return eval_conditional(a.model, scorer=a.scorer, n=a.n, max_new_tokens=a.max_new_tokens, prompts=a.data)


KINDS = {"chat": _chat, "text": _chat, "epe": _epe, "labelled": _conditional}


# -- chat: held-out loss and stop rate -------------------------------------------------------
def eval_chat(model: str | os.PathLike, data: str | None = None, template: str | None = None,
              before: str | os.PathLike | None = None, n_generate: int = 16, max_new_tokens: int = 64,
              limit: int | None = None, batch_size: int = 8, console=None) -> dict:
    """Evaluate a checkpoint (and, with ``before``, a base model given the same tokens) on ``data``
    or on the run's own held-out split. The loss uses the run's ``data`` section (``max_length``,
    ``overlong``, ``packing``, ``loss_on``; ``DataConfig()`` without a recipe); the template is the
    manifest's unless given. Prints a table to stderr and returns the result, or
    ``{"before", "after", "comparison"}``."""
    console = console or Console(stderr=True)
    manifest = manifest_of(model)
    recipe = manifest.recipe()
    rows = recipe.data if recipe is not None else DataConfig()
    template = template or manifest.template
    after_model, tokenizer = load_model(model)
    if data:
        convs, wheres = load_conversations(data, limit)
        described = str(data)
    else:
        convs, wheres, described = heldout_conversations(manifest, limit)
    kwargs = {"data": rows, "n_generate": n_generate, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
              "sources": wheres}
    after = {"model": str(model), "data": described,
             **evaluate_model(after_model, tokenizer, convs, template, **kwargs)}
    if before is None:
        console.print(result_table(after, title=f"{model} on {described}"))
        return after
    del after_model
    base_model, base_tokenizer = prepare_base(recipe, before, template)
    base = {"model": str(before), "data": described,
            **evaluate_model(base_model, base_tokenizer, convs, template, **kwargs)}
    print_comparison(base, after, console, samples=3)
    return {"before": base, "after": after, "comparison": compare(base, after)}


# -- epe -------------------------------------------------------------------------------------
def eval_epe(model: str | os.PathLike, corpus: str | None = None, sidecar: str | None = None,
             max_length: int | None = None, console=None) -> dict:
    """Evaluate an EPE checkpoint folder (model, head, recipe) on its held-out documents (or
    ``corpus`` + ``sidecar``); print the tables and return the result."""
    where = Path(str(resolve_model(model)))
    if not where.is_dir():
        raise UsageError(f"--model {model}: an EPE evaluation needs a local checkpoint folder (with its head)")
    recipe = RunManifest.read(where).recipe()
    head = load_head(where)
    attn = recipe.model.attn if recipe is not None and recipe.model.attn in ("sdpa", "eager") else "sdpa"
    lm, tokenizer = load_model(where, attn=attn)
    result = {"model": str(where),
              **evaluate_epe(lm, head, tokenizer, recipe, corpus, sidecar, max_length=max_length, impl=attn)}
    print_epe(result, console)
    return result


# -- labelled: conditional sampling ----------------------------------------------------------
def read_prompts(path: str | os.PathLike, limit: int = MAX_PROMPTS) -> list[str]:
    """The first ``limit`` ``{"prompt"}`` or ``{"text"}`` strings of a file (RealToxicityPrompts
    nests ``{"prompt": {"text": ...}}``)."""
    texts: list[str] = []
    for where, rec in read_records(str(path)):
        value = rec.get("prompt", rec.get("text"))
        if isinstance(value, dict):
            value = value.get("text")
        if not isinstance(value, str):
            raise LabelError(f"{where}: expected a `prompt` or `text` string")
        texts.append(value)
        if len(texts) >= limit:
            break
    return texts


def trained_threshold(manifest: RunManifest) -> float | None:
    """The scorer threshold a conditional run was trained with: ``conditional.threshold``, else the
    one calibrated at labelling time (``<data.train>.summary.json``); ``None`` when neither is known."""
    recipe = manifest.recipe()
    if recipe is None:
        return None
    threshold = recipe.conditional.threshold if recipe.conditional is not None else None
    labelled = Path(str(recipe.data.train) + ".summary.json")
    if threshold is None and labelled.is_file():
        threshold = json.loads(labelled.read_text(encoding="utf-8")).get("threshold")
    return threshold


def eval_conditional(model: str | os.PathLike, scorer: str = DEFAULT_SCORER, n: int = 8, max_new_tokens: int = 32,
                     prompts: str | None = None, threshold: float | None = None, seed: int = 0) -> dict[str, Any]:
    """Load a trained checkpoint and run :func:`~ctrltok.evaluation.conditional.conditional_eval`.

    ``prompts`` is a JSONL file of ``{"prompt"}`` or ``{"text"}`` records (e.g. RealToxicityPrompts);
    without it a few neutral openings are used. The threshold defaults to the one the model was
    trained with (:func:`trained_threshold`), else the scorer's own. The table goes to stderr.
    """
    if threshold is None:
        threshold = trained_threshold(manifest_of(model))
    texts = read_prompts(prompts) if prompts else list(DEFAULT_EVAL_PROMPTS)
    m, tok = load_model(model)
    result = conditional_eval(m, tok, scorer, texts, n=n, max_new_tokens=max_new_tokens, threshold=threshold, seed=seed)
    print(result["table"], file=sys.stderr)
    return result


# -- constitution ----------------------------------------------------------------------------
def show_constitution(model: str | os.PathLike, input: str | os.PathLike, as_json: bool = False, top: int = 5,
                      console=None) -> None:
    """``ctrltok constitution``: read the head for every assistant turn of a file of chats (any
    layout :func:`ctrltok.core.conversation.to_conversation` reads): JSON lines, or a table of
    the ``top`` charter items per turn."""
    where = resolve_model(model)
    head = load_head(where)
    lm, tokenizer = load_model(where)
    readings = ((i, j, probs) for i, (src, rec) in enumerate(read_records(str(input)))
                for j, probs in enumerate(read_constitution(lm, head, tokenizer, to_conversation(rec, src))))
    if as_json:
        for i, j, probs in readings:
            print(json.dumps({"chat": i, "turn": j, "charter": probs}))
        return
    recipe = manifest_of(where).recipe()
    titles = {c.id: c.title for c in load_charter(recipe.tokens.charter if recipe is not None else None)}
    table = Table(title=f"constitution head of {where} (top {top} per assistant turn)")
    for col in ("chat", "turn", "charter item", "probability"):
        table.add_column(col)
    for i, j, probs in readings:
        for k, (cid, p) in enumerate(sorted(probs.items(), key=lambda kv: -kv[1])[:top]):
            label = f"{cid} {titles.get(cid, '')}".strip()
            table.add_row(str(i) if k == 0 else "", str(j) if k == 0 else "", label, f"{p:.3f}")
    (console or Console()).print(table)


# -- reporting -------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 4, none: str = "-") -> str:
    if value is None:
        return none
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _verdict(metric: str, delta: float | None) -> str:
    if delta is None or delta == 0:
        return ""
    better = (metric in LOWER_IS_BETTER and delta < 0) or (metric in HIGHER_IS_BETTER and delta > 0)
    worse = (metric in LOWER_IS_BETTER and delta > 0) or (metric in HIGHER_IS_BETTER and delta < 0)
    return "[green]better[/]" if better else "[red]worse[/]" if worse else ""


def comparison_table(before: dict, after: dict, title: str = "before vs after") -> Table:
    """A rich Table of :func:`ctrltok.evaluation.evaluate.compare`."""
    table = Table(title=title)
    for col, justify in (("metric", "left"), ("before", "right"), ("after", "right"), ("delta", "right"), ("", "left")):
        table.add_column(col, justify=justify)
    for metric, row in compare(before, after).items():
        delta = row["delta"]
        table.add_row(metric, _fmt(row["before"]), _fmt(row["after"]),
                      "-" if delta is None else f"{delta:+.4f}" if isinstance(delta, float) else f"{delta:+d}",
                      _verdict(metric, delta))
    return table


def result_table(result: dict, title: str = "evaluation") -> Table:
    """A rich Table of one result's scalar fields."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in result.items():
        if not isinstance(v, (list, dict)):
            table.add_row(k, _fmt(v))
    return table


def print_comparison(before: dict, after: dict, console=None, samples: int = 0) -> None:
    """Print the before/after table (and the first ``samples`` generation pairs)."""
    console = console or Console()
    console.print(comparison_table(before, after))
    for b, a in list(zip(before.get("generations", []), after.get("generations", [])))[:samples]:
        console.print(f"[bold]prompt[/] {escape(b['prompt'])}")
        for name, g in (("before", b), ("after", a)):
            end = "[green]<end of turn>[/]" if g["ended_with_eot"] else ("[yellow]<other stop>[/]" if g["stopped"]
                                                                           else "[red]<cut at limit>[/]")
            console.print(f"  [dim]{name}[/] {escape(g['text'])} {end}")


def print_result(result: dict, console=None) -> None:
    (console or Console()).print(result_table(result))


def print_epe(result: dict, console: Any = None) -> None:
    """An EPE result (:func:`eval_epe`) as a rich table (to stderr, so ``--json`` keeps stdout)."""
    console = console or Console(stderr=True)
    eq = result["equivalence"]
    table = Table(title=f"EPE evaluation of {result.get('model', 'model')} on {result.get('data', 'data')}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("note")
    truncated = result.get("truncated_documents", 0)
    table.add_row("documents", str(result["documents"]),
                  f"{truncated} truncated to {result.get('max_length')} tokens" if truncated else "")
    table.add_row("reflection loss", _fmt(result["reflection_loss"], none="n/a"), f"mean CE over {result['reflection_targets']} reflection targets")
    table.add_row("context loss", _fmt(result["context_loss"], none="n/a"), f"mean CE over {result['context_targets']} other targets")
    table.add_row("head BCE", _fmt(result["head_bce"], none="n/a"), f"{result['positions']} <assistant> positions")
    table.add_row("charter micro-F1", _fmt(result["micro_f1"], none="n/a"),
                  f"threshold {result['threshold']:g}; P {_fmt(result['micro_precision'], 3, 'n/a')} R {_fmt(result['micro_recall'], 3, 'n/a')}")
    table.add_row("charter macro-F1", _fmt(result["macro_f1"], none="n/a"),
                  f"over {len(result['macro_labels'])} labels present in gold or predictions")
    table.add_row("equivalence pre (max |diff|)", f"{eq['pre_max_abs_diff']:.2e}", "logits before the reflection vs plain document")
    table.add_row("equivalence post (max |diff|)", f"{eq['post_max_abs_diff']:.2e}",
                  f"{eq['post_tokens']} post-reflection tokens vs plain document")
    verdict = "[green]PASS[/green]" if eq["passed"] else "[red]FAIL[/red]"
    table.add_row("equivalence", verdict, f"both < {eq['atol']:g}")
    console.print(table)


def write_json(result: dict, path: str | os.PathLike) -> Path:
    """Write a result (or a ``{"before", "after", "comparison"}`` dict) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
