"""`ctrltok eval` and `ctrltok constitution`: checkpoints by name or path in, tables out.

``ctrltok eval`` dispatches on the kind of run that made the checkpoint: ``--epe`` or
``--conditional`` when given, else what its ``ctrltok.json`` records (a model without a manifest is
a chat model; a backtranslation folder itself is a backtranslation run, while a model trained in
one is evaluated by its own manifest, like any other):

=============  =================================================  ========================================
kind           what is reported                                   library function
=============  =================================================  ========================================
chat, text     held-out loss, end-of-turn stop rate, forged       ``evaluation.evaluate.evaluate_model``
               role tokens
labelled       aligned / unconditional / misaligned mean scores,  ``evaluation.conditional.conditional_eval``
               their direction, leaked control tokens
epe            equivalence check, reflection / context loss,      ``evaluation.epe.evaluate_epe``
               charter F1 against the majority baseline
backtranslate  stage counts, curation parse failures, held-out    ``backtranslate.report`` (``report.json``),
               loss of each fine-tuned model (the ablation)       ``evaluation.evaluate.evaluate_model``
=============  =================================================  ========================================

The caps (how many conversations, prompts, samples, tokens) are options with defaults, and every
report prints the ones it used. Generation uses the checkpoint's decoding (its recipe's ``decoding``
section, in ``generation_config.json``) under the decoding flags, through the batched backend.
The functions here load (the model by name, the run's recipe through
:class:`~ctrltok.training.checkpoint.RunManifest`), call the library with objects, and print to
stderr, so that ``--json`` prints the result alone on stdout (NaN as ``null``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ctrltok.backtranslate.pairs import REPORT_FILE, backtranslation_folder
from ctrltok.cli.backtranslate import print_report
from ctrltok.cli.checks import MAX_PROMPTS, SAMPLES, UsageError
from ctrltok.cli.generate import decoding_flags, model_decoding
from ctrltok.conditional.label import LabelError
from ctrltok.conditional.scorers import DEFAULT_SCORER
from ctrltok.core.config import DataConfig
from ctrltok.core.conversation import to_conversation
from ctrltok.core.decoding import describe_decoding
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
CONDITIONAL_TOKENS = 32  # default continuation length of the conditional evaluation (--max-new-tokens)


# -- the handlers ----------------------------------------------------------------------------
def evaluate(a):
    if getattr(a, "n", None) is not None:
        raise UsageError("--n is now --max-prompts (prompts generated for) and, with --conditional, --samples "
                         "(samples per prompt and condition)")
    kind = eval_kind(a.model, epe=a.epe, conditional=a.conditional)
    if not a.json:
        KINDS[kind](a)
        return
    with stdout_to_stderr():  # whatever a library prints while evaluating
        result = KINDS[kind](a)
    print(to_json(result))


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout to stderr meanwhile, at the file-descriptor level too:
    libraries print to stdout (DeepSpeed's accelerator notice through a logging handler that holds
    ``sys.stdout``, C extensions through fd 1), and ``--json`` promises stdout holds the JSON alone."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved, 1)
        os.close(saved)


def to_json(result: Any) -> str:
    """The result as strict JSON: NaN and infinities (which JSON lacks) as ``null``, the printed
    text table of the conditional evaluation (its top-level ``table``) left out."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v if isinstance(v, (str, int, float, bool)) or v is None else str(v)

    if isinstance(result, dict):
        result = {k: v for k, v in result.items() if k != "table"}
    return json.dumps(clean(result), indent=1, ensure_ascii=False, allow_nan=False)


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
    """``epe`` / ``labelled`` when asked for; else ``backtranslate`` for a backtranslation folder
    itself; else the ``data.kind`` the checkpoint's manifest records (``chat`` without a recipe), so
    that a model trained in a backtranslation folder is evaluated as the model it is."""
    if epe and conditional:
        raise UsageError("--epe and --conditional exclude each other; give one")
    if epe:
        return "epe"
    if conditional:
        return "labelled"
    if backtranslation_folder(model) is not None:
        return "backtranslate"
    recipe = manifest_of(model).recipe()
    kind = recipe.data.kind if recipe is not None else "chat"
    if kind not in KINDS:
        raise UsageError(f"--model {model}: no evaluation for data.kind = {kind!r} (known: {', '.join(KINDS)})")
    return kind


