"""`ctrltok backtranslate`: the Humpback pipeline from a recipe, and its report printed as tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ctrltok.backtranslate.pairs import SCORES, SETTINGS_FILE
from ctrltok.backtranslate.pipeline import run_backtranslation
from ctrltok.cli.checks import check_model_name, default_out
from ctrltok.core.config import LIKELIHOOD_SCORINGS, BacktranslateConfig, ConfigError, Recipe, load_recipe
from ctrltok.core.inputs import input_fingerprint, model_fingerprint
from ctrltok.core.records import RecordError
from ctrltok.training.runs import check_inputs


def backtranslate(a):
    recipe = load_recipe(a.recipe, a.set)
    out = default_out(a.out, recipe.name)
    check_model_name(recipe.model.name, f"{recipe.source}: model.name")
    check_same_inputs(recipe, out)
    print_report(run_backtranslation(recipe, out))


def check_same_inputs(recipe: Recipe, out: Path) -> None:
    """Refuse to continue the pipeline in ``out`` over other inputs (corpus, gold pairs, prompts,
    model): its finished stages would keep what the earlier inputs gave. The inputs' fingerprints
    are recorded in ``out`` when the pipeline first starts there."""
    cfg = recipe.backtranslate or BacktranslateConfig()
    inputs = {}
    for key in ("corpus", "gold", "backward_system", "rewrite_prompt", "curation_prompt"):
        value = getattr(cfg, key)
        if key == "corpus" and value.startswith("python:"):
            inputs[f"backtranslate.{key}"] = {"builtin": value}
            continue
        try:
            inputs[f"backtranslate.{key}"] = input_fingerprint(value)
        except RecordError as exc:
            raise ConfigError(f"{recipe.source}: backtranslate.{key}: {exc}") from None
    inputs["model.name"] = model_fingerprint(recipe.model.name) or {"name": recipe.model.name}
    started = (out / SETTINGS_FILE).is_file()
    check_inputs(out, inputs, started, "backtranslation")


def print_report(report: dict, console: Any = None) -> None:
    """The report as rich tables: stages, curation, and kept vs dropped pairs side by side."""
    console = console or Console()
    table = Table(title=f"Backtranslation: {report['out_dir']}")
    for col in ("stage", "in", "kept", "dropped", "reasons"):
        table.add_column(col, justify="right" if col in ("in", "kept", "dropped") else "left")
    for st in report["stages"]:
        reasons = ", ".join(f"{r} {c}" for r, c in st["dropped"].items())
        name = st["stage"] + ("" if st["complete"] else " (partial)")
        if st.get("documents") is not None:
            name += f" ({st['documents']} docs)"
        table.add_row(name, str(st["in"]), str(st["kept"]), str(sum(st["dropped"].values())), reasons)
    for name, info in report["training"].items():
        table.add_row(f"train {name}", str(info["examples"]), "", "", info["model"])
    console.print(table)
    for name, cs in report["curation"].items():
        hist = "  ".join(f"{s}: {cs['histogram'][s]}" for s in SCORES)
        nats = next((cs[k] for k in LIKELIHOOD_SCORINGS if k in cs), None)  # curation_scoring: likelihood or pmi
        if cs["samples"] or nats is None:  # likelihood and pmi curation parse nothing
            console.print(f"{name}: {cs['samples']} samples, parse failures {cs['unparsed']} "
                          f"({cs['parse_failure_rate']}), out of range {cs['out_of_range']} "
                          f"({cs['out_of_range_rate']}); scores {hist}"
                          + (f"; {cs['between_points']} between whole points" if cs.get("between_points") else ""))
        if "expected" in cs:  # curation_scoring: expected
            ex = cs["expected"]
            console.print(f"{name}: expected scores of {ex['pairs']} pairs: min {ex['min']}, median {ex['median']}, "
                          f"max {ex['max']}; the curator's next token is a digit with probability "
                          f"{ex['mean_digit_probability']} on average")
        if nats is not None:
            what = ("how much the instruction raises the response's likelihood"
                    if report.get("curation_scoring") == "pmi" else "likelihood of the response given the instruction")
            console.print(f"{name}: {what}, {nats['pairs']} pairs: "
                          f"min {nats['min']}, median {nats['median']}, max {nats['max']} nats per token")
    scoring = report.get("curation_scoring")
    how = scoring if scoring in ("expected", *LIKELIHOOD_SCORINGS) else report["score_aggregate"]
    last = list(report["curation"].values())[-1] if report["curation"] else {}
    rule = (f"the best {report['keep_fraction']:.0%}: score >= {last.get('keep_threshold', report['keep_score']):.3g}"
            if report.get("keep_fraction") else f"score >= {report['keep_score']}")
    side = Table(title=f"kept vs dropped ({rule}, {how})",
                 show_lines=True)
    side.add_column("kept")
    side.add_column("dropped")
    kept_, dropped = report["samples"]["kept"], report["samples"]["dropped"]

    def cell(s: dict | None) -> str:
        if s is None:
            return ""
        return f"[bold]{s['instruction']}[/bold]\n{s['response']}\nscore {s['score']} {s['drop'] or ''}"

    for k in range(max(len(kept_), len(dropped))):
        a = kept_[k] if k < len(kept_) else None
        b = dropped[k] if k < len(dropped) else None
        side.add_row(*(cell({**s, "instruction": escape(s["instruction"] or ""), "response": escape(s["response"] or "")})
                       if s else "" for s in (a, b)))
    console.print(side)
