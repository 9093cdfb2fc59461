"""`ctrltok backtranslate`: the Humpback pipeline from a recipe."""

from __future__ import annotations

from ctrltok.backtranslate.pipeline import run_backtranslation
from ctrltok.cli.run import default_out
from ctrltok.core.config import load_recipe


def backtranslate(a):
    recipe = load_recipe(a.recipe, a.set)
    run_backtranslation(recipe, default_out(a, recipe))
