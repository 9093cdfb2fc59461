"""Evaluation of a model with control tokens: held-out loss on supervised tokens and the
end-of-turn stop rate, before and after training (``ctrltok eval``).

Two numbers tell whether an SFT run taught its end-of-turn token (LIMA's ``<EOT>``, OASST's
``<|endoftext|>``):

* ``eval_loss``: mean cross-entropy per supervised target on held-out conversations, computed
  exactly as training does (``chat.ChatEncoder`` labels, ``packing.pack`` rows, the explicit
  document mask from ``attention.build_mask``, the one shift in ``packing.collate``), so it is
  comparable with the training curve. Packing does not change it (tested against a per-conversation
  hand computation).
* ``eot_stop_rate``: the share of generations that end with the template's end-of-turn token
  within ``max_new_tokens``. The prompt of a conversation is every message before its last
  assistant message; the first ``n_generate`` such prompts are generated greedily with
  :func:`ctrltok.generation.generate.generate` (the checkpoint's stop and suppressed ids apply).
  ``any_stop_rate`` counts any stop id (a base model often stops at its own EOS instead).

The core takes objects, so a model that is not on disk evaluates too (the demo's "before": the
base model with the new tokens added by ``train.prepare_model``)::

    before = evaluate_model(model, tokenizer, conversations, "eot")
    after = evaluate("runs/eot", "ctrltok:instructions", limit=32)
    print_comparison(before, after)           # a rich table; compare() gives the same as a dict
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ctrltok.core.attention import build_mask
from ctrltok.core.chat import ChatEncoder
from ctrltok.core.example import IGNORE, Example
from ctrltok.core.packing import collate, pack
from ctrltok.core.templates import get_template
from ctrltok.generation.generate import generate

# Scalars that are better when lower / higher (for the comparison table's verdict column).
LOWER_IS_BETTER = ("eval_loss", "perplexity")
HIGHER_IS_BETTER = ("eot_stop_rate",)


# -- held-out loss -------------------------------------------------------------------------
def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
    return int(pad)


@torch.no_grad()
def heldout_loss(model, examples: list[Example], pad_id: int, max_length: int = 512,
                 rows_per_batch: int = 4) -> dict:
    """Sum and mean of the cross-entropy over every supervised target of ``examples``, packed.

    Logits are computed only where a target exists (the LM head runs on the selected hidden
    states), which keeps memory at ``targets x vocab`` instead of ``rows x T x vocab``.
    """
    result = pack(examples, max_length, "truncate")
    impl = getattr(model.config, "_attn_implementation", None) or "sdpa"
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings()
    was = model.training
    model.eval()
    ce_sum, n = 0.0, 0
    try:
        for i in range(0, len(result.rows), rows_per_batch):
            batch = collate(result.rows[i:i + rows_per_batch], pad_id).to(device)
            mask = build_mask(batch, impl, dtype=dtype)
            sel = batch.targets != IGNORE
            if not bool(sel.any()):
                continue
            if decoder is not None and head is not None:
                hidden = decoder(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=mask,
                                 use_cache=False).last_hidden_state
                logits = head(hidden[sel]).float()
            else:  # a model without the decoder/head split: full logits
                logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=mask,
                               use_cache=False).logits[sel].float()
            ce_sum += float(F.cross_entropy(logits, batch.targets[sel], reduction="sum"))
            n += int(sel.sum())
    finally:
        model.train(was)
    stats = result.stats
    return {"eval_loss": ce_sum / n if n else None, "eval_targets": n, "ce_sum": ce_sum,
            "truncated_examples": stats.truncated_examples, "truncated_tokens": stats.truncated_tokens}


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


# -- the core ------------------------------------------------------------------------------
def evaluate_model(model, tokenizer, conversations: list[list[dict]], template: str, *, n_generate: int = 16,
                   max_new_tokens: int = 64, loss_on: str = "assistant", max_length: int = 512,
                   examples: list[Example] | None = None, batch_size: int = 8, rows_per_batch: int = 4,
                   sources: list[str] | None = None) -> dict:
    """Held-out loss and end-of-turn stop rate of a loaded model on ``conversations``.

    ``examples`` (already encoded, e.g. a recipe's held-out split from ``dataset.build_examples``)
    replace the encoding of ``conversations`` for the loss; the stop rate always uses
    ``conversations``. Examples without a supervised target are counted in ``skipped_no_targets``.
    """
    tmpl = get_template(template, tokenizer)
    eot_id = tokenizer.convert_tokens_to_ids(tmpl.end_of_turn)
    if eot_id is None or (eot_id == tokenizer.unk_token_id and tmpl.end_of_turn != tokenizer.unk_token):
        raise ValueError(f"template {template!r} ends turns with {tmpl.end_of_turn!r}, which the tokenizer lacks; "
                         f"add the token preset(s) {list(tmpl.presets)} first (train.prepare_model does)")
    if examples is None:
        encoder = ChatEncoder(tokenizer, tmpl, loss_on)
        examples = encoder.encode_many(conversations, sources) if conversations else []
    usable = [ex for ex in examples if ex.n_supervised > 0]
    out: dict[str, Any] = {"template": template, "end_of_turn": tmpl.end_of_turn, "loss_on": loss_on,
                           "conversations": len(conversations), "examples": len(examples),
                           "skipped_no_targets": len(examples) - len(usable)}
    loss = heldout_loss(model, usable, _pad_id(tokenizer), max_length, rows_per_batch) if usable else \
        {"eval_loss": None, "eval_targets": 0, "truncated_examples": 0, "truncated_tokens": 0}
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


def load_conversations(data: str | os.PathLike, limit: int | None = None) -> tuple[list[list[dict]], list[str]]:
    """Chat records (``messages``, instruction/output, prompt/response) from a file, folder,
    ``ctrltok:<resource>`` or datasets name, with where each came from."""
    from ctrltok.core.chat import validate_messages
    from ctrltok.core.records import read_records
    from ctrltok.training.data import to_messages

    convs, wheres = [], []
    for where, rec in read_records(str(data)):
        if limit is not None and len(convs) >= limit:
            break
        convs.append(validate_messages(to_messages(rec, where), where))
        wheres.append(where)
    return convs, wheres


def evaluate(model_dir_or_name: str | os.PathLike, data: str, template: str | None = None, n_generate: int = 16,
             max_new_tokens: int = 64, loss_on: str = "assistant", max_length: int = 512,
             limit: int | None = None, batch_size: int = 8) -> dict:
    """``ctrltok eval``: load a checkpoint (its template from ``ctrltok.json`` unless given) and
    evaluate it on the chat records of ``data`` (the first ``limit`` of them)."""
    from ctrltok.generation.generate import load_for_generation

    model, tokenizer, saved = load_for_generation(model_dir_or_name)
    convs, wheres = load_conversations(data, limit)
    result = evaluate_model(model, tokenizer, convs, template or saved, n_generate=n_generate,
                            max_new_tokens=max_new_tokens, loss_on=loss_on, max_length=max_length,
                            batch_size=batch_size, sources=wheres)
    return {"model": str(model_dir_or_name), "data": str(data), **result}


def _manifest(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir) / "ctrltok.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def heldout_conversations(model_dir: str | os.PathLike, limit: int | None = None) -> tuple[list[list[dict]], list[str], str]:
    """The held-out conversations of the run that wrote ``model_dir``: its ``data.eval`` set, or the
    same ``eval_fraction`` split of ``data.train`` that ``dataset.build_examples`` held out (same
    seed, same ``limit``). Without a manifest: the shipped set's split with the default recipe.
    Returns ``(conversations, sources, description)``."""
    import random

    from ctrltok.core.config import Recipe

    values = _manifest(model_dir).get("recipe_values") or {}
    default = Recipe()
    data = {**vars(default.data), **(values.get("data") or {})}
    seed = (values.get("train") or {}).get("seed", default.train.seed)
    if data.get("eval"):
        convs, wheres = load_conversations(data["eval"], limit)
        return convs, wheres, str(data["eval"])
    from ctrltok.core.chat import ChatError, validate_messages
    from ctrltok.core.records import read_records
    from ctrltok.training.data import to_messages

    # The same records and the same draw as dataset.build_examples: the split is over records as
    # read (after `limit`), shuffled with the training seed; records that fail to become a
    # conversation are dropped after the split, as the encoder does under on_error = skip.
    on_error = data.get("on_error") or "raise"
    pairs = list(read_records(data["train"], on_error))
    if data.get("limit"):
        pairs = pairs[: data["limit"]]
    fraction = float(data.get("eval_fraction") or 0.0)
    if fraction <= 0 or len(pairs) < 2:
        raise ValueError(f"{model_dir}: the run held out no data (data.eval unset, data.eval_fraction = {fraction}); "
                         "pass --data with held-out chats")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    held = set(order[:max(1, int(round(len(order) * fraction)))])
    convs, wheres = [], []
    for i, (where, rec) in enumerate(pairs):
        if i not in held:
            continue
        try:
            convs.append(validate_messages(to_messages(rec, where), where))
        except ChatError:
            if on_error != "skip":
                raise
            continue
        wheres.append(where)
    if limit is not None:
        convs, wheres = convs[:limit], wheres[:limit]
    return convs, wheres, f"{data['train']} (held-out {fraction:g})"


def prepare_base(name: str | os.PathLike, model_dir: str | os.PathLike, template: str):
    """A base model with the same control tokens as the checkpoint in ``model_dir`` (the "before"),
    made by ``train.prepare_model`` from the run's own recipe values."""
    from ctrltok.core.config import Recipe, recipe_from_mapping
    from ctrltok.training.train import prepare_model

    values = {k: v for k, v in (_manifest(model_dir).get("recipe_values") or {}).items()
              if k != "source" and v is not None}
    recipe = recipe_from_mapping(values, "<ctrltok.json>") if values else Recipe()
    recipe.model.name = str(name)
    recipe.data.template = template
    model, tokenizer, _ = prepare_model(recipe)
    return model.eval(), tokenizer


def evaluate_cli(model: str | os.PathLike, data: str | None = None, template: str | None = None,
                 before: str | os.PathLike | None = None, n_generate: int = 16, max_new_tokens: int = 64,
                 loss_on: str = "assistant", max_length: int = 512, limit: int | None = None,
                 batch_size: int = 8, console=None) -> dict:
    """``ctrltok eval``: evaluate a checkpoint (and, with ``before``, a base model given the same
    tokens) on ``data`` or on the run's own held-out split. Prints a table to stderr (stdout stays
    free for ``--json``) and returns the result, or ``{"before", "after", "comparison"}``."""
    from rich.console import Console

    from ctrltok.generation.generate import load_for_generation

    console = console or Console(stderr=True)
    after_model, tokenizer, saved = load_for_generation(model)
    template = template or saved
    if data:
        convs, wheres = load_conversations(data, limit)
        described = str(data)
    else:
        convs, wheres, described = heldout_conversations(model, limit)
    kwargs = dict(n_generate=n_generate, max_new_tokens=max_new_tokens, loss_on=loss_on, max_length=max_length,
                  batch_size=batch_size, sources=wheres)
    after = {"model": str(model), "data": described,
             **evaluate_model(after_model, tokenizer, convs, template, **kwargs)}
    if before is None:
        console.print(result_table(after, title=f"{model} on {described}"))
        return after
    del after_model
    base_model, base_tokenizer = prepare_base(before, model, template)
    base = {"model": str(before), "data": described,
            **evaluate_model(base_model, base_tokenizer, convs, template, **kwargs)}
    print_comparison(base, after, console, samples=3)
    return {"before": base, "after": after, "comparison": compare(base, after)}


# -- reporting -----------------------------------------------------------------------------
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


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _verdict(metric: str, delta: float | None) -> str:
    if delta is None or delta == 0:
        return ""
    better = (metric in LOWER_IS_BETTER and delta < 0) or (metric in HIGHER_IS_BETTER and delta > 0)
    worse = (metric in LOWER_IS_BETTER and delta > 0) or (metric in HIGHER_IS_BETTER and delta < 0)
    return "[green]better[/]" if better else "[red]worse[/]" if worse else ""


def comparison_table(before: dict, after: dict, title: str = "before vs after"):
    """A rich Table of :func:`compare`."""
    from rich.table import Table

    table = Table(title=title)
    for col, justify in (("metric", "left"), ("before", "right"), ("after", "right"), ("delta", "right"), ("", "left")):
        table.add_column(col, justify=justify)
    for metric, row in compare(before, after).items():
        delta = row["delta"]
        table.add_row(metric, _fmt(row["before"]), _fmt(row["after"]),
                      "-" if delta is None else f"{delta:+.4f}" if isinstance(delta, float) else f"{delta:+d}",
                      _verdict(metric, delta))
    return table


def result_table(result: dict, title: str = "evaluation"):
    """A rich Table of one result's scalar fields."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in result.items():
        if not isinstance(v, (list, dict)):
            table.add_row(k, _fmt(v))
    return table


def print_comparison(before: dict, after: dict, console=None, samples: int = 0) -> None:
    """Print the before/after table (and the first ``samples`` generation pairs)."""
    from rich.console import Console
    from rich.markup import escape

    console = console or Console()
    console.print(comparison_table(before, after))
    for b, a in list(zip(before.get("generations", []), after.get("generations", [])))[:samples]:
        console.print(f"[bold]prompt[/] {escape(b['prompt'])}")
        for name, g in (("before", b), ("after", a)):
            end = "[green]<end of turn>[/]" if g["ended_with_eot"] else ("[yellow]<other stop>[/]" if g["stopped"]
                                                                           else "[red]<cut at limit>[/]")
            console.print(f"  [dim]{name}[/] {escape(g['text'])} {end}")


def print_result(result: dict, console=None) -> None:
    from rich.console import Console

    (console or Console()).print(result_table(result))


def write_json(result: dict, path: str | os.PathLike) -> Path:
    """Write a result (or a ``{"before", "after", "comparison"}`` dict) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
