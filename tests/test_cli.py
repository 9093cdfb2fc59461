"""The command table stays in sync with the library; every recipe validates."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ctrltok.cli.main import COMMANDS, build_parser, resolve
from ctrltok.core.config import ConfigError, load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_calls_a_real_function(name):
    target = COMMANDS[name][0]
    assert callable(resolve(target)), f"{name} -> {target} is not importable"


def test_parser_builds_every_command():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)


def test_recipes_exist():
    names = {p.stem for p in RECIPES}
    for required in ("eot", "eot-cpu", "oasst", "oasst-cpu", "conditional", "conditional-cpu", "epe", "epe-cpu",
                     "backtranslate", "backtranslate-cpu"):
        assert required in names, f"recipes/{required}.yaml is missing"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates_and_says_how_to_run(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), f"{path.name} must open with a comment saying how to run it"
    assert "ctrltok" in "".join(path.read_text().splitlines()[:6])
    recipe = load_recipe(path, ["train.max_steps=3"])
    assert recipe.train.max_steps == 3


def test_unknown_key_names_key_and_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("# x\ntrain:\n  lrr: 1.0\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*train.*'lrr'"):
        load_recipe(p)


def test_wrong_type_names_the_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("# x\ntrain:\n  max_steps: many\n")
    with pytest.raises(ConfigError, match=r"train.max_steps"):
        load_recipe(p)


def test_set_overrides_are_validated(tmp_path):
    p = tmp_path / "ok.yaml"
    p.write_text("# x\nname: ok\ndata:\n  train: ctrltok:instructions\n")
    assert load_recipe(p, ["train.max_steps=7", "lora.enabled=true"]).lora.enabled
    with pytest.raises(ConfigError, match="nosuch"):
        load_recipe(p, ["train.nosuch=1"])


def test_empty_recipe_is_an_error(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("# only a comment\n")
    with pytest.raises(ConfigError, match=r"empty.yaml: the recipe is empty"):
        load_recipe(p, ["train.max_steps=3"])


@pytest.mark.parametrize("override,key", [
    ("train.max_steps=-3", "train.max_steps"), ("train.grad_accum=0", "train.grad_accum"),
    ("train.lr=0", "train.lr"), ("train.warmup_ratio=2", "train.warmup_ratio"),
    ("tokens.pad_to_multiple_of=0", "tokens.pad_to_multiple_of"), ("data.limit=0", "data.limit"),
    ("lora.r=0", "lora.r"), ("train.betas=[0.9, 1.5]", "train.betas"), ("tokens.init=zeros", "tokens.init"),
    ("tokens.custom=[{token: '<x>', role: leader}]", "tokens.custom[0].role"),
])
def test_out_of_range_values_name_the_key(tmp_path, override, key):
    p = tmp_path / "r.yaml"
    p.write_text("# x\nname: r\n")
    with pytest.raises(ConfigError, match=rf"r.yaml: {re.escape(key)}"):
        load_recipe(p, [override])
