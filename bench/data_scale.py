"""The scale data path at two corpus sizes 10x apart (issue 11's benchmark): `ctrltok prepare`
tokens/s and peak RSS, bytes on disk per token, time from `ctrltok train` start to the first
optimizer step, peak RSS of a 2-step training from the prepared folder, and the loader's share
of a step.

    python bench/data_scale.py                    # text + labelled, 20k and 200k documents (~45 min)
    python bench/data_scale.py --kinds text --sizes 200000 --phases prepare   # one part (each < 10 min)
    python bench/data_scale.py --kinds text --phases train probe              # both sizes, interleaved
    python bench/data_scale.py --report           # the table again, from the saved results
    python bench/data_scale.py --quick            # 1k / 10k documents, one rep: a smoke run

Corpus: the plain text of ../shared/data (c4_sample, commoncrawl_dolma_sample lines as
paragraphs; wikipedia_sample articles, which have no line breaks, in runs of 6 sentences), each
paragraph split into sentences by ``ctrltok.core.segment.split_sentences``. Document ``i`` is the
run of consecutive pool sentences that starts at a hashed place and reaches a hashed length of
150-1,350 characters (mean ~900 characters, ~260 tokens); so documents are recombined, not
repeated. Labelled documents get ``segments`` (those sentences, which concatenate to the text)
with hashed controls, 1% none (the drop), 10% misaligned, the rest aligned, and a hashed score:
the layout `ctrltok label` writes. ``labelled-raw``: the text corpus under ``data.kind:
labelled``, labelled inside the prepare pass (split, scored by ``profanity``, threshold 0.5). A
fixed held-out file of 16 documents (``data.eval``) goes with every size, so the evaluation
before step 1 is the same work at both. The model: ``model.init: scratch``, a 2-layer, 64-wide
Llama with the embedded SmolLM2 tokenizer (the shape of recipes/conditional-cpu.yaml); rows of
256 tokens (``overlong: chunk``), 4 rows x 2 accumulation steps per optimizer step.

Every measurement runs in a fresh subprocess with ``OMP_NUM_THREADS=1`` (on a shared 2-core
machine OpenMP's spin-waiting makes 2-thread steps erratic): peak RSS is ``os.wait4``'s (the
largest process of the tree, main or worker), and VmHWM is sampled from /proc for the main
process and its workers apart. Time to the first step runs from just before the `ctrltok train`
process starts until its ``metrics.jsonl`` holds the step-1 record (polled every 10 ms); the main
process's CPU seconds at that moment are recorded too (far steadier than wall time under other
people's load). The first training run on a prepared folder builds its row plan (``plans/``),
later runs open it: both are reported ("cold" / "warm"; warm = median of reps interleaved 1x 10x
1x 10x). The loader's share comes from an in-process run of the real loop
(``ctrltok.training.train.train``) with ``rank_rows`` and ``to_batch`` wrapped in timers: per step
(after the first), their time against the whole step, medians; the same process times the
corpus-dependent part of setup (opening the folder, building and opening the plan).

Results are kept in WORK/results.json (default WORK: /tmp/ctrltok-data-scale), so kinds, sizes and
phases can run as separate commands; the table is printed from all of them. Without
../shared/data the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SOURCES = [("c4_sample/c4_demo.jsonl", "lines"), ("wikipedia_sample/wiki_demo.jsonl", "sentences"),
           ("commoncrawl_dolma_sample/cc_docs.jsonl", "lines")]
CTRLTOK = [sys.executable, "-m", "ctrltok"]
EVAL_DOCS = 16
EVAL_OFFSET = 10**9  # document indices of the held-out file (disjoint from every corpus's)
MODEL = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 256}
# kind -> (corpus layout, data.kind): labelled-raw is the text corpus labelled inside the prepare pass
KINDS = {"text": ("text", "text"), "labelled": ("labelled", "labelled"), "labelled-raw": ("text", "labelled")}
TARGETS = {"rss_ratio": 1.2, "first_step_ratio": 1.5, "loader_share": 0.05, "bytes_per_token": 4.0}
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CTRLTOK_PROGRESS": "0", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONUNBUFFERED": "1"}


# -- corpus ------------------------------------------------------------------------------------
def _mix(seed: int, index: int) -> int:
    from ctrltok.data.documents import mix64
    return mix64(seed, index)


def paragraph_pool() -> list[list[str]]:
    """Paragraphs of the shared plain text, each as its sentences (which concatenate to it)."""
    from ctrltok.core.segment import split_sentences
    pool: list[list[str]] = []
    for name, how in SOURCES:
        path = SHARED / name
        if not path.exists():
            continue
        for line in path.open(encoding="utf-8"):
            text = json.loads(line)["text"]
            if how == "lines":
                pool.extend(s for s in (split_sentences(p.strip()) for p in text.split("\n") if p.strip()) if s)
            else:
                sents = split_sentences(text)
                pool.extend(sents[k:k + 6] for k in range(0, len(sents), 6))
    return pool


def document(pool: list[list[str]], i: int, seed: int = 0) -> list[str]:
    """Document ``i``'s sentences: consecutive sentences of the pool from a hashed place up to a
    hashed length (150-1,350 characters); a paragraph's last sentence keeps its newline."""
    h = _mix(seed, i)
    target = 150 + (h >> 32) % 1200
    k = (h & 0xFFFFFFFF) % len(pool)
    j = (h >> 16) % len(pool[k])
    sents: list[str] = []
    chars = 0
    while chars < target:
        para = pool[k % len(pool)]
        s = para[j] if j < len(para) - 1 else para[j].rstrip() + "\n"
        sents.append(s)
        chars += len(s)
        j += 1
        if j == len(para):
            j, k = 0, k + 1
    sents[-1] = sents[-1].rstrip() or sents[-1]
    return sents


