"""``ctrltok prepare``: one streaming pass over a recipe's data into prepared shards.

Records are read as a stream (never a list), encoded by :class:`~ctrltok.data.documents.DocumentEncoder`
in ``workers`` processes (chunks in flight are bounded, results in input order), routed to the
train or held-out split by the keyed draw, and written by the resumable stage runner
(:mod:`ctrltok.core.stages`) as Arrow shards (:mod:`ctrltok.data.store`). A killed prepare, rerun,
resumes at its first unfinished shard and ends byte-identical to an uninterrupted one; the manifest
is written last, so a folder with a manifest is complete.

``ctrltok train`` calls :func:`prepared_for` on raw data: it prepares into a cache folder named by
the data section's hash and the tokenizer's fingerprint (``$CTRLTOK_DATA_CACHE``, by default
``$CTRLTOK_CACHE/prepared``), so a
small run stays one command and a resumed or repeated run never tokenizes again. What the cache
key covers: the ``data`` section except the row settings (``max_length``, ``overlong``,
``packing``: those shape rows, not documents), ``conditional``, ``epe``, ``train.seed`` (the
held-out draw), the tokenizer with the recipe's tokens, and the contents of the inputs: each data
file's, sidecar's and charter's fingerprint (:func:`ctrltok.core.inputs.recipe_inputs`: size and a
hash of its head and tail), so a data file edited in place is prepared again into a new folder.

The same fingerprints are the stage runner's ``inputs`` (an unfinished folder resumes only over
the same contents) and are recorded in the manifest (``sources``, hashed as ``sources_key``, which
is what a run reading the prepared folder fingerprints).
"""

from __future__ import annotations

import itertools
import os
import signal
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from ctrltok.conditional.stream import scorer_provenance
from ctrltok.core.cache import cache_dir
from ctrltok.core.config import Recipe
from ctrltok.core.inputs import content, recipe_inputs
from ctrltok.core.records import Skips
from ctrltok.core.stages import Outcome, StageRun, map_ordered
from ctrltok.core.tokens import CharterItem
from ctrltok.data.documents import DocumentEncoder, is_held_out, read_inputs
from ctrltok.data.store import (
    MANIFEST,
    PARTS,
    SPLITS,
    ArrowShardSink,
    PreparedData,
    PreparedDataError,
    fingerprint,
    id_type,
    shard_files,
    tokenizer_fingerprint,
    write_manifest,
)

# Shape rows (or only how fast the pass runs), not documents: not in the data key.
ROW_SETTINGS = ("max_length", "overlong", "packing", "workers")
CHUNK = 64  # inputs per worker task
SHARD_SIZE = 4096  # inputs per shard: a kill redoes at most this many


def data_key(recipe: Recipe) -> dict[str, Any]:
    """What the prepared documents depend on, besides the tokenizer (see the module docstring)."""
    data = {k: v for k, v in asdict(recipe.data).items() if k not in ROW_SETTINGS}
    return {"data": data, "conditional": asdict(recipe.conditional) if recipe.conditional else None,
            "epe": asdict(recipe.epe) if recipe.epe else None, "seed": recipe.train.seed}


def data_sources(recipe: Recipe) -> dict[str, dict[str, Any]]:
    """Fingerprints of what the prepared documents are read from (data files, sidecars, the
    charter), by recipe key; the model is left out (the tokenizer is keyed apart)."""
    return recipe_inputs(recipe, data_only=True)


def sources_key(sources: dict[str, dict[str, Any]]) -> str:
    """One hash of the inputs' contents (not their paths: the same bytes elsewhere are the same data)."""
    return fingerprint({key: content(fp) for key, fp in sources.items()})


# Worker state, one encoder per process (built by the pool's initializer).
_ENCODER: DocumentEncoder | None = None


def _init_worker(recipe: Recipe, tokenizer: Any, charter: Sequence[CharterItem] | None) -> None:
    global _ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the workers are the parallelism
    _ENCODER = DocumentEncoder(recipe, tokenizer, charter)


