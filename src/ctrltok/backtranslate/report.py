"""The backtranslation report: counts per stage and drop reason, the curation parser's rates, the
score histogram (table and PNG) and kept vs dropped samples, read back from the stage files so they
cover every run that contributed to a folder (``report.json``; :mod:`ctrltok.cli.backtranslate`
prints it as tables).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from matplotlib.figure import Figure

from ctrltok.backtranslate.pairs import REPORT_FILE, SCORES, Pair, kept, on_scale, read_pairs
from ctrltok.backtranslate.stages import keep_threshold
from ctrltok.core.config import LIKELIHOOD_SCORINGS, BacktranslateConfig
from ctrltok.core.stages import atomic_write

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


def curation_stats(path: Path, scoring: str = "generated") -> dict:
    """Sample-level parser counts and the histogram of parsed scores in one curation file (with
    ``scoring: likelihood`` or ``pmi`` nothing is parsed: the spread of the scores instead, under
    the scoring's name)."""
    hist = {s: 0 for s in SCORES}
    samples = unparsed = out_of_range = between = 0
    expected: list[tuple[float, float]] = []  # (score, digit mass) of curation_scoring: expected
    likelihood: list[float] = []  # curation_scoring: likelihood or pmi (nats per token)
    for pair in read_pairs(path):
        if pair.score_probs is not None and pair.score is not None:
            expected.append((pair.score, sum(pair.score_probs)))
        elif scoring in LIKELIHOOD_SCORINGS and pair.score is not None:
            likelihood.append(pair.score)
        for s in pair.scores:
            samples += 1
            if s is None:
                unparsed += 1
            elif not on_scale(s):
                out_of_range += 1
            elif s in hist:
                hist[s] += 1
            else:  # parsed, on the scale, between whole points: not a histogram bar
                between += 1
    rate = (lambda k: round(k / samples, 4) if samples else None)
    stats = {"samples": samples, "parsed": samples - unparsed - out_of_range, "unparsed": unparsed,
             "out_of_range": out_of_range, "parse_failure_rate": rate(unparsed),
             "out_of_range_rate": rate(out_of_range), "histogram": hist, "between_points": between}
    if expected:  # the graded scores, and how much of the curator's next token went to a digit at all
        scores = sorted(s for s, _ in expected)
        stats["expected"] = {"pairs": len(scores), "min": round(scores[0], 3), "median": round(scores[len(scores) // 2], 3),
                             "max": round(scores[-1], 3),
                             "mean_digit_probability": round(sum(m for _, m in expected) / len(expected), 4)}
    if likelihood:
        ranked = sorted(likelihood)
        stats[scoring] = {"pairs": len(ranked), "min": round(ranked[0], 3),
                          "median": round(ranked[len(ranked) // 2], 3), "max": round(ranked[-1], 3)}
    return stats


def build_report(out_dir: Path, cfg: BacktranslateConfig, models: dict, gold: int) -> dict:
    """Counts per stage and drop reason, curation histograms and parser rates, sample pairs;
    written to ``report.json`` (and the histogram to ``scores.png``)."""
    stages = []
    for name in _stage_names(out_dir, cfg):
        reasons: Counter = Counter()
        total = 0
        for pair in read_pairs(out_dir / f"{name}.jsonl"):
            total += 1
            if pair.drop:
                reasons[pair.drop] += 1
        entry = {"stage": name, "in": total, "kept": total - sum(reasons.values()), "dropped": dict(reasons.most_common())}
        marker = out_dir / f"{name}.done"
        entry["complete"] = marker.exists()
        if name == "segments" and marker.exists():  # the segmenter's own counters, kept in its marker
            entry["documents"] = json.loads(marker.read_text()).get("stats", {}).get("documents")
        stages.append(entry)
    curation = {name: {**curation_stats(out_dir / f"{name}.jsonl", cfg.curation_scoring),  # and the score select kept from
                       "keep_threshold": keep_threshold((p.score for p in kept(out_dir / f"{name}.jsonl")), cfg)}
                for name in _stage_names(out_dir, cfg) if name.startswith("curated-")}
    training = {}
    for marker in sorted(out_dir.glob("*.done")):
        info = json.loads(marker.read_text())
        if "model" in info:
            training[marker.stem] = info
    samples: dict[str, list] = {"kept": [], "dropped": []}
    last = cfg.iterations
    n = cfg.report_samples
    for name in (f"selected-{last}", f"curated-{last}"):
        for pair in read_pairs(out_dir / f"{name}.jsonl"):
            key = "dropped" if pair.drop else "kept"
            if name.startswith("curated-") and key == "kept":
                continue  # kept by the curator is not kept: select decides
            if len(samples[key]) < n:
                samples[key].append(_sample(pair))
    report = {"out_dir": str(out_dir), "gold_pairs": gold, "stages": stages, "training": training,
              "curation": curation, "curation_scoring": cfg.curation_scoring, "score_aggregate": cfg.score_aggregate,
              "keep_score": cfg.keep_score, "keep_fraction": cfg.keep_fraction,
              "samples": samples, "models": models}
    if any(c["samples"] for c in curation.values()):  # a histogram of parsed scores to draw
        report["histogram_png"] = str(_plot(curation, out_dir / "scores.png"))
    atomic_write(out_dir / REPORT_FILE, json.dumps(report, indent=2, ensure_ascii=False))
    return report


def _plot(curation: dict, path: Path) -> Path:
    """The score histogram of each curation round, bars side by side (no display needed)."""
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
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
    return path