def write_corpus(path: Path, kind: str, pool: list[list[str]], indices: range, seed: int = 0) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for i in indices:
            sents = document(pool, i, seed)
            if kind == "text":
                rec = {"text": "".join(sents)}
            else:
                segs = []
                for j, s in enumerate(sents):
                    u = _mix(seed + 1, i * 4096 + j) / 2.0**64
                    control = None if u < 0.01 else "misaligned" if u < 0.11 else "aligned"
                    segs.append({"text": s, "score": round(u, 4), "control": control})
                rec = {"segments": segs}
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    tmp.rename(path)


def recipe_file(work: Path, name: str, kind: str, train: Path, eval_: Path, workers: int) -> Path:
    import yaml
    recipe = {
        "name": f"data-scale-{kind}",
        "model": {"name": "smollm2-135m", "init": "scratch", "config": MODEL},
        "data": {"kind": kind, "train": str(train), "eval": str(eval_), "max_length": 256, "workers": workers},
        "train": {"max_steps": 2, "micro_batch_size": 4, "grad_accum": 2, "lr": 3.0e-3, "seed": 42},
    }
    if kind == "labelled":
        recipe["tokens"] = {"presets": ["conditional"]}
        recipe["conditional"] = {"scorer": "profanity", "threshold": 0.5}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# -- measuring a subprocess --------------------------------------------------------------------
def _hwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (its own threads, not its children)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def run_measured(cmd: list[str], watch: Path | None = None, log: Path | None = None) -> dict:
    """Run ``cmd``; wall time, peak RSS (wait4: the largest process of its tree), sampled VmHWM of
    the main process and of its largest descendant, and the times at which ``watch`` (a JSON-lines
    file) first held each kind of record."""
    import psutil
    env = {**os.environ, **ENV}
    out = open(log, "w") if log else subprocess.DEVNULL
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    main_hwm = child_hwm = 0
    seen: dict[str, float] = {}
    cpu: dict[str, float] = {}
    ps = psutil.Process(proc.pid)
    # waitid(WNOWAIT) sees the exit without reaping, so wait4 below can read the tree's rusage
    while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        main_hwm = max(main_hwm, _hwm_kb(proc.pid))
        try:
            for child in ps.children(recursive=True):
                child_hwm = max(child_hwm, _hwm_kb(child.pid))
        except psutil.Error:
            pass
        if watch is not None and "step1" not in seen and watch.exists():
            now = time.perf_counter() - t0
            for line in watch.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:  # a line being written
                    continue
                key = "setup" if rec.get("event") == "setup" else "step1" if "loss" in rec and rec.get("step") == 1 \
                    else "eval0" if rec.get("step") == 0 else None
                if key and key not in seen:
                    seen[key] = now
                    cpu[key] = _cpu_s(proc.pid)
        time.sleep(0.01)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = rc = os.waitstatus_to_exitcode(status)
    if log:
        out.close()
    if rc != 0:
        tail = log.read_text()[-3000:] if log else ""
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({rc}):\n{tail}")
    peak = usage.ru_maxrss  # KB on Linux: the largest RSS of the process and its reaped descendants
    return {"wall_s": wall, "peak_rss_mb": peak / 1024, "main_hwm_mb": main_hwm / 1024,
            "worker_hwm_mb": child_hwm / 1024, "times": seen,
            "cpu_times": cpu, "user_s": usage.ru_utime, "sys_s": usage.ru_stime}


