"""`ctrltok backtranslate`: the Humpback pipeline from a recipe, and its report printed as tables."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ctrltok.backtranslate.pairs import SCORES
from ctrltok.backtranslate.pipeline import run_backtranslation
from ctrltok.cli.run import default_out
from ctrltok.core.config import load_recipe


def backtranslate(a):
    recipe = load_recipe(a.recipe, a.set)
    print_report(run_backtranslation(recipe, default_out(a, recipe)))


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
        console.print(f"{name}: {cs['samples']} samples, parse failures {cs['unparsed']} "
                      f"({cs['parse_failure_rate']}), out of range {cs['out_of_range']} "
                      f"({cs['out_of_range_rate']}); scores {hist}")
    side = Table(title=f"kept vs dropped (score >= {report['keep_score']}, {report['score_aggregate']})",
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
