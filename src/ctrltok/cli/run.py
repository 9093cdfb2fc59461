"""`ctrltok train` and `ctrltok demo`: recipe names and paths in, the training library called.

Before anything loads, ``ctrltok train`` checks the recipe's names (model, token presets, template,
charter) and what ``--out`` holds (:func:`ctrltok.training.runs.check_run`): a finished run of the
same settings is "already trained, nothing to do"; a folder made with other settings is refused with
the keys that differ. ``cli/main.py`` calls :func:`check_train` once, before it starts the other
processes of a multi-process run.
"""

from __future__ import annotations

import inspect
import os
import sys
from difflib import get_close_matches
from pathlib import Path

from ctrltok.cli.checks import (
    PRESET_NAMES,
    UsageError,
    check_model_name,
    check_template,
    default_out,
    model_vocab,
)
from ctrltok.core.config import ConfigError, Recipe, load_recipe
from ctrltok.core.templates import get_template


def check_recipe_names(recipe: Recipe) -> None:
    """The names a recipe gives, checked without loading the model: ``model.name``, ``tokens.presets``
    (known, and not already in the model), ``tokens.charter``, ``data.template`` (known, with the
    tokens it writes)."""
    src, t = recipe.source, recipe.tokens
    known = sorted(PRESET_NAMES)
    for name in t.presets:
        if name not in known:
            near = get_close_matches(name, known, n=1)
            raise ConfigError(f"{src}: tokens.presets: unknown preset {name!r}; expected some of {known}"
                              + (f" (did you mean {near[0]}?)" if near else ""))
    check_template(recipe.data.template, recipe.model.name, f"{src}: data.template")
    check_model_name(recipe.model.name, f"{src}: model.name")
    # core.tokens imports torch: imported after the checks above, which need none
    from ctrltok.core.tokens import load_charter, resolve_tokens

    charter = None
    if "epe" in t.presets or recipe.data.kind == "epe":
        try:
            charter = load_charter(t.charter)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{src}: tokens.charter: {exc}") from None
    vocab = model_vocab(recipe.model.name)
    tokens = resolve_tokens(t.presets, t.custom, charter)
    if vocab is not None:
        for tok in tokens:
            if tok.text in vocab and not tok.reuse:
                preset = next((p for p in t.presets if tok in resolve_tokens([p], None, charter)), None)
                fix = (f"leave {preset} out of tokens.presets (the model has its tokens already)" if preset
                       else "give the custom token a new spelling")
                raise ConfigError(f"{src}: model {recipe.model.name} already has the token {tok.text!r} "
                                  f"(id {vocab[tok.text]}); {fix}")
    try:
        template = get_template(recipe.data.template)
    except ValueError:
        return  # a template saved in the model folder: its tokens are the model's own
    have = {tok.text for tok in tokens} | set(vocab or {})
    if recipe.data.kind in ("chat", "epe") and template.presets and template.end_of_turn not in have:
        raise ConfigError(f"{src}: data.template = {template.name} closes turns with {template.end_of_turn!r}, which "
                          f"neither tokens.presets nor the model has; add {' and '.join(template.presets)} to "
                          "tokens.presets")


def check_train(a) -> str:
    """``ctrltok train``'s checks before anything loads: the recipe, its names, its inputs and what
    ``--out`` holds. Returns the run's status (``fresh`` / ``resume`` / ``done``), kept on ``a``."""
    from ctrltok.training.runs import check_run, run_identity

    recipe = load_recipe(a.recipe, a.set)
    check_recipe_names(recipe)
    out = default_out(a.out, recipe.name)
    status = check_run(out, recipe, run_identity(recipe), getattr(a, "resume_with_changes", False))
    a.checked = (recipe, out, status)
    if status == "done" and os.environ.get("RANK", "0") == "0":
        print(f"already trained, nothing to do: {out} holds the finished run of these settings "
              "(another --out trains again)")
    return status


def train(a):
    if getattr(a, "checked", None) is None:
        check_train(a)
    recipe, out, status = a.checked
    if status == "done":
        return 0
    from ctrltok.training.checkpoint import RunManifest
    from ctrltok.training.train import train as train_recipe

    kwargs = {}
    if "resume_with_changes" in inspect.signature(train_recipe).parameters:
        kwargs["resume_with_changes"] = a.resume_with_changes
    elif RunManifest.read(out).complete:  # train() would return at once and nothing would be trained
        raise UsageError(f"{out} holds a finished run; continuing it with changes needs a trainer that takes "
                         "resume_with_changes; train into a new --out")
    out = train_recipe(recipe, out, **kwargs)
    if os.environ.get("RANK", "0") == "0":
        print_summary(out)
        print(f"model saved in {out}")


def print_summary(out: Path) -> None:
    """What the run did to over-long examples, from its manifest (also in metrics.jsonl)."""
    from ctrltok.training.checkpoint import RunManifest

    manifest = RunManifest.read(out)
    pack = manifest.summary.get("pack") or {}
    recipe = manifest.values.get("recipe_values") or {}
    max_length = (recipe.get("data") or {}).get("max_length")
    if pack.get("truncated_examples"):
        print(f"truncated {pack['truncated_examples']:,} training examples to data.max_length = {max_length} "
              f"({pack.get('truncated_tokens', 0):,} tokens cut); raise data.max_length or set data.overlong: split "
              "to keep them", file=sys.stderr)
    if pack.get("split_examples"):
        print(f"split {pack['split_examples']:,} over-long training examples into {pack.get('split_pieces', 0):,} "
              f"pieces of at most {max_length} tokens", file=sys.stderr)
    held_out = manifest.summary.get("eval_pack") or {}  # the held-out rows' stats, where the run records them
    if isinstance(held_out, dict) and held_out.get("truncated_examples"):
        print(f"truncated {held_out['truncated_examples']:,} held-out examples to data.max_length = {max_length}",
              file=sys.stderr)


def demo(a):
    from ctrltok.cli.demo import run_demo

    return run_demo(model=a.model, out=a.out, steps=a.steps, quick=a.quick)