def _chat(a) -> dict:
    return eval_chat(a.model, a.data, a.template, before=a.before, n_generate=a.max_prompts,
                     limit=a.max_conversations, batch_size=a.batch_size, decoding=decoding_flags(a), seed=a.seed)


def _epe(a) -> dict:
    return eval_epe(a.model, corpus=a.data, sidecar=a.sidecar)


def _conditional(a) -> dict:
    return eval_conditional(a.model, scorer=a.scorer, n=a.samples, prompts=a.data, max_prompts=a.max_prompts,
                            decoding=decoding_flags(a), seed=a.seed, batch_size=a.batch_size)


def _backtranslate(a) -> dict:
    return eval_backtranslate(a.model, a.data, limit=a.max_conversations)


KINDS = {"chat": _chat, "text": _chat, "epe": _epe, "labelled": _conditional, "backtranslate": _backtranslate}


# -- chat: held-out loss and stop rate -------------------------------------------------------
def eval_chat(model: str | os.PathLike, data: str | None = None, template: str | None = None,
              before: str | os.PathLike | None = None, n_generate: int = MAX_PROMPTS,
              max_new_tokens: int | None = None, limit: int | None = None, batch_size: int = 32,
              decoding: dict[str, Any] | None = None, seed: int = 0, console=None) -> dict:
    """Evaluate a checkpoint (and, with ``before``, a base model given the same tokens) on ``data``
    or on the run's own held-out split (its first ``limit`` conversations; all by default). The
    loss uses the run's ``data`` section (``max_length``, ``overlong``, ``packing``, ``loss_on``;
    ``DataConfig()`` without a recipe); the template is the manifest's unless given. The first
    ``n_generate`` prompts are answered with the checkpoint's decoding under ``decoding`` (flag
    values, :func:`ctrltok.cli.generate.decoding_flags`) and ``max_new_tokens``; a base model is
    given the same decoding. Prints a table and the caps to stderr and returns the result, or
    ``{"before", "after", "comparison"}``."""
    console = console or Console(stderr=True)
    manifest = manifest_of(model)
    recipe = manifest.recipe()
    rows = recipe.data if recipe is not None else DataConfig()
    template = template or manifest.template
    after_model, tokenizer = load_model(model)
    # Resolved here, against the checkpoint, so that the base model (--before) gets the same decoding.
    settings = model_decoding(after_model, decoding, max_new_tokens=max_new_tokens)
    if data:
        convs, wheres = load_conversations(data, limit)
        described = str(data)
    else:
        convs, wheres, described = heldout_conversations(manifest, limit)
    kwargs = {"data": rows, "n_generate": n_generate, "batch_size": batch_size, "sources": wheres,
              "decoding": settings, "seed": seed}
    caps = {"conversations": len(convs), "max_conversations": limit, "max_prompts": n_generate,
            "max_length": rows.max_length, "overlong": rows.overlong,
            "rows_from": "the run's data section" if recipe is not None else "DataConfig defaults (no recipe in ctrltok.json)",
            "decoding": describe_decoding(settings), "batch_size": batch_size, "seed": seed}
    after = {"model": str(model), "data": described, "caps": caps,
             **evaluate_model(after_model, tokenizer, convs, template, **kwargs)}
    if before is None:
        console.print(result_table(after, title=f"{model} on {described}"))
        print_chat_summary(after, console)
        return after
    del after_model
    base_model, base_tokenizer = prepare_base(recipe, before, template)
    base = {"model": str(before), "data": described, "caps": caps,
            **evaluate_model(base_model, base_tokenizer, convs, template, **kwargs)}
    print_comparison(base, after, console, samples=3)
    print_chat_summary(after, console)
    return {"before": base, "after": after, "comparison": compare(base, after)}