def folder_bytes(path: Path, exclude: tuple[str, ...] = ("plans",)) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not any(p in f.parts for p in exclude))


# -- the loader probe (runs in its own process) ------------------------------------------------
def loader_probe(recipe_path: str, data_dir: str, out: str, steps: int, result: str) -> None:
    """The real training loop with ``rank_rows`` / ``to_batch`` timed; writes per-step figures."""
    import torch

    from ctrltok.core.config import load_recipe
    from ctrltok.training import train as loop
    torch.set_num_threads(2)
    starts: list[float] = []
    loader: list[float] = []
    orig_rows, orig_batch = loop.rank_rows, loop.to_batch

    def rank_rows(*a, **k):
        t = time.perf_counter()
        starts.append(t)
        loader.append(0.0)
        rows = orig_rows(*a, **k)
        loader[-1] += time.perf_counter() - t
        return rows

    def to_batch(*a, **k):
        t = time.perf_counter()
        b = orig_batch(*a, **k)
        if loader:
            loader[-1] += time.perf_counter() - t
        return b

    recipe = load_recipe(recipe_path, [f"data.train={data_dir}", f"train.max_steps={steps}"])
    setup = data_setup_times(recipe, Path(data_dir))
    loop.rank_rows, loop.to_batch = rank_rows, to_batch
    loop.train(recipe, out, progress=False)
    step_s = [b - a for a, b in zip(starts, starts[1:])][1:]  # steps 2..N-1 (the first warms up)
    share = [ld / s for ld, s in zip(loader[1:], step_s)]
    Path(result).write_text(json.dumps({"step_s": step_s, "loader_s": loader[1:len(step_s) + 1], "share": share,
                                        "setup": setup}))


def data_setup_times(recipe, folder: Path, reps: int = 3) -> dict:
    """The corpus-dependent part of a run's setup, in process (medians of ``reps``): opening the
    prepared folder, building the train row plan (what the first run on a folder does), opening a
    built plan (every later run), and the first step's rows."""
    from ctrltok.data.loader import RowSource, plan_key, prepared_rows
    from ctrltok.data.plan import RowPlan
    from ctrltok.data.store import PreparedData
    from ctrltok.training import train as loop
    d = recipe.data
    prepared_rows(PreparedData.open(folder), "train", d)  # the run's own plan, built if missing
    out: dict[str, list] = {"open_s": [], "plan_build_s": [], "plan_open_s": [], "first_rows_s": []}
    for _ in range(reps):
        t = time.perf_counter()
        data = PreparedData.open(folder)
        out["open_s"].append(time.perf_counter() - t)
        tmp = folder / "plans" / f"bench-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        t = time.perf_counter()
        RowPlan.write(tmp, data.train.lengths(), d.max_length, d.overlong, d.packing)
        out["plan_build_s"].append(time.perf_counter() - t)
        t = time.perf_counter()
        plan = RowPlan.open(folder / "plans" / plan_key(d, "train"))
        out["plan_open_s"].append(time.perf_counter() - t)
        t = time.perf_counter()
        per_step = recipe.train.micro_batch_size * recipe.train.grad_accum
        loop.rank_rows(RowSource(data.train, plan), 0, per_step, 0, per_step, recipe.train.seed)
        out["first_rows_s"].append(time.perf_counter() - t)
        shutil.rmtree(tmp, ignore_errors=True)
    return {k: statistics.median(v) for k, v in out.items()}


