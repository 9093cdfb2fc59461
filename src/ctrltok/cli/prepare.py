"""`ctrltok prepare RECIPE.yaml --out DIR [--workers N]`: a recipe's data, encoded once into shards."""

from __future__ import annotations

import sys
import time

from ctrltok.core.config import load_recipe
from ctrltok.data.prepare import prepare as prepare_data
from ctrltok.training.setup import prepare_tokenizer


def prepare(a):
    recipe = load_recipe(a.recipe, a.set)
    if a.workers is not None:
        recipe.data.workers = a.workers
    tokenizer, charter = prepare_tokenizer(recipe)
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