def print_chat_summary(result: dict, console: Any) -> None:
    """The caps a chat evaluation used and its role-token counts, in words."""
    caps, role = result["caps"], result["role_tokens"]
    cap = "all" if caps["max_conversations"] is None else f"at most {caps['max_conversations']} (--max-conversations)"
    console.print(f"held-out: {caps['conversations']} conversations ({cap}); loss rows: max_length "
                  f"{caps['max_length']}, overlong {caps['overlong']} ({caps['rows_from']}), "
                  f"{result.get('truncated_examples', 0)} truncated")
    console.print(f"stop rate: {result['n_generated']} prompts (--max-prompts {caps['max_prompts']}), decoding "
                  f"{caps['decoding']}, seed {caps['seed']}")
    console.print(f"role tokens: {role['spelled_in_messages']} spelled in held-out messages, "
                  f"{role['forged_in_training']} became control ids as trained, {role['forged_in_prompts']} in "
                  f"generation prompts; {role['emitted_in_replies']} control ids emitted inside replies")


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
def read_prompts(path: str | os.PathLike, limit: int | None = MAX_PROMPTS) -> tuple[list[str], int]:
    """The first ``limit`` ``{"prompt"}`` or ``{"text"}`` strings of a file (RealToxicityPrompts
    nests ``{"prompt": {"text": ...}}``; ``None``: all), and how many records the file holds."""
    texts: list[str] = []
    total = 0
    for where, rec in read_records(str(path)):
        total += 1
        if limit is not None and len(texts) >= limit:
            continue  # counted, not read
        value = rec.get("prompt", rec.get("text"))
        if isinstance(value, dict):
            value = value.get("text")
        if not isinstance(value, str):
            raise LabelError(f"{where}: expected a `prompt` or `text` string")
        texts.append(value)
    return texts, total


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


def eval_conditional(model: str | os.PathLike, scorer: str = DEFAULT_SCORER, n: int = SAMPLES,
                     max_new_tokens: int | None = None, prompts: str | None = None, threshold: float | None = None,
                     seed: int = 0, max_prompts: int | None = MAX_PROMPTS, decoding: dict[str, Any] | None = None,
                     batch_size: int = 32) -> dict[str, Any]:
    """Load a trained checkpoint and run :func:`~ctrltok.evaluation.conditional.conditional_eval`.

    ``prompts`` is a JSONL file of ``{"prompt"}`` or ``{"text"}`` records (e.g. RealToxicityPrompts),
    of which the first ``max_prompts`` are used (``None``: all); without it a few neutral openings
    are used. Each prompt (and the empty one) gets ``n`` samples per condition, continuations of
    at most ``max_new_tokens`` (default 32: sentence scores need a sentence, not a reply). Sampling:
    the checkpoint's decoding under ``decoding`` (flag values); a greedy decoding samples at
    temperature 1 instead, since ``n`` samples must differ. The threshold defaults to the one the
    model was trained with (:func:`trained_threshold`), else the scorer's own. The table and the
    caps go to stderr.
    """
    if threshold is None:
        threshold = trained_threshold(manifest_of(model))
    if prompts:
        texts, total = read_prompts(prompts, max_prompts)
        source = f"{len(texts)} of {total} prompts in {prompts} (--max-prompts {max_prompts})"
    else:
        texts = list(DEFAULT_EVAL_PROMPTS)[:max_prompts]
        source = f"{len(texts)} built-in neutral openings (--data for a prompt file)"
    m, tok = load_model(model)
    flags = dict(decoding or {})
    if flags.get("greedy") or flags.get("temperature") == 0:
        raise UsageError("the conditional evaluation draws --samples samples per prompt: it needs sampling "
                         "(drop --greedy / --temperature 0)")
    settings = model_decoding(m, flags)
    temperature = settings.temperature if settings.do_sample else 1.0
    length = max_new_tokens or flags.get("max_new_tokens") or CONDITIONAL_TOKENS
    result = conditional_eval(m, tok, scorer, texts, n=n, max_new_tokens=length, threshold=threshold, seed=seed,
                              batch_size=batch_size, temperature=temperature, top_p=settings.top_p,
                              top_k=settings.top_k or 0, repetition_penalty=settings.repetition_penalty,
                              no_repeat_ngram_size=settings.no_repeat_ngram_size)
    sampled = dataclasses.replace(settings, do_sample=True, temperature=temperature, max_new_tokens=length)
    result["caps"] = {"prompts": source, "max_prompts": max_prompts, "samples": n, "max_new_tokens": length,
                      "decoding": describe_decoding(sampled), "seed": seed}
    print(result["table"], file=sys.stderr)
    d = result["direction"]
    print(f"direction aligned < unconditional < misaligned: "
          f"{'yes' if all(d.values()) else 'no'}; leaked control tokens: {result['leaked_total']}", file=sys.stderr)
    print(f"caps: {source} + the empty prompt; {n} samples per prompt and condition (--samples); "
          f"{describe_decoding(sampled)}; seed {seed}", file=sys.stderr)
    return result