# -- the phases -------------------------------------------------------------------------------
class Bench:
    def __init__(self, work: Path, workers: int):
        self.work, self.workers = work, workers
        self.results_path = work / "results.json"
        self.results = json.loads(self.results_path.read_text()) if self.results_path.exists() else {}
        self._pool = None

    def save(self) -> None:
        self.results_path.write_text(json.dumps(self.results, indent=1))

    def pool(self) -> list[list[str]]:
        if self._pool is None:
            t = time.perf_counter()
            self._pool = paragraph_pool()
            print(f"paragraph pool: {len(self._pool):,} paragraphs, "
                  f"{sum(len(s) for p in self._pool for s in p) / 1e6:.2f} M chars ({time.perf_counter() - t:.1f} s)",
                  flush=True)
        return self._pool

    def recipe(self, kind: str, n: int) -> Path:
        """The recipe of ``kind`` at ``n`` documents (its corpus written first if missing)."""
        corpus = self.work / "corpus"
        corpus.mkdir(parents=True, exist_ok=True)
        layout, data_kind = KINDS[kind]
        eval_path = corpus / f"{layout}-eval.jsonl"
        if not eval_path.exists():
            write_corpus(eval_path, layout, self.pool(), range(EVAL_OFFSET, EVAL_OFFSET + EVAL_DOCS))
        path = corpus / f"{layout}-{n}.jsonl"
        if not path.exists():
            t = time.perf_counter()
            write_corpus(path, layout, self.pool(), range(n))
            print(f"  wrote {path.name} ({path.stat().st_size / 1e6:,.0f} MB) in {time.perf_counter() - t:.1f} s",
                  flush=True)
        return recipe_file(self.work, f"{kind}-{n}", data_kind, path, eval_path, self.workers)

    def prepared(self, kind: str, n: int) -> Path:
        return self.work / "prepared" / f"{kind}-{n}"

    def prepare(self, kind: str, n: int) -> None:
        recipe = self.recipe(kind, n)
        prepared = self.prepared(kind, n)
        shutil.rmtree(prepared, ignore_errors=True)
        m = run_measured(CTRLTOK + ["prepare", str(recipe), "--out", str(prepared), "--workers", str(self.workers)],
                         log=self.work / f"prepare-{kind}-{n}.log")
        manifest = json.loads((prepared / "ctrltok-data.json").read_text())
        tokens = sum(s["tokens"] for s in manifest["splits"].values())
        docs = sum(s["documents"] for s in manifest["splits"].values())
        nbytes = folder_bytes(prepared)
        key = f"{kind}/{n}"
        corpus = self.work / "corpus" / f"{KINDS[kind][0]}-{n}.jsonl"
        self.results[key] = {"kind": kind, "documents": docs, "tokens": tokens, "corpus_mb": corpus.stat().st_size / 1e6,
                             "prepare": m, "prepare_tokens_per_s": tokens / m["wall_s"], "disk_bytes": nbytes,
                             "bytes_per_token": nbytes / tokens, "train_cold": None, "train_warm": [], "loader": None,
                             "machine": machine()}
        self.save()
        print(f"  {key}: prepare {m['wall_s']:.1f} s, {tokens / m['wall_s']:,.0f} tokens/s, peak RSS "
              f"{m['peak_rss_mb']:.0f} MB, {nbytes / tokens:.2f} bytes/token", flush=True)

    def train(self, kind: str, sizes: list[int], reps: int) -> None:
        """The cold run (builds the row plan) per size, then warm reps interleaved 1x 10x 1x 10x ..."""
        order = [("cold", n) for n in sizes] + [("warm", n) for _ in range(reps) for n in sizes]
        for n in sizes:
            self.results[f"{kind}/{n}"]["train_warm"] = []
        for which, n in order:
            key = f"{kind}/{n}"
            prepared = self.prepared(kind, n)
            if which == "cold":
                shutil.rmtree(prepared / "plans", ignore_errors=True)
            run_dir = self.work / "runs" / f"{kind}-{n}-{which}"
            shutil.rmtree(run_dir, ignore_errors=True)
            m = run_measured(CTRLTOK + ["train", str(self.work / f"{kind}-{n}.yaml"), "--out", str(run_dir),
                                        "--set", f"data.train={prepared}"],
                             watch=run_dir / "metrics.jsonl", log=self.work / f"train-{kind}-{n}-{which}.log")
            m["plan_bytes"] = folder_bytes(prepared / "plans", exclude=())
            m["machine"] = machine()
            if which == "cold":
                self.results[key]["train_cold"] = m
            else:
                self.results[key]["train_warm"].append(m)
            self.save()
            t = m["times"]
            print(f"  {key} train ({which}): setup logged at {t.get('setup', float('nan')):.2f} s, first step at "
                  f"{t.get('step1', float('nan')):.2f} s, wall {m['wall_s']:.1f} s, peak RSS {m['peak_rss_mb']:.0f} MB",
                  flush=True)
            shutil.rmtree(run_dir, ignore_errors=True)

    def probe(self, kind: str, n: int, steps: int) -> None:
        key = f"{kind}/{n}"
        out = self.work / "runs" / f"{kind}-{n}-probe"
        shutil.rmtree(out, ignore_errors=True)
        result = self.work / f"probe-{kind}-{n}.json"
        run_measured([sys.executable, __file__, "--probe", str(self.work / f"{kind}-{n}.yaml"),
                      str(self.prepared(kind, n)), str(out), str(steps), str(result)],
                     log=self.work / f"probe-{kind}-{n}.log")
        self.results[key]["loader"] = json.loads(result.read_text())
        self.save()
        shutil.rmtree(out, ignore_errors=True)
        lo = self.results[key]["loader"]
        print(f"  {key} loader: {statistics.median(lo['loader_s']) * 1e3:.1f} ms of "
              f"{statistics.median(lo['step_s']) * 1e3:.0f} ms per step "
              f"({statistics.median(lo['share']):.2%}); data setup (s): "
              f"{ {k: round(v, 3) for k, v in lo['setup'].items()} }", flush=True)


