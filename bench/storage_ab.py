"""Storage A/B for prepared data: HF ``datasets`` Arrow (what `ctrltok prepare` writes) against
litdata (``optimize`` -> ``StreamingDataset``) on the same encoded documents, in one run.

    python bench/storage_ab.py                   # 20k text documents of bench/data_scale.py's corpus
    python bench/storage_ab.py --docs 5000 --reps 2

litdata is not a dependency of ctrltok (see bench/README.md for why it is not in the `bench`
extra): install it by hand to run this, ``pip install --no-deps litdata==0.2.76
lightning-utilities obstore tifffile boto3 botocore s3transfer jmespath``. Without it the script
says so and exits 0; so it does without ../shared/data.

What is compared (contenders interleaved A B A B in every measure, medians):

* prepare, end to end: `ctrltok.data.prepare.prepare` (2 worker processes, Arrow shards through
  the stage runner) against ``litdata.optimize`` (2 workers) running the same
  ``DocumentEncoder`` over the same records: tokens/s;
* write only, from the same encoded documents in memory: ctrltok's ``ArrowShardSink`` (shards of
  4,096 documents) against litdata's ``BinaryWriter`` (64 MB chunks), one process each: tokens/s,
  and bytes on disk per token;
* random reads in the access pattern of ``rank_rows``: the documents of a step's rows (a row plan
  of 256-token chunks, 8 rows a step, the Feistel order), ``Split.documents`` against
  ``StreamingDataset[i]``; documents/s as the loader needs them (Examples) and raw (arrays);
* sequential reads of every document: Arrow record batches (zero-copy list slices) against
  iterating ``StreamingDataset``; documents/s and tokens/s;
* resumable reading: ctrltok's position is the step (a checkpoint stores it; ``rank_rows`` is a pure
  function of it), so resuming = opening the folder and the plan and reading step k; litdata's is
  ``StreamingDataLoader.state_dict()`` / ``load_state_dict`` (shuffled). Time from a fresh open to
  the first batch at the resume point, and whether the batches after it equal an uninterrupted
  read's.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data_scale  # noqa: E402  (the corpus and recipe of the scale benchmark)

ROWS_PER_STEP = 8
MAX_LENGTH = 256
SEED = 42


def _sizes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# -- litdata side --------------------------------------------------------------------------------
_ENC = None
_CHUNKS: list = []  # the records, in chunks of 64 (set before optimize; its forked workers inherit them)


def _lit_encode(k: int):
    """litdata's optimize fn: chunk ``k`` of (where, record) -> one item per document (a generator)."""
    global _ENC
    chunk = _CHUNKS[k]
    if _ENC is None:
        from ctrltok.core.config import load_recipe
        from ctrltok.data.documents import DocumentEncoder
        from ctrltok.training.setup import prepare_tokenizer
        recipe = load_recipe(os.environ["STORAGE_AB_RECIPE"])
        _ENC = DocumentEncoder(recipe, prepare_tokenizer(recipe)[0])
    for result in _ENC.encode([(k * 64 + j, item) for j, item in enumerate(chunk)]):  # (input index, item)
        if isinstance(result, tuple):
            continue
        for ex in result:
            yield _lit_item(ex)


def _lit_item(ex) -> dict:
    ids = np.asarray(ex.input_ids, dtype=np.uint16)
    sup = np.packbits(np.asarray(ex.labels) != -100)
    return {"input_ids": ids, "supervised": sup, "length": len(ids), "source": ex.source}


def _lit_example(item):
    from ctrltok.core.example import IGNORE, Example
    ids = item["input_ids"].tolist()
    sup = np.unpackbits(item["supervised"], count=len(ids)).astype(bool).tolist()
    return Example(ids, [t if s else IGNORE for t, s in zip(ids, sup)], source=item["source"])


