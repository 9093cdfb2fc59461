"""Throughput and memory of `ctrltok label` (segmentation + scoring + labelling), and the
measurements behind the choice of sentence splitter and of the default scorer.

    python bench/label_throughput.py                 # full run (~2 min on 2 cores)
    python bench/label_throughput.py --quick         # smaller corpus, for a smoke check

Corpus: ../shared/data c4_sample + wikipedia_sample documents repeated to >= 100k sentences
(each copy gets a distinct id). Every configuration runs in a fresh subprocess so its peak RSS
(main process and, separately, the largest worker) is its own. Runs are interleaved (1 2 1 2) and
medians are quoted, since this machine's speed drifts within seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ctrltok.conditional.scorers import get_scorer
from ctrltok.core.segment import ABBREVIATIONS, split_sentences

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SOURCES = [SHARED / "c4_sample" / "c4_demo.jsonl", SHARED / "wikipedia_sample" / "wiki_demo.jsonl"]


def load_docs() -> list[str]:
    docs = [json.loads(line)["text"] for src in SOURCES if src.exists() for line in src.open()]
    if not docs:
        sys.exit("../shared/data is absent: this benchmark needs c4_sample / wikipedia_sample")
    return docs


def write_corpus(path: Path, docs: list[str], min_sentences: int) -> int:
    per_copy = sum(len(split_sentences(d)) for d in docs)
    copies = -(-min_sentences // per_copy)
    with path.open("w") as fh:
        for c in range(copies):
            for i, d in enumerate(docs):
                fh.write(json.dumps({"id": f"{c}-{i}", "text": d}) + "\n")
    return per_copy * copies


def run_label(corpus: Path, processes: int) -> dict:
    """One labelling run in a fresh interpreter; returns its summary plus timing and peak RSS."""
    code = f"""