# -- the table ---------------------------------------------------------------------------------
def _verdict(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def table(results: dict) -> str:
    lines = ["| kind | documents | tokens | prepare s | prepare tokens/s (per CPU s) | prepare peak RSS MB (main / worker) "
             "| bytes/token on disk (+ row plan) | first step cold s (CPU s) | first step warm s, median (CPU s) "
             "| train peak RSS MB | loader ms / step ms (share) |", "|" + "---|" * 11]
    for key in sorted(results, key=lambda k: (results[k]["kind"], results[k]["documents"])):
        r = results[key]
        p = r["prepare"]
        cold = r["train_cold"] or {}
        warm = r["train_warm"]
        lo = r["loader"] or {}
        wmed = statistics.median(m["times"]["step1"] for m in warm) if warm else float("nan")
        wcpu = statistics.median(m["cpu_times"]["step1"] for m in warm) if warm else float("nan")
        plan = (cold.get("plan_bytes", 0) / r["tokens"]) if cold else float("nan")
        rss = max([m["peak_rss_mb"] for m in warm] + [cold.get("peak_rss_mb", 0)])
        per_cpu = r["tokens"] / (p["user_s"] + p["sys_s"])
        lo_s = statistics.median(lo["loader_s"]) * 1e3 if lo else float("nan")
        st_s = statistics.median(lo["step_s"]) * 1e3 if lo else float("nan")
        share = statistics.median(lo["share"]) if lo else float("nan")
        lines.append(f"| {r['kind']} | {r['documents']:,} | {r['tokens']:,} | {p['wall_s']:.1f} "
                     f"| {r['prepare_tokens_per_s']:,.0f} ({per_cpu:,.0f}) | {p['peak_rss_mb']:.0f} ({p['main_hwm_mb']:.0f} / "
                     f"{p['worker_hwm_mb']:.0f}) | {r['bytes_per_token']:.2f} (+{plan:.2f}) "
                     f"| {cold.get('times', {}).get('step1', float('nan')):.2f} "
                     f"({cold.get('cpu_times', {}).get('step1', float('nan')):.2f}) | {wmed:.2f} ({wcpu:.2f}) | {rss:.0f} "
                     f"| {lo_s:.1f} / {st_s:.0f} ({share:.1%}) |".replace("nan", "-").replace("| 0 |", "| - |"))
    lines += ["", "| kind | target | 1x | 10x | ratio or value | verdict |", "|---|---|---|---|---|---|"]
    for kind in sorted({r["kind"] for r in results.values()}):
        rs = sorted((r for r in results.values() if r["kind"] == kind), key=lambda r: r["documents"])
        if len(rs) < 2:
            continue
        a, b = rs[0], rs[-1]
        if not (a["train_cold"] and b["train_cold"] and a["train_warm"] and b["train_warm"] and a["loader"]
                and b["loader"]):
            lines.append(f"| {kind} | (training or probe phase not run yet) | | | | |")
            ratio_rss = b["prepare"]["peak_rss_mb"] / a["prepare"]["peak_rss_mb"]
            lines.append(f"| {kind} | prepare peak RSS <= 1.2x of 1x | {a['prepare']['peak_rss_mb']:.0f} MB "
                         f"| {b['prepare']['peak_rss_mb']:.0f} MB | {ratio_rss:.2f}x | {_verdict(ratio_rss <= 1.2)} |")
            continue

        def ratio_row(name: str, va: float, vb: float, limit: float, unit: str = "") -> str:
            q = vb / va
            return f"| {kind} | {name} <= {limit}x of 1x | {va:.2f}{unit} | {vb:.2f}{unit} | {q:.2f}x | {_verdict(q <= limit)} |"

        def train_rss(r):
            return max([m["peak_rss_mb"] for m in r["train_warm"]] + [(r["train_cold"] or {}).get("peak_rss_mb", 0)])

        def warm(r, what="times"):
            return statistics.median(m[what]["step1"] for m in r["train_warm"])

        lines.append(ratio_row("prepare peak RSS", a["prepare"]["peak_rss_mb"], b["prepare"]["peak_rss_mb"],
                               TARGETS["rss_ratio"], " MB"))
        lines.append(ratio_row("training peak RSS", train_rss(a), train_rss(b), TARGETS["rss_ratio"], " MB"))
        lines.append(ratio_row("time to first step, cold (plan built)", a["train_cold"]["times"]["step1"],
                               b["train_cold"]["times"]["step1"], TARGETS["first_step_ratio"], " s"))
        lines.append(ratio_row("time to first step, warm", warm(a), warm(b), TARGETS["first_step_ratio"], " s"))
        lines.append(ratio_row("CPU seconds to first step, cold", a["train_cold"]["cpu_times"]["step1"],
                               b["train_cold"]["cpu_times"]["step1"], TARGETS["first_step_ratio"], " s"))
        lines.append(ratio_row("CPU seconds to first step, warm", warm(a, "cpu_times"), warm(b, "cpu_times"),
                               TARGETS["first_step_ratio"], " s"))
        for r, size in ((a, "1x"), (b, "10x")):
            share = statistics.median(r["loader"]["share"])
            lines.append(f"| {kind} | loader < 5% of step ({size}) | | | {share:.2%} | "
                         f"{_verdict(share < TARGETS['loader_share'])} |")
        if kind == "text":
            worst = max(a["bytes_per_token"], b["bytes_per_token"])
            lines.append(f"| text | <= 4 bytes/token on disk | {a['bytes_per_token']:.2f} | {b['bytes_per_token']:.2f} "
                         f"| {worst:.2f} | {_verdict(worst <= TARGETS['bytes_per_token'])} |")
    return "\n".join(lines)


def machine() -> str:
    import torch
    load = os.getloadavg()
    return (f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, torch {torch.__version__}, "
            f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[20000, 200000])
    ap.add_argument("--kinds", nargs="+", default=["text", "labelled"], choices=list(KINDS),
                    help="labelled-raw: the text corpus as data.kind labelled, sentences split and scored "
                         "(profanity, threshold 0.5) inside the prepare pass")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ctrltok-data-scale"))
    ap.add_argument("--workers", type=int, default=2, help="ctrltok prepare --workers")
    ap.add_argument("--reps", type=int, default=3, help="warm training runs per size, interleaved")
    ap.add_argument("--probe-steps", type=int, default=12, help="steps of the in-process loader probe")
    ap.add_argument("--quick", action="store_true", help="1k / 10k documents, 1 rep")
    ap.add_argument("--phases", nargs="+", default=["prepare", "train", "probe"], choices=["prepare", "train", "probe"],
                    help="prepare: ctrltok prepare per size; train: time to first step and RSS (sizes interleaved); "
                         "probe: the loader's share of a step")
    ap.add_argument("--report", action="store_true", help="print the table of the saved results only")
    ap.add_argument("--probe", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.probe:
        return loader_probe(a.probe[0], a.probe[1], a.probe[2], int(a.probe[3]), a.probe[4])
    if not SHARED.is_dir():
        print(f"skipped: {SHARED} is absent (this benchmark builds its corpus from ../shared/data)")
        return
    if a.quick:
        a.sizes, a.reps, a.work = [1000, 10000], 1, a.work.with_name(a.work.name + "-quick")
    a.work.mkdir(parents=True, exist_ok=True)
    bench = Bench(a.work, a.workers)
    if not a.report:
        print(f"machine: {machine()}", flush=True)
        sizes = sorted(a.sizes)
        for kind in a.kinds:
            if "prepare" in a.phases:
                for n in sizes:
                    bench.prepare(kind, n)
            if "train" in a.phases:
                bench.train(kind, sizes, a.reps)
            if "probe" in a.phases:
                for n in sizes:
                    bench.probe(kind, n, a.probe_steps)
        print(f"machine after: {machine()}")
    print(table(bench.results))


if __name__ == "__main__":
    main()
