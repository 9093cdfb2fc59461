"""Prepared data: read back equal to the in-memory encoding (every kind), rows equal to in-memory
packing, ranks that share an epoch without overlap, a killed prepare that reruns to the same bytes,
simulated nodes on 127.0.0.1, and training from a prepared folder without tokenizing again."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from ctrltok.core.config import recipe_from_mapping
from ctrltok.core.example import IGNORE, Example
from ctrltok.core.packing import pack
from ctrltok.core.records import Skips, read_records, resource_path
from ctrltok.data import prepare as prepare_module
from ctrltok.data.documents import read_inputs
from ctrltok.data.encode import build_examples, make_rows
from ctrltok.data.loader import in_memory, prepared_rows, rank_rows
from ctrltok.data.plan import permute, rows_at, step_positions
from ctrltok.data.prepare import cache_folder, prepare
from ctrltok.data.store import PreparedData, PreparedDataError
from ctrltok.training.setup import prepare_tokenizer

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the a model token reads writes <|im_end|> <EOT> river stone light quick brown fox jumps".split()


def _texts(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": i, "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60)))}) + "\n")
    return path


def _labelled(path: Path, n: int) -> Path:
    rng = random.Random(1)
    with open(path, "w") as fh:
        for i in range(n):
            segs = [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))) + ". ",
                     "control": rng.choice(["aligned", "misaligned", None])} for _ in range(rng.randint(1, 4))]
            fh.write(json.dumps({"id": i, "segments": segs}) + "\n")
    return path


def _recipe(tmp_path: Path, kind: str, model: Path) -> dict:
    if kind == "chat":
        data = {"kind": "chat", "train": "ctrltok:instructions", "eval_fraction": 0.2, "template": "eot"}
        tokens = {"presets": ["eot"]}
    elif kind == "text":
        data = {"kind": "text", "train": str(_texts(tmp_path / "t.jsonl", 300)), "eval_fraction": 0.1}
        tokens = {"presets": []}
    elif kind == "labelled":
        data = {"kind": "labelled", "train": str(_labelled(tmp_path / "l.jsonl", 200)), "eval_fraction": 0.1}
        tokens = {"presets": ["conditional"]}
    else:
        data = {"kind": "epe", "train": "ctrltok:epe_corpus", "eval_fraction": 0.25, "template": "epe"}
        tokens = {"presets": ["epe"], "pad_to_multiple_of": 128}
    mapping = {"model": {"name": str(model)}, "data": data, "tokens": tokens, "train": {"seed": 3}}
    if kind == "labelled":
        mapping["conditional"] = {"threshold": 0.5}
    if kind == "epe":
        mapping["epe"] = {"sidecar": str(resource_path("epe_sidecar")), "reflection_weight": 2.0, "context_weight": 0.5}
    return mapping


@pytest.mark.parametrize("kind", ["chat", "text", "labelled", "epe"])
def test_prepared_read_back_equals_in_memory_encoding(tmp_path, tiny_model_dir, kind):
    recipe = recipe_from_mapping(_recipe(tmp_path, kind, tiny_model_dir))
    tokenizer, charter = prepare_tokenizer(recipe)
    memory = build_examples(recipe, tokenizer, charter)
    data = prepare(recipe, tokenizer, tmp_path / "prepared", charter, workers=2 if kind == "text" else 1, shard_size=37)
    assert list(data.train) == memory.train  # ids, labels, positions, holes, weights, head targets, sources
    assert list(data.eval) == memory.eval and memory.eval
    assert data.manifest["splits"]["train"]["documents"] == len(memory.train)
    assert data.manifest["splits"]["train"]["tokens"] == sum(len(ex) for ex in memory.train)
    assert data.manifest["ids"] == "uint16"
    if kind == "epe":
        assert any(ex.position_ids is not None and ex.blocked and ex.head_positions for ex in data.train)


def test_prepared_folder_is_refused_for_another_tokenizer(tmp_path, tiny_model_dir):
    recipe = recipe_from_mapping(_recipe(tmp_path, "text", tiny_model_dir))
    tokenizer, _ = prepare_tokenizer(recipe)
    prepare(recipe, tokenizer, tmp_path / "p")
    other = AutoTokenizer.from_pretrained(tiny_model_dir)
    other.add_special_tokens({"additional_special_tokens": ["<new>"]})
    with pytest.raises(PreparedDataError, match="another tokenizer"):
        PreparedData.open(tmp_path / "p", other)
    with pytest.raises(PreparedDataError, match="not a prepared data folder"):
        PreparedData.open(tmp_path)


@pytest.mark.parametrize("overlong,packing", [("truncate", True), ("split", True), ("chunk", True),
                                              ("truncate", False)])
def test_row_plan_equals_in_memory_packing(overlong, packing):
    rng = random.Random(0)
    examples = [Example(list(range(n)), list(range(n)), source=f"d{i}") for i, n in
                enumerate(rng.randint(1, 90) for _ in range(300))]
    data = recipe_from_mapping({"data": {"train": "ctrltok:instructions", "max_length": 64, "overlong": overlong,
                                         "packing": packing}}).data
    source = in_memory(examples, data)
    rows = source.rows(range(len(source)))
    if packing:
        expected = pack(examples, 64, overlong).rows
    else:
        expected = [[ex if len(ex) <= 64 else ex.__class__(ex.input_ids[:64], ex.labels[:64], position_ids=list(range(64)),
                                                             source=f"{ex.source}[0:64]")] for ex in examples]
    assert rows == expected
    assert source.plan.stats["tokens"] == sum(len(p) for r in expected for p in r)
    in_memory_rows, stats = make_rows(examples, data)  # held-out losses: the same rows, the same counts
    assert in_memory_rows == expected and stats == source.plan.stats


def test_read_inputs_cuts_train_at_the_limit_only():
    recipe = recipe_from_mapping({"data": {"train": "ctrltok:instructions", "eval": "ctrltok:instructions",
                                           "limit": 3}})
    skips = Skips()
    train = list(read_inputs(recipe, "train", skips))
    assert len(train) == 3 and train == list(read_records("ctrltok:instructions"))[:3]
    assert len(list(read_inputs(recipe, "eval", skips))) > 3


def test_permutation_is_a_bijection_per_epoch_and_differs_between_epochs():
    for n in (1, 2, 3, 10, 1000, 4097):
        for epoch in (0, 1):
            assert sorted(permute(np.arange(n), n, 5, epoch).tolist()) == list(range(n))
    assert permute(np.arange(50), 50, 5, 0).tolist() != permute(np.arange(50), 50, 5, 1).tolist()
    big = permute(np.array([0, 10**9 - 1]), 10**9, 5, 3)  # no array of the corpus's size is made
    assert (big >= 0).all() and (big < 10**9).all()


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ranks_read_disjoint_shares_that_cover_the_epoch(world):
    n_rows, per_rank = 96, 3
    per_step = per_rank * world
    seen = []
    for step in range(n_rows // per_step):
        for rank in range(world):
            seen.extend(rows_at(step_positions(step, per_step, rank, per_rank), n_rows, 7).tolist())
    assert sorted(seen) == list(range(n_rows))  # every row once: disjoint, and covering the epoch
    one = rows_at(step_positions(0, per_step, 0, per_step), n_rows, 7).tolist()
    assert one == [r for rank in range(world) for r in rows_at(step_positions(0, per_step, rank, per_rank), n_rows, 7)]


def _write_recipe(tmp_path: Path, mapping: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text("# Run: ctrltok prepare recipe.yaml --out DIR\n" + json.dumps(mapping))
    return path


def _cli(*args, env=None):
    env = {**os.environ, "CTRLTOK_PROGRESS": "0", **(env or {})}
    return subprocess.run([sys.executable, "-m", "ctrltok", *args], env=env, capture_output=True, text=True, timeout=600)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sigkill_mid_prepare_then_rerun_is_identical(tmp_path, tiny_model_dir):
    mapping = _recipe(tmp_path, "text", tiny_model_dir)
    mapping["data"]["train"] = str(_texts(tmp_path / "big.jsonl", 700, seed=4))
    recipe = _write_recipe(tmp_path, mapping)
    whole = _cli("prepare", str(recipe), "--out", str(tmp_path / "whole"), "--shard-size", "100")
    assert whole.returncode == 0, whole.stderr
    killed = _cli("prepare", str(recipe), "--out", str(tmp_path / "killed"), "--shard-size", "100",
                  env={"CTRLTOK_FAULT_KILL_AFTER_INPUTS": "350"})
    assert killed.returncode == -9
    assert not (tmp_path / "killed" / "ctrltok-data.json").exists()  # unfinished: no manifest
    rerun = _cli("prepare", str(recipe), "--out", str(tmp_path / "killed"), "--shard-size", "100")
    assert rerun.returncode == 0, rerun.stderr
    assert _tree(tmp_path / "killed") == _tree(tmp_path / "whole")
    assert "train:" in rerun.stdout and "tokens" in rerun.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_simulated_nodes_read_disjoint_shares(tmp_path, tiny_model_dir):
    """``torchrun --nnodes 2`` on 127.0.0.1, one process per node: each reads only its rows of each
    step, and together they read the whole epoch once."""
    recipe = recipe_from_mapping(_recipe(tmp_path, "text", tiny_model_dir))
    tokenizer, _ = prepare_tokenizer(recipe)
    data = prepare(recipe, tokenizer, tmp_path / "p")
    n_rows = len(prepared_rows(data, "train", recipe.data))
    script = tmp_path / "read.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, torch.distributed as dist
        from ctrltok.core.config import recipe_from_mapping
        from ctrltok.data.loader import prepared_rows, rank_rows
        from ctrltok.data.store import PreparedData
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        data = {recipe.data!r}
        src = prepared_rows(PreparedData.open({str(tmp_path / "p")!r}), "train", data, build=False)
        mine = [[ex.source for ex in row] for step in range({n_rows} // 4) for row in rank_rows(src, step, 4, rank, 2, 3)]
        json.dump(mine, open({str(tmp_path)!r} + f"/rank{{rank}}.json", "w"))
        dist.destroy_process_group()
    """).replace("DataConfig(", "__import__('ctrltok.core.config', fromlist=['DataConfig']).DataConfig("))
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(r), "--master_addr", "127.0.0.1", "--master_port", str(port),
                               str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    shares = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    rows0 = {json.dumps(r) for r in shares[0]}
    rows1 = {json.dumps(r) for r in shares[1]}
    assert rows0 and rows1 and not rows0 & rows1
    everything = prepared_rows(data, "train", recipe.data)
    assert len(shares[0]) + len(shares[1]) == (n_rows // 4) * 4
    single = [[ex.source for ex in row] for step in range(n_rows // 4) for row in rank_rows(everything, step, 4, 0, 4, 3)]
    assert sorted(map(json.dumps, single)) == sorted(rows0 | rows1)


def test_train_reads_a_prepared_folder_and_never_tokenizes_again(tmp_path, tiny_model_dir, monkeypatch):
    from ctrltok.training.train import train

    mapping = _recipe(tmp_path, "text", tiny_model_dir)
    mapping["train"].update({"max_steps": 2, "micro_batch_size": 2, "lr": 1e-3})
    mapping["data"]["max_length"] = 64
    recipe = recipe_from_mapping(mapping)
    tokenizer, _ = prepare_tokenizer(recipe)
    cache = cache_folder(recipe, tokenizer)
    monkeypatch.setenv("CTRLTOK_PROGRESS", "0")
    train(recipe, tmp_path / "a", progress=False)  # raw data: prepared into the cache first
    assert (cache / "ctrltok-data.json").is_file()

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the data was tokenized again")

    monkeypatch.setattr(prepare_module, "_run", no_tokenizing)
    train(recipe_from_mapping(mapping), tmp_path / "b", progress=False)  # the same data: the cache, as is
    mapping["data"]["train"] = str(cache)  # --set data.train=DIR names the prepared folder itself
    train(recipe_from_mapping(mapping), tmp_path / "c", progress=False)
    summaries = [json.loads((tmp_path / d / "ctrltok.json").read_text())["summary"] for d in "abc"]
    assert summaries[0]["documents"] == summaries[1]["documents"] == summaries[2]["documents"]
    assert sum(1 for lab in next(iter(PreparedData.open(cache).train)).labels if lab != IGNORE) > 0


# -- the cache is keyed by the inputs' contents, not their paths ----------------------------------
def _edit_last_line_in_place(path: Path) -> None:
    """Another text on the last line, the file's size unchanged (what a fingerprint of the size alone
    would miss)."""
    raw = path.read_bytes()
    cut = raw.rstrip(b"\n").rfind(b"\n") + 1
    last = json.loads(raw[cut:])
    last["text"] = "".join("x" if c != " " else " " for c in last["text"])
    edited = raw[:cut] + json.dumps(last).encode() + b"\n"
    assert len(edited) == len(raw) and edited != raw
    path.write_bytes(edited)


def test_cache_folder_follows_the_input_contents(tmp_path, tiny_model_dir, monkeypatch):
    """Editing a data file in place (same size, another tail) gives a new prepared folder; the same
    file, unchanged, reuses the cache without tokenizing again."""
    from ctrltok.core.inputs import HEAD_TAIL, PREPARED_MANIFEST
    from ctrltok.data.prepare import prepared_for
    from ctrltok.data.store import MANIFEST

    assert PREPARED_MANIFEST == MANIFEST  # the data layer takes the name from core/inputs.py
    mapping = _recipe(tmp_path, "text", tiny_model_dir)
    data = _texts(tmp_path / "big.jsonl", 9000)  # the tail is past the hashed head
    assert data.stat().st_size > 2 * HEAD_TAIL
    mapping["data"].update({"train": str(data), "limit": 40})  # the edit is past the records read, too
    recipe = recipe_from_mapping(mapping)
    tokenizer, _ = prepare_tokenizer(recipe)
    root = tmp_path / "cache"
    first = prepared_for(recipe, tokenizer, root=root)
    assert first.path == cache_folder(recipe, tokenizer, root)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the data was tokenized again")

    with monkeypatch.context() as m:
        m.setattr(prepare_module, "_run", no_tokenizing)
        again = prepared_for(recipe_from_mapping(mapping), tokenizer, root=root)
    assert again.path == first.path
    _edit_last_line_in_place(data)
    edited = recipe_from_mapping(mapping)
    assert cache_folder(edited, tokenizer, root) != first.path
    second = prepared_for(edited, tokenizer, root=root)
    assert second.path != first.path and (second.path / MANIFEST).is_file()
    assert second.manifest["sources_key"] != first.manifest["sources_key"]
    assert sorted(p.name for p in root.iterdir()) == sorted([first.path.name, second.path.name])


def test_prepare_refuses_other_input_contents(tmp_path, tiny_model_dir, capsys):
    """An unfinished prepared folder resumes only over the same contents (the stage runner's check),
    and ``ctrltok prepare`` refuses a finished one made from other contents: one line naming the input."""
    from ctrltok.cli.main import main
    from ctrltok.core.stages import ResumeError
    from ctrltok.data.store import MANIFEST

    mapping = _recipe(tmp_path, "text", tiny_model_dir)
    data = Path(mapping["data"]["train"])
    recipe = recipe_from_mapping(mapping)
    tokenizer, _ = prepare_tokenizer(recipe)
    prepare(recipe, tokenizer, tmp_path / "p", shard_size=100)
    (tmp_path / "p" / MANIFEST).unlink()  # as if killed before the end: the shards and run.json stay
    original = data.read_bytes()
    _edit_last_line_in_place(data)
    with pytest.raises(ResumeError, match=rf"unfinished run read other inputs: data.train {data}: contents changed"):
        prepare(recipe_from_mapping(mapping), tokenizer, tmp_path / "p", shard_size=100)
    data.write_bytes(original)
    prepare(recipe_from_mapping(mapping), tokenizer, tmp_path / "p", shard_size=100)  # the same contents: resumes
    assert (tmp_path / "p" / MANIFEST).is_file()

    path = tmp_path / "r.yaml"
    path.write_text("# Run: ctrltok prepare r.yaml --out DIR\n" + json.dumps(mapping))
    _edit_last_line_in_place(data)
    assert main(["prepare", str(path), "--out", str(tmp_path / "p")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ctrltok prepare: error:")]
    assert len(errors) == 1 and "already prepared from other inputs" in errors[0] and str(data) in errors[0]