# -- the measures --------------------------------------------------------------------------------
def prepare_both(recipe_path: Path, work: Path, reps: int, workers: int) -> dict:
    from litdata import optimize

    from ctrltok.core.config import load_recipe
    from ctrltok.core.records import Skips, read_sources
    from ctrltok.data.prepare import prepare
    from ctrltok.training.setup import prepare_tokenizer
    recipe = load_recipe(recipe_path)
    tokenizer, charter = prepare_tokenizer(recipe)
    os.environ["STORAGE_AB_RECIPE"] = str(recipe_path)
    out: dict[str, list] = {"arrow": [], "litdata": []}
    tokens = 0
    for rep in range(reps):
        for name in (("arrow", "litdata") if rep % 2 == 0 else ("litdata", "arrow")):
            target = work / f"e2e-{name}"
            shutil.rmtree(target, ignore_errors=True)
            gc.collect()
            t = time.perf_counter()
            if name == "arrow":
                data = prepare(recipe, tokenizer, target, charter, workers=workers)
                tokens = data.manifest["splits"]["train"]["tokens"] + data.manifest["splits"]["eval"]["tokens"]
            else:
                items = list(read_sources(recipe.data, recipe.train.seed, Skips(), which="train"))
                _CHUNKS[:] = [items[i:i + 64] for i in range(0, len(items), 64)]
                optimize(fn=_lit_encode, inputs=list(range(len(_CHUNKS))), output_dir=str(target), chunk_bytes="64MB",
                         num_workers=workers, verbose=False, start_method="fork")
            out[name].append(time.perf_counter() - t)
            print(f"  prepare {name}: {out[name][-1]:.1f} s", flush=True)
    return {"seconds": out, "tokens": tokens}


def write_both(docs: list, work: Path, reps: int) -> dict:
    import pyarrow as pa
    from litdata.streaming.writer import BinaryWriter

    from ctrltok.core.stages import Outcome
    from ctrltok.data.store import ArrowShardSink
    out: dict[str, list] = {"arrow": [], "litdata": []}
    sizes = {}
    for rep in range(reps):
        for name in (("arrow", "litdata") if rep % 2 == 0 else ("litdata", "arrow")):
            target = work / f"write-{name}"
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            gc.collect()
            t = time.perf_counter()
            if name == "arrow":
                for k in range(0, len(docs), 4096):
                    sink = ArrowShardSink(target / f"shard-{k // 4096:06d}", ids=pa.uint16())
                    for ex in docs[k:k + 4096]:
                        sink.write(Outcome.keep(("train", [ex]), ex.source))
                    for p in sink.close():
                        p.rename(str(p).removesuffix(".tmp"))
            else:
                writer = BinaryWriter(str(target), chunk_bytes="64MB")
                for i, ex in enumerate(docs):
                    writer[i] = _lit_item(ex)
                writer.done()
                writer.merge()
            out[name].append(time.perf_counter() - t)
            sizes[name] = _sizes(target)
    return {"seconds": out, "bytes": sizes}


def _open_arrow(folder: Path):
    from ctrltok.data.store import PreparedData
    return PreparedData.open(folder).train


def _open_lit(folder: Path):
    from litdata import StreamingDataset
    return StreamingDataset(str(folder))


def step_documents(lengths: list[int], steps: int) -> list[list[int]]:
    """The documents each of ``steps`` steps reads: what ``rank_rows`` fetches for its rows."""
    from ctrltok.data.plan import RowPlan, rows_at, step_positions
    plan = RowPlan.build(lengths, MAX_LENGTH, "chunk", True)
    out = []
    for s in range(steps):
        rows = rows_at(step_positions(s, ROWS_PER_STEP, 0, ROWS_PER_STEP), len(plan), SEED)
        out.append(sorted({int(d) for r in rows for d, _, _ in plan.row(int(r))}))
    return out


