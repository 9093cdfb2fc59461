"""The backtranslation report: counts per stage and drop reason, the curation parser's rates, the
score histogram (table and PNG) and kept vs dropped samples, read back from the stage files so they
cover every run that contributed to a folder (``report.json``, printed by ``ctrltok backtranslate``).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from ctrltok.backtranslate.pipeline import SCORES, Pair, _atomic_write, _read_lines
from ctrltok.core.config import BacktranslateConfig


def _stage_names(out_dir: Path, cfg: BacktranslateConfig) -> list[str]:
    names = ["segments", "augmented"] + (["rewritten"] if cfg.rewrite else [])
    for i in range(1, cfg.iterations + 1):
        names += [f"curated-{i}", f"selected-{i}"]
    return [n for n in names if (out_dir / f"{n}.jsonl").exists()]


def _clip(text: str | None, n: int = 300) -> str | None:
    return text if text is None or len(text) <= n else text[:n] + " ..."


def _sample(p: Pair) -> dict:
    return {"id": p.id, "instruction": _clip(p.instruction), "response": _clip(p.response),
            "original_response": _clip(p.original_response), "score": p.score, "drop": p.drop}


def curation_stats(path: Path) -> dict:
    """Sample-level parser counts and the histogram of parsed scores in one curation file."""
    hist = {s: 0 for s in SCORES}
    samples = unparsed = out_of_range = 0
    for pair in _read_lines(path):
        for s in pair.scores:
            samples += 1
            if s is None:
                unparsed += 1
            elif s not in SCORES:
                out_of_range += 1
            else:
                hist[s] += 1
    rate = (lambda k: round(k / samples, 4) if samples else None)
    return {"samples": samples, "parsed": samples - unparsed - out_of_range, "unparsed": unparsed,
            "out_of_range": out_of_range, "parse_failure_rate": rate(unparsed),
            "out_of_range_rate": rate(out_of_range), "histogram": hist}


def build_report(out_dir: Path, cfg: BacktranslateConfig, models: dict, gold: int) -> dict:
    """Counts per stage and drop reason, curation histograms and parser rates, sample pairs;
    written to ``report.json`` (and the histogram to ``scores.png``)."""
    stages = []
    for name in _stage_names(out_dir, cfg):
        reasons: Counter = Counter()
        total = 0
        for pair in _read_lines(out_dir / f"{name}.jsonl"):
            total += 1
            if pair.drop:
                reasons[pair.drop] += 1
        entry = {"stage": name, "in": total, "kept": total - sum(reasons.values()), "dropped": dict(reasons.most_common())}
        marker = out_dir / f"{name}.done"
        entry["complete"] = marker.exists()
        if name == "segments" and marker.exists():
            entry["documents"] = json.loads(marker.read_text()).get("stats", {}).get("documents")
        stages.append(entry)
    curation = {name: curation_stats(out_dir / f"{name}.jsonl") for name in _stage_names(out_dir, cfg)
                if name.startswith("curated-")}
    training = {}
    for marker in sorted(out_dir.glob("*.done")):
        info = json.loads(marker.read_text())
        if "model" in info:
            training[marker.stem] = info
    samples: dict[str, list] = {"kept": [], "dropped": []}
    last = cfg.iterations
    n = cfg.report_samples
    for name in (f"selected-{last}", f"curated-{last}"):
        for pair in _read_lines(out_dir / f"{name}.jsonl"):
            key = "dropped" if pair.drop else "kept"
            if name.startswith("curated-") and key == "kept":
                continue  # kept by the curator is not kept: select decides
            if len(samples[key]) < n:
                samples[key].append(_sample(pair))
    report = {"out_dir": str(out_dir), "gold_pairs": gold, "stages": stages, "training": training,
              "curation": curation, "score_aggregate": cfg.score_aggregate, "keep_score": cfg.keep_score,
              "samples": samples, "models": models}
    if curation:
        report["histogram_png"] = str(_plot(curation, out_dir / "scores.png"))
    _atomic_write(out_dir / "report.json", json.dumps(report, indent=2, ensure_ascii=False))
    return report


def _plot(curation: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(curation)
    for k, (name, stats) in enumerate(curation.items()):
        xs = [s + (k - (len(curation) - 1) / 2) * width for s in SCORES]
        ax.bar(xs, [stats["histogram"][s] for s in SCORES], width=width,
               label=f"{name} (parse failures {stats['parse_failure_rate']})")
    ax.set_xticks(list(SCORES))
    ax.set_xlabel("curation score")
    ax.set_ylabel("samples")
    ax.set_title("Self-curation scores")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def print_report(report: dict, console: Any = None) -> None:
    """The report as rich tables: stages, curation, and kept vs dropped pairs side by side."""
    from rich.console import Console
    from rich.table import Table

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

    from rich.markup import escape

    for k in range(max(len(kept_), len(dropped))):
        a = kept_[k] if k < len(kept_) else None
        b = dropped[k] if k < len(dropped) else None
        side.add_row(*(cell({**s, "instruction": escape(s["instruction"] or ""), "response": escape(s["response"] or "")})
                       if s else "" for s in (a, b)))
    console.print(side)