# -- backtranslate: the stages and the ablation ----------------------------------------------
def eval_backtranslate(run: str | os.PathLike, data: str | None = None, limit: int | None = None,
                       console: Any = None) -> dict[str, Any]:
    """The report of a backtranslation folder (``run``, or the folder a model of ``run`` lies in):
    the stage counts and curation parse failures its ``report.json`` records (printed as
    ``ctrltok backtranslate`` prints them), and the ablation: the held-out loss of every model
    fine-tuned there (``model-N``, and any other the folder records but the backward model, e.g.
    a baseline on uncurated pairs) on ``data`` (held-out instruction chats, the first ``limit``),
    each in the rows its own run used. An ``ablation`` the report itself records is passed on."""
    console = console or Console(stderr=True)
    folder = backtranslation_folder(run) or backtranslation_folder(Path(str(run)).expanduser().parent)
    if folder is None or not (folder / REPORT_FILE).is_file():
        raise UsageError(f"--model {run}: no {REPORT_FILE} of a backtranslation here yet; finish the pipeline "
                         "(rerun `ctrltok backtranslate` with the same --out) first")
    report = json.loads((folder / REPORT_FILE).read_text(encoding="utf-8"))
    for stats in report.get("curation", {}).values():  # JSON made the scores' keys strings
        stats["histogram"] = {int(k): v for k, v in stats.get("histogram", {}).items()}
    print_report(report, console)
    models = {name: info for name, info in report.get("training", {}).items() if name != "backward"}
    ablation: dict[str, Any] = {"data": str(data) if data else None, "models": {}}
    if "ablation" in report:
        ablation["recorded"] = report["ablation"]
    if data:
        convs, wheres = load_conversations(data, limit)
        for name, info in models.items():
            where = Path(info["model"])
            if not where.is_dir():  # the folder was moved since: the model sits in it under its own name
                where = folder / where.name
            manifest = manifest_of(where)
            recipe = manifest.recipe()
            m, tok = load_model(where)
            got = evaluate_model(m, tok, convs, manifest.template, data=recipe.data if recipe else DataConfig(),
                                 n_generate=0, sources=wheres)
            ablation["models"][name] = {"model": str(where), "examples": info.get("examples"),
                                        "eval_loss": got["eval_loss"], "eval_targets": got["eval_targets"]}
            del m
    table = Table(title=f"ablation: held-out loss on {data}" if data else "ablation")
    for col, justify in (("model", "left"), ("trained on", "right"), ("held-out loss", "right")):
        table.add_column(col, justify=justify)
    for name, info in models.items():
        got = ablation["models"].get(name, {})
        table.add_row(name, f"{info.get('examples')} chats", _fmt(got.get("eval_loss"), none="not measured"))
    console.print(table)
    if not data:
        console.print("ablation losses need held-out instruction chats: --data FILE (the first --max-conversations)")
    caps = {"conversations": len(convs) if data else 0, "max_conversations": limit}
    console.print(f"caps: {caps['conversations']} held-out conversations "
                  f"({'all' if limit is None else f'at most {limit}'}; --max-conversations)")
    return {"kind": "backtranslate", "run": str(folder), "stages": report.get("stages", []),
            "curation": report.get("curation", {}),  # as curation_stats wrote it, whatever the scoring
            "training": report.get("training", {}), "ablation": ablation, "caps": caps}


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
    base = result.get("baseline")
    if base is not None:
        table.add_row("majority baseline micro-F1", _fmt(base["micro_f1"], none="n/a"),
                      f"always {{{', '.join(base['label_set'])}}}, the most frequent label set of the {base['reference']}")
        table.add_row("beats the baseline", "[green]yes[/green]" if result["beats_baseline"] else "[red]no[/red]",
                      "charter micro-F1 above the majority baseline's")
    table.add_row("equivalence pre (max |diff|)", f"{eq['pre_max_abs_diff']:.2e}", "logits before the reflection vs plain document")
    table.add_row("equivalence post (max |diff|)", f"{eq['post_max_abs_diff']:.2e}",
                  f"{eq['post_tokens']} post-reflection tokens vs plain document")
    verdict = "[green]PASS[/green]" if eq["passed"] else "[red]FAIL[/red]"
    table.add_row("equivalence", verdict, f"both < {eq['atol']:g}")
    console.print(table)
    console.print(f"caps: all {result['documents']} documents of {result.get('data')}; max_length "
                  f"{result.get('max_length')} (the run's data.max_length), {truncated} truncated")


def write_json(result: dict, path: str | os.PathLike) -> Path:
    """Write a result (or a ``{"before", "after", "comparison"}`` dict) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