def _encode_chunk(chunk: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
    return list(zip((i for i, _ in chunk), _ENCODER.encode(chunk)))


def _stage(recipe: Recipe, tokenizer: Any, charter: Sequence[CharterItem] | None, workers: int,
           split: str | None) -> Callable[[Iterable[tuple[int, Any]]], Iterator[Outcome]]:
    """The prepare stage: ``(input index, item)`` -> one :class:`Outcome` per input. ``split``
    forces every document into one split (a separate eval set); else the keyed draw routes them."""
    fraction, seed = recipe.data.eval_fraction, recipe.train.seed
    kill_at = int(os.environ.get("CTRLTOK_FAULT_KILL_AFTER_INPUTS", "0"))

    def stage(items: Iterable[tuple[int, Any]]) -> Iterator[Outcome]:
        chunks = iter(lambda it=iter(items): list(itertools.islice(it, CHUNK)), [])
        results = map_ordered(_encode_chunk, chunks, processes=workers, initializer=_init_worker,
                              initargs=(recipe, tokenizer, charter))
        for chunk in results:
            for index, result in chunk:
                if kill_at and index == kill_at:  # fault injection for the resume test: a real SIGKILL
                    os.kill(os.getpid(), signal.SIGKILL)
                if isinstance(result, tuple):
                    yield Outcome.dropped(result[0], result[1])
                    continue
                where = result[0].source
                to = split or ("eval" if is_held_out(index, fraction, seed) else "train")
                tokens = sum(len(ex) for ex in result)
                yield Outcome.keep((to, result), where, counts={f"{to}_documents": len(result), f"{to}_tokens": tokens,
                                                                f"{to}_supervised": sum(ex.n_supervised for ex in result)})

    return stage


def _run(folder: Path, recipe: Recipe, tokenizer: Any, charter: Sequence[CharterItem] | None, which: str,
         split: str | None, workers: int, shard_size: int, settings: dict, sources: dict,
         read_skips: Skips, progress: Callable[[int], None] | None) -> tuple[StageRun, Any]:
    run = StageRun(folder, shard_size, settings, sink=partial(ArrowShardSink, ids=id_type(len(tokenizer))),
                   inputs=sources)
    order = [c.id for c in charter] if charter else None
    inputs: Iterable[tuple[int, Any]] = enumerate(read_inputs(recipe, which, read_skips, order))
    if progress is not None:
        inputs = _counting(inputs, progress)
    return run, run.run(_stage(recipe, tokenizer, charter, workers, split), inputs)


def _counting(items: Iterable[Any], progress: Callable[[int], None], every: int = 1024) -> Iterator[Any]:
    for n, item in enumerate(items, 1):
        if n % every == 0:
            progress(n)
        yield item


def prepare(recipe: Recipe, tokenizer: Any, out: str | os.PathLike, charter: Sequence[CharterItem] | None = None,
            workers: int = 1, shard_size: int = SHARD_SIZE,
            progress: Callable[[int], None] | None = None) -> PreparedData:
    """Encode ``recipe``'s data with ``tokenizer`` (already carrying the recipe's tokens) into ``out``.

    Resumes an unfinished folder made with the same settings; refuses one made with others. A
    finished folder (its manifest present) is opened as it is.
    """
    out = Path(out)
    if (out / MANIFEST).is_file():
        return PreparedData.open(out, tokenizer)
    data = recipe.data
    key = data_key(recipe)
    settings = {"key": fingerprint(key), "tokenizer": tokenizer_fingerprint(tokenizer)}
    sources = data_sources(recipe)
    skips = Skips()
    run, stats = _run(out / PARTS, recipe, tokenizer, charter, "train", None if not data.eval else "train",
                      workers, shard_size, settings, sources, skips, progress)
    files = {s: shard_files(out / PARTS, run.committed(), s) for s in SPLITS}
    counts, inputs = dict(stats.counts), stats.outcomes
    drops = Skips()
    _merge(drops, stats.drops)
    if data.eval:  # a separate held-out set: every document of it goes to "eval"
        eval_run, eval_stats = _run(out / "eval-parts", recipe, tokenizer, charter, "eval", "eval",
                                    workers, shard_size, settings, sources, skips, progress)
        files["eval"] = [f"../eval-parts/{name}" for name in shard_files(out / "eval-parts", eval_run.committed(), "eval")]
        for k, v in eval_stats.counts.items():
            counts[k] = counts.get(k, 0) + v
        _merge(drops, eval_stats.drops)
    _merge(drops, skips)  # records the reader skipped (malformed lines, bad sidecar rows)
    if not counts.get("train_documents"):
        raise PreparedDataError(f"{data.train}: no usable training documents (skips: {dict(drops)}); "
                                "see data.on_error and the skip reasons")
    write_manifest(out, {
        "kind": data.kind, "tokenizer": settings["tokenizer"], "data_key": settings["key"], "recipe": key,
        "sources": sources, "sources_key": sources_key(sources),
        "ids": "uint16" if id_type(len(tokenizer)).bit_width == 16 else "uint32", "vocab": len(tokenizer),
        "inputs": inputs, "splits": {s: {n: counts.get(f"{s}_{n}", 0) for n in ("documents", "tokens", "supervised")}
                                     for s in SPLITS},
        "skips": dict(drops), "skip_places": drops.examples, "files": files,
        "scorer": scorer_provenance(recipe.conditional) if data.kind == "labelled" else None,
    })
    return PreparedData.open(out, tokenizer)


def _merge(into: Skips, other: Skips) -> None:
    for reason, n in other.items():
        into[reason] += n
        places = into.examples.setdefault(reason, [])
        places.extend(other.examples.get(reason, [])[: max(0, 3 - len(places))])


def cache_folder(recipe: Recipe, tokenizer: Any, root: str | os.PathLike | None = None) -> Path:
    """Where ``ctrltok train`` keeps the prepared form of ``recipe``'s raw data: named by the data
    settings and the inputs' contents together, and by the tokenizer."""
    env = os.environ.get("CTRLTOK_DATA_CACHE")
    root = Path(root) if root is not None else Path(env) if env else cache_dir() / "prepared"
    key = fingerprint({"data": data_key(recipe), "sources": sources_key(data_sources(recipe))})
    return root / f"{recipe.data.kind}-{key}-{tokenizer_fingerprint(tokenizer)}"


def is_prepared(source: Any) -> bool:
    """Whether ``data.train`` names a prepared folder (a string path holding a manifest)."""
    return isinstance(source, (str, os.PathLike)) and (Path(source) / MANIFEST).is_file()


def prepared_for(recipe: Recipe, tokenizer: Any, charter: Sequence[CharterItem] | None = None,
                 workers: int = 1, root: str | os.PathLike | None = None,
                 progress: Callable[[int], None] | None = None) -> PreparedData:
    """The recipe's data, prepared: ``data.train`` itself when it names a prepared folder, else the
    cache folder for this data section and tokenizer (prepared now if it is not there yet)."""
    if is_prepared(recipe.data.train):
        return PreparedData.open(recipe.data.train, tokenizer)
    return prepare(recipe, tokenizer, cache_folder(recipe, tokenizer, root), charter, workers, progress=progress)