def _arrow_arrays(split, ids: list[int]) -> list[np.ndarray]:
    """The id arrays of documents ``ids`` as zero-copy numpy slices (no Python lists)."""
    table = split.dataset.data.fast_gather(ids) if len(ids) > 1 else split.dataset.data.fast_slice(ids[0], 1)
    col = table.column("input_ids").combine_chunks()
    offsets, values = col.offsets.to_numpy(), col.values.to_numpy()
    return [values[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


def random_reads(arrow_dir: Path, lit_dir: Path, steps: int, reps: int) -> dict:
    split, lit = _open_arrow(arrow_dir), _open_lit(lit_dir)
    lengths_arrow = list(split.lengths())
    plan_docs = step_documents(lengths_arrow, steps)
    n_docs = sum(len(d) for d in plan_docs)
    res: dict[str, list] = {k: [] for k in ("arrow", "arrow raw", "litdata", "litdata raw")}
    for rep in range(reps):
        order = list(res) if rep % 2 == 0 else list(reversed(res))
        for name in order:
            t = time.perf_counter()
            for ids in plan_docs:
                if name == "arrow":
                    split.documents(ids)
                elif name == "arrow raw":
                    _arrow_arrays(split, ids)
                elif name == "litdata":
                    [_lit_example(lit[i]) for i in ids]
                else:
                    [lit[i]["input_ids"] for i in ids]
            res[name].append(n_docs / (time.perf_counter() - t))
    return {"docs_per_s": res, "docs": n_docs, "steps": steps}


def sequential_reads(arrow_dir: Path, lit_dir: Path, reps: int) -> dict:
    res: dict[str, list] = {"arrow": [], "litdata": []}
    tokens = {}
    for rep in range(reps):
        for name in (("arrow", "litdata") if rep % 2 == 0 else ("litdata", "arrow")):
            t = time.perf_counter()
            n = ntok = 0
            if name == "arrow":
                split = _open_arrow(arrow_dir)
                for batch in split.dataset.data.to_batches(max_chunksize=1024):
                    col = batch.column("input_ids")
                    offsets, values = col.offsets.to_numpy(), col.values.to_numpy()
                    for i in range(len(offsets) - 1):
                        ntok += len(values[offsets[i]:offsets[i + 1]])
                        n += 1
            else:
                for item in _open_lit(lit_dir):
                    ntok += len(item["input_ids"])
                    n += 1
            dt = time.perf_counter() - t
            res[name].append(n / dt)
            tokens[name] = (n, ntok)
    return {"docs_per_s": res, "counts": tokens}


def resume_both(arrow_dir: Path, lit_dir: Path, at_batches: list[int], check: int = 4) -> dict:
    from litdata import StreamingDataLoader, StreamingDataset

    from ctrltok.data.loader import RowSource
    from ctrltok.data.plan import RowPlan, rows_at, step_positions

    def arrow_batches(source, first: int, n: int):
        return [[[(ex.source, len(ex)) for ex in row] for row in
                 source.rows(rows_at(step_positions(s, ROWS_PER_STEP, 0, ROWS_PER_STEP), len(source), SEED).tolist())]
                for s in range(first, first + n)]

    def lit_loader():
        return StreamingDataLoader(StreamingDataset(str(lit_dir), shuffle=True, seed=SEED),
                                   batch_size=ROWS_PER_STEP, num_workers=0, collate_fn=lambda b: [x["source"] for x in b])

    out = {}
    plan_dir = arrow_dir / "plans" / "storage-ab"
    split = _open_arrow(arrow_dir)
    RowPlan.write(plan_dir, split.lengths(), MAX_LENGTH, "chunk", True)
    for k in at_batches:
        # uninterrupted references
        ref_arrow = arrow_batches(RowSource(split, RowPlan.open(plan_dir)), k, check)
        loader = lit_loader()
        it = iter(loader)
        for _ in range(k):
            next(it)
        state = loader.state_dict()
        ref_lit = [next(it) for _ in range(check)]
        del it, loader
        gc.collect()
        # resumed from a fresh open
        t = time.perf_counter()
        source = RowSource(_open_arrow(arrow_dir), RowPlan.open(plan_dir))
        got_arrow = arrow_batches(source, k, 1)
        t_arrow = time.perf_counter() - t
        got_arrow += arrow_batches(source, k + 1, check - 1)
        t = time.perf_counter()
        loader = lit_loader()
        loader.load_state_dict(state)
        it = iter(loader)
        got_lit = [next(it)]
        t_lit = time.perf_counter() - t
        got_lit += [next(it) for _ in range(check - 1)]
        del it, loader
        out[k] = {"arrow_s": t_arrow, "arrow_equal": got_arrow == ref_arrow, "litdata_s": t_lit,
                  "litdata_equal": got_lit == ref_lit, "state_bytes": len(json.dumps(state, default=str))}
        print(f"  resume at batch {k}: arrow {t_arrow * 1e3:.1f} ms (same batches: {got_arrow == ref_arrow}), "
              f"litdata {t_lit * 1e3:.1f} ms (same batches: {got_lit == ref_lit})", flush=True)
    shutil.rmtree(plan_dir, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions (end-to-end prepare: --prepare-reps)")
    ap.add_argument("--prepare-reps", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300, help="steps of rank_rows' access pattern in the random read")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ctrltok-storage-ab"))
    a = ap.parse_args()
    if not data_scale.SHARED.is_dir():
        print(f"skipped: {data_scale.SHARED} is absent (the corpus comes from ../shared/data)")
        return
    if importlib.util.find_spec("litdata") is None:
        print("skipped: litdata is not installed (pip install --no-deps litdata==0.2.76 lightning-utilities obstore "
              "tifffile boto3 botocore s3transfer jmespath)")
        return
    os.environ.update(data_scale.ENV)
    import litdata
    import torch
    torch.set_num_threads(1)
    a.work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {data_scale.machine()}; litdata {litdata.__version__}", flush=True)
    bench = data_scale.Bench(a.work, a.workers)
    recipe = bench.recipe("text", a.docs)
    corpus = a.work / "corpus" / f"text-{a.docs}.jsonl"
    # litdata reads only data.train: no separate eval set in this comparison
    import yaml
    spec = yaml.safe_load(recipe.read_text())
    spec["data"].pop("eval")
    spec["data"]["eval_fraction"] = 0.0
    recipe.write_text(yaml.safe_dump(spec, sort_keys=False))

    print(f"corpus: {corpus} ({corpus.stat().st_size / 1e6:.0f} MB)", flush=True)
    e2e = prepare_both(recipe, a.work, a.prepare_reps, a.workers)
    tokens = e2e["tokens"]
    docs = list(_open_arrow(a.work / "e2e-arrow"))
    assert sum(len(d) for d in docs) == tokens
    wr = write_both(docs, a.work, a.reps)
    del docs
    gc.collect()
    lit_docs = len(_open_lit(a.work / "e2e-litdata"))
    rr = random_reads(a.work / "e2e-arrow", a.work / "e2e-litdata", a.steps, a.reps)
    sr = sequential_reads(a.work / "e2e-arrow", a.work / "e2e-litdata", a.reps)
    rs = resume_both(a.work / "e2e-arrow", a.work / "e2e-litdata", [10, 1000])

    n_arrow = len(_open_arrow(a.work / "e2e-arrow"))
    print(f"\ndocuments: {n_arrow:,} (litdata holds {lit_docs:,}), tokens {tokens:,}; medians of {a.reps} interleaved reps "
          f"({a.prepare_reps} for the end-to-end prepare)")
    print("| measure | HF datasets Arrow (ctrltok) | litdata | Arrow / litdata |")
    print("|---|---|---|---|")

    def row(name: str, va: float, vb: float, fmt: str = "{:,.0f}", higher: bool = True) -> None:
        print(f"| {name} | {fmt.format(va)} | {fmt.format(vb)} | {va / vb:.2f}x |")

    row("prepare end to end, tokens/s (2 workers)", tokens / _median(e2e["seconds"]["arrow"]),
        tokens / _median(e2e["seconds"]["litdata"]))
    row("write only, tokens/s (1 process)", tokens / _median(wr["seconds"]["arrow"]),
        tokens / _median(wr["seconds"]["litdata"]))
    row("bytes on disk per token (write only)", wr["bytes"]["arrow"] / tokens, wr["bytes"]["litdata"] / tokens,
        "{:.3f}")
    row("bytes on disk per token (end to end folder)", _sizes(a.work / "e2e-arrow") / tokens,
        _sizes(a.work / "e2e-litdata") / tokens, "{:.3f}")
    row(f"random read, documents/s as Examples ({rr['steps']} steps, {rr['docs']:,} documents)",
        _median(rr["docs_per_s"]["arrow"]), _median(rr["docs_per_s"]["litdata"]))
    row("random read, documents/s raw (id arrays)", _median(rr["docs_per_s"]["arrow raw"]),
        _median(rr["docs_per_s"]["litdata raw"]))
    row("sequential read, documents/s raw", _median(sr["docs_per_s"]["arrow"]), _median(sr["docs_per_s"]["litdata"]))
    for k, r in rs.items():
        print(f"| resume at batch {k}: fresh open to first batch, ms (same batches as uninterrupted) "
              f"| {r['arrow_s'] * 1e3:.1f} ({r['arrow_equal']}) | {r['litdata_s'] * 1e3:.1f} ({r['litdata_equal']}) "
              f"| {r['arrow_s'] / r['litdata_s']:.2f}x |")
    print(f"\nper rep: prepare {e2e['seconds']}; write {wr['seconds']}")
    print(f"random docs/s per rep: { {k: [round(x) for x in v] for k, v in rr['docs_per_s'].items()} }")
    print(f"sequential docs/s per rep: { {k: [round(x) for x in v] for k, v in sr['docs_per_s'].items()} }; "
          f"counts (documents, tokens) {sr['counts']}")
    print(f"machine after: {data_scale.machine()}")


if __name__ == "__main__":
    main()