import json, resource, sys, time, tempfile
from ctrltok.cli.label import label_file
from ctrltok.conditional.scorers import get_scorer
get_scorer("profanity")  # import + model load (~1-4 s) is start-up, not throughput
out = tempfile.mkdtemp() + "/out.jsonl"
t = time.perf_counter()
s = label_file({str(corpus)!r}, out, processes={processes}, quiet=True)
dt = time.perf_counter() - t
print(json.dumps({{"segments": s["segments"], "documents": s["documents"], "seconds": dt,
    "rss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    "fraction_misaligned": s["fraction_misaligned"], "unprefixed": s["unprefixed"]}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_splitters(docs: list[str], reps: int) -> dict:
    """Speed (interleaved) and suspicious-split counts of regex vs pysbd on the C4 documents."""
    c4 = [json.loads(line)["text"] for line in SOURCES[0].open()] if SOURCES[0].exists() else docs
    sample = c4[:60]
    times = {"regex": [], "pysbd": []}
    counts = {}
    for _ in range(reps):
        for method in ("regex", "pysbd"):
            t = time.perf_counter()
            n = sum(len(split_sentences(d, method)) for d in sample)
            times[method].append(time.perf_counter() - t)
            counts[method] = n
    suspicious = {}
    for method in ("regex", "pysbd"):
        bad = 0
        total = 0
        for d in c4:
            pieces = split_sentences(d, method)
            for prev, nxt in zip(pieces, pieces[1:]):
                total += 1
                last = prev.rstrip().split()[-1].lower().rstrip(".") if prev.strip() else ""
                after_abbrev = prev.rstrip().endswith(".") and (last in ABBREVIATIONS or re.fullmatch(r"[a-z]", last))
                # a cut before a lower-case word or inside a number/URL (no whitespace at the cut)
                inside = not prev[-1].isspace() and not nxt[0].isspace()
                if after_abbrev or nxt[0].islower() or inside:
                    bad += 1
        suspicious[method] = {"boundaries": total, "suspicious": bad}
    return {"docs": len(sample), "sentences": counts,
            "median_s": {m: statistics.median(v) for m, v in times.items()},
            "sentences_per_s": {m: counts[m] / statistics.median(times[m]) for m in times},
            "suspicious_on_all_c4": suspicious}


def bench_parts(docs: list[str]) -> dict:
    """Segmentation alone and scoring alone, in this process, for the breakdown."""
    t = time.perf_counter()
    sents = [s for d in docs for s in split_sentences(d)]
    seg = len(sents) / (time.perf_counter() - t)
    scorer = get_scorer("profanity")
    t = time.perf_counter()
    for i in range(0, len(sents), 512):
        scorer.score(sents[i:i + 512])
    score = len(sents) / (time.perf_counter() - t)
    return {"sentences": len(sents), "segment_per_s": seg, "score_per_s": score}


def bench_scorer_quality() -> dict:
    """ROC AUC of the default scorer on labelled toxic-comment samples (when present)."""
    from sklearn.metrics import roc_auc_score

    scorer = get_scorer("profanity")
    out = {}
    jig = SHARED / "jigsaw_toxic_sample" / "test_examples.jsonl"
    if jig.exists():
        rows = [json.loads(line) for line in jig.open()]
        y = [r["toxic"] for r in rows]
        out["jigsaw_toxic_sample"] = {"n": len(rows), "positives": sum(y),
                                      "auc": roc_auc_score(y, scorer.score([r["comment_text"] for r in rows]))}
    dav = SHARED / "davidson_hate_offensive" / "labeled_data.jsonl"
    if dav.exists():
        rows = [json.loads(line) for line in dav.open()]
        y = [int(r["class"] != 2) for r in rows]
        out["davidson (seen in training)"] = {"n": len(rows), "positives": sum(y),
                                               "auc": roc_auc_score(y, scorer.score([r["tweet"] for r in rows]))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sentences", type=int, default=100_000)
    args = ap.parse_args()
    n_target = 20_000 if args.quick else args.sentences
    docs = load_docs()
    tmp = Path(tempfile.mkdtemp())
    small, large = tmp / "small.jsonl", tmp / "large.jsonl"
    n_small = write_corpus(small, docs, n_target)
    n_large = write_corpus(large, docs, 4 * n_target)
    print(f"corpus: {n_small} sentences ({small.stat().st_size / 1e6:.0f} MB), "
          f"large: {n_large} sentences ({large.stat().st_size / 1e6:.0f} MB); cpu count {os.cpu_count()}")

    print("\n# splitter: regex vs pysbd (C4 sample, interleaved)")
    sp = bench_splitters(docs, reps=1 if args.quick else 3)
    for m in ("regex", "pysbd"):
        s = sp["suspicious_on_all_c4"][m]
        print(f"{m:6} {sp['sentences'][m]:6d} sentences in {sp['median_s'][m]:7.3f} s = "
              f"{sp['sentences_per_s'][m]:9.0f} sentences/s; suspicious cuts on all C4: "
              f"{s['suspicious']} of {s['boundaries']}")
    print(f"regex / pysbd speed: {sp['sentences_per_s']['regex'] / sp['sentences_per_s']['pysbd']:.0f}x")

    print("\n# default scorer quality (ROC AUC)")
    for name, q in bench_scorer_quality().items():
        print(f"{name:28} n={q['n']:6d} positives={q['positives']:6d} AUC={q['auc']:.3f}")

    print("\n# parts, in-process (one core)")
    parts = bench_parts(docs)
    print(f"segmentation {parts['segment_per_s']:.0f} sentences/s, scoring {parts['score_per_s']:.0f} sentences/s")

    print("\n# label_file: segmentation + scoring + labelling + writing, by processes (interleaved)")
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for _ in range(1 if args.quick else 2):
        for p in (1, 2):
            runs[p].append(run_label(small, p))
    print(f"{'processes':>9} {'sentences':>10} {'median s':>9} {'sentences/s':>12} {'RSS main MB':>12} {'RSS worker MB':>14}")
    for p, rs in runs.items():
        sec = statistics.median(r["seconds"] for r in rs)
        print(f"{p:>9} {rs[0]['segments']:>10} {sec:>9.2f} {rs[0]['segments'] / sec:>12.0f} "
              f"{max(r['rss_main_mb'] for r in rs):>12.0f} {max(r['rss_worker_mb'] for r in rs):>14.0f}")
    speedup = statistics.median(r["seconds"] for r in runs[1]) / statistics.median(r["seconds"] for r in runs[2])
    print(f"2 processes / 1 process: {speedup:.2f}x")

    print("\n# memory vs corpus size (processes=2)")
    big = run_label(large, 2)
    r_small = runs[2][0]
    print(f"{'sentences':>10} {'seconds':>8} {'sentences/s':>12} {'RSS main MB':>12} {'RSS worker MB':>14}")
    for r in (r_small, big):
        print(f"{r['segments']:>10} {r['seconds']:>8.2f} {r['segments'] / r['seconds']:>12.0f} "
              f"{r['rss_main_mb']:>12.0f} {r['rss_worker_mb']:>14.0f}")
    print(f"identical labels across processes: "
          f"{runs[1][0]['unprefixed'] == runs[2][0]['unprefixed']} (unprefixed {runs[1][0]['unprefixed']}, "
          f"fraction above threshold {runs[1][0]['fraction_misaligned']:.4f})")


if __name__ == "__main__":
    main()
