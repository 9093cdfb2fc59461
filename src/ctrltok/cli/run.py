"""`ctrltok train` and `ctrltok demo`: recipe names and paths in, the training library called."""

from __future__ import annotations

import os
from pathlib import Path

from ctrltok.cli.demo import run_demo
from ctrltok.core.config import Recipe, load_recipe
from ctrltok.training.train import train as train_recipe


def default_out(a, recipe: Recipe) -> Path:
    return Path(a.out) if a.out else Path("runs") / recipe.name


def train(a):
    recipe = load_recipe(a.recipe, a.set)
    out = train_recipe(recipe, default_out(a, recipe))
    if os.environ.get("RANK", "0") == "0":
        print(f"model saved in {out}")


def demo(a):
    return run_demo(model=a.model, out=a.out, steps=a.steps, quick=a.quick)
