"""`ctrltok prepare RECIPE.yaml --out DIR [--workers N]`: a recipe's data, encoded once into shards.

A rerun resumes an unfinished folder made from the same data (the stage runner compares its inputs'
fingerprints, :func:`ctrltok.data.prepare.prepare`) and says "already prepared" of a finished one; a
folder prepared from other data settings or other input files is refused, naming what differs.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from ctrltok.cli.run import check_recipe_names
from ctrltok.core.config import load_recipe
from ctrltok.core.inputs import changed, what_changed
from ctrltok.data.prepare import data_key, data_sources
from ctrltok.data.prepare import prepare as prepare_data
from ctrltok.data.store import MANIFEST, PreparedData
from ctrltok.training.runs import RunError
from ctrltok.training.setup import prepare_tokenizer

NOT_DATA = ("data.workers",)  # in the data key, but not what the documents are made from


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and (not prefix or prefix == "data"):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else k))
        return out
    return {"train.seed" if prefix == "seed" else prefix: value}


def check_prepared(recipe, out: Path) -> bool:
    """Whether ``out`` is a finished prepared folder of ``recipe``'s data settings and inputs (a
    finished folder of other settings or input contents is a :class:`~ctrltok.training.runs.RunError`
    naming them; an unfinished one is checked by the stage runner as it resumes)."""
    finished = (out / MANIFEST).is_file()
    if finished:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        stored = manifest.get("recipe")
        if isinstance(stored, dict):
            old, new = _flat(stored), _flat(json.loads(json.dumps(data_key(recipe), default=str)))
            diff = [k for k in sorted(set(old) | set(new)) if k not in NOT_DATA and old.get(k) != new.get(k)]
            if diff:
                raise RunError(f"{out}: already prepared from other data settings ({', '.join(diff)}); prepare "
                               "into a new --out")
        read, now = manifest.get("sources"), data_sources(recipe)  # absent in folders prepared before it was
        if isinstance(read, dict) and changed(read, now):
            raise RunError(f"{out}: already prepared from other inputs ({what_changed(read, now)}); prepare into "
                           "a new --out")
    return finished


def prepare(a):
    recipe = load_recipe(a.recipe, a.set)
    if a.workers is not None:
        recipe.data.workers = a.workers
    check_recipe_names(recipe)
    out = Path(a.out)
    finished = check_prepared(recipe, out)
    tokenizer, charter = prepare_tokenizer(recipe)
    if finished:
        PreparedData.open(out, tokenizer)  # refuses data encoded by another tokenizer
        print(f"already prepared, nothing to do: {out} holds this recipe's data")
        return 0
    t0 = time.perf_counter()

    def progress(n: int) -> None:
        print(f"\r{n:,} records read ({n / (time.perf_counter() - t0):,.0f}/s)", end="", file=sys.stderr, flush=True)

    data = prepare_data(recipe, tokenizer, a.out, charter, workers=recipe.data.workers, shard_size=a.shard_size,
                        progress=progress)
    print(file=sys.stderr)
    m = data.manifest
    for split, c in m["splits"].items():
        print(f"{split}: {c['documents']:,} documents, {c['tokens']:,} tokens, {c['supervised']:,} supervised")
    if m["skips"]:
        print(f"skipped: {m['skips']} (first places: {m['skip_places']})")
    print(f"prepared {m['inputs']:,} records into {a.out} ({m['ids']} ids, tokenizer {m['tokenizer']})")
