"""Kill-and-resume through the CLI, as a user meets it: ``ctrltok train`` is killed with SIGKILL from
outside, once at a random step and once in the middle of writing a checkpoint, with LoRA on and
``lora.dropout`` > 0 (so the dropout masks after the resume depend on the restored RNG state); the
same command rerun resumes, and the final weights and the logged losses equal an uninterrupted run
exactly (max abs diff 0.0 over every tensor the run saves).

How the kills are placed:

* at a random step: a seeded draw of step ``k``; the test watches ``DIR/metrics.jsonl`` (one line
  per step) and sends SIGKILL once step ``k`` is logged. The process runs on meanwhile, so it dies
  somewhere after step ``k``: at a step, or inside a save; the test asserts only that it died
  before finishing.
* in the middle of a save: a save of a tiny model lasts milliseconds, too short to hit by watching
  the folder. ctrltok has no hook that slows a save, so the command runs under a small wrapper
  (``python -c`` that calls the same ``ctrltok.cli.main.main``) which replaces one function the
  save calls with one that writes a marker file and sleeps. The wrapper only pauses the process:
  the test kills it from outside, by SIGKILL, while ``checkpoints/step-N.tmp`` is half written.
  Where it pauses is a seeded draw between the two places a save can be caught: after the sharded
  model and optimizer are written (no RNG, scheduler or state.json yet), and after state.json is
  written but before the folder is renamed into place (the folder that looks most complete).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ctrltok.cli.main import main

MAX_STEPS = 10
SAVE_EVERY = 2
SEED = 15  # the draws of the kill step and the save pause point

# Run in the subprocess instead of `python -m ctrltok`: the same CLI entry, with one function of the
# checkpoint writer replaced by a pause (see the module docstring). argv[1] names the function.
PAUSE_IN_SAVE = """
import sys, time
from pathlib import Path
import ctrltok.training.checkpoint as ckpt

where, marker = sys.argv[1], Path(sys.argv[2])
original = getattr(ckpt, where)

def paused(*args, **kwargs):
    marker.write_text(where)
    time.sleep(3600)  # killed from outside long before this ends
    return original(*args, **kwargs)

setattr(ckpt, where, paused)
from ctrltok.cli.main import main
sys.exit(main(sys.argv[3:]))
"""
# rng_state: called right after the sharded model and optimizer are written; _fsync_tree: called
# after state.json is written, before the rename that publishes the checkpoint.
PAUSE_POINTS = ("rng_state", "_fsync_tree")


def _env() -> dict[str, str]:
    # One thread: the same float reductions in every process (and less load on a shared machine).
    return {**os.environ, "CTRLTOK_PROGRESS": "0", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def recipe_file(tiny_model_dir, tmp_path_factory) -> Path:
    mapping = {
        "model": {"name": str(tiny_model_dir)},
        "tokens": {"presets": ["eot"], "pad_to_multiple_of": 64},
        "data": {"train": "ctrltok:instructions", "template": "eot", "max_length": 48, "limit": 40,
                 "eval_fraction": 0.1},
        "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.2,
                 "target_modules": ["q_proj", "v_proj", "gate_proj", "down_proj"]},
        "train": {"lr": 2e-3, "max_steps": MAX_STEPS, "micro_batch_size": 2, "grad_accum": 2, "warmup_steps": 1,
                  "save_every": SAVE_EVERY, "save_total_limit": 2, "log_every": 1, "seed": 3},
    }
    path = tmp_path_factory.mktemp("kill-resume") / "r.yaml"
    path.write_text("# test recipe: ctrltok train r.yaml --out DIR\n" + yaml.safe_dump(mapping))
    return path


def _train_args(recipe: Path, out: Path) -> list[str]:
    return ["train", str(recipe), "--out", str(out)]


@pytest.fixture
def one_thread():
    """In-process runs on one thread, as the subprocesses (OMP_NUM_THREADS=1): the same float sums."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _in_process(args: list[str], capsys) -> str:
    """The same command in this process (no second import of torch and transformers: faster)."""
    code = main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    return captured.out


def _logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line being written as we read
            continue
        if "loss" in record:
            steps.append(record["step"])
    return steps


def _kill_when(proc: subprocess.Popen, ready, what: str, limit_s: float = 300) -> None:
    """SIGKILL ``proc`` from outside as soon as ``ready()`` holds; fail if it ends first."""
    deadline = time.monotonic() + limit_s
    try:
        while not ready():
            if proc.poll() is not None:
                _, err = proc.communicate()
                pytest.fail(f"train ended (exit {proc.returncode}) before {what}:\n{err[-3000:]}")
            assert time.monotonic() < deadline, f"no {what} within {limit_s:.0f} s"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.returncode


def _checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir()) if (out / "checkpoints").is_dir() else []


def _saved_tensors(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor the run saved: the merged model and the LoRA adapter beside it."""
    files = sorted(out.glob("*.safetensors")) + sorted((out / "adapter").glob("*.safetensors"))
    assert files, f"no safetensors in {out}"
    tensors = {}
    for f in files:
        tensors.update({f"{f.relative_to(out)}:{k}": v for k, v in load_file(f).items()})
    return tensors


def _losses(out: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def test_sigkill_at_a_random_step_and_mid_save_resumes_exactly(recipe_file, tmp_path, capsys, one_thread):
    draw = random.Random(SEED)
    # After the first checkpoint (so the first rerun resumes from one), with steps left for the next save.
    kill_step = draw.randrange(SAVE_EVERY + 1, MAX_STEPS - SAVE_EVERY - 1)
    pause_at = draw.choice(PAUSE_POINTS)

    straight = tmp_path / "straight"
    _in_process(_train_args(recipe_file, straight), capsys)

    out = tmp_path / "resumed"
    args = _train_args(recipe_file, out)
    # 1. killed from outside once step `kill_step` is logged (it may be further on when the signal lands)
    proc = subprocess.Popen([sys.executable, "-m", "ctrltok", *args], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _kill_when(proc, lambda: any(s >= kill_step for s in _logged_steps(out)), f"step {kill_step}")
    assert not (out / "ctrltok.json").exists(), "killed, yet the run looks finished"
    complete = [c for c in _checkpoints(out) if ".tmp" not in c]
    assert complete, f"killed after step {max(_logged_steps(out))} with no checkpoint: {_checkpoints(out)}"
    resumed_from = int(complete[-1].split("-")[1])

    # 2. the same command resumes from that checkpoint; killed while its next checkpoint is half written
    marker = tmp_path / "paused-in-save"
    proc = subprocess.Popen([sys.executable, "-c", PAUSE_IN_SAVE, pause_at, str(marker), *args], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _kill_when(proc, marker.exists, f"a save paused in {pause_at}")
    partial = [c for c in _checkpoints(out) if c.endswith(".tmp")]
    assert partial == [f"step-{resumed_from + SAVE_EVERY:06d}.tmp"], _checkpoints(out)
    assert (out / "checkpoints" / partial[0] / "model").is_dir()
    assert (out / "checkpoints" / partial[0] / "state.json").exists() == (pause_at == "_fsync_tree")
    assert not (out / "ctrltok.json").exists()

    # 3. the same command again: resumes from the newest complete checkpoint, finishes
    assert "model saved" in _in_process(args, capsys)
    assert not [c for c in _checkpoints(out) if ".tmp" in c], "the half-written save was not removed"

    assert sorted(_logged_steps(out)) == list(range(1, MAX_STEPS + 1)), "steps lost or logged twice across the resumes"
    assert _losses(out) == _losses(straight), "a resumed step saw other data or other dropout masks"
    a, b = _saved_tensors(straight), _saved_tensors(out)
    assert a.keys() == b.keys() and any("lora_A" in k for k in a)
    diffs = {k: (a[k].double() - b[k].double()).abs().max().item() for k in a}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] == 0.0, f"{len(diffs)} tensors; {worst} differs by {diffs[worst]}"


def test_rerun_after_a_kill_before_the_first_checkpoint_logs_each_step_once(recipe_file, tmp_path, capsys):
    """A run killed before its first checkpoint (with save_every 0: any kill) leaves metrics.jsonl and
    no checkpoint; the rerun starts at step 0, and its log must not keep the dead run's lines (the
    loss curves and the card read every line). The folder is made as SIGKILL leaves it: a log of
    the first steps (lines as the loop writes them), no checkpoint, no manifest."""
    dead = tmp_path / "dead"
    dead.mkdir()
    lines = [{"event": "setup", "step": 0, "total_steps": 3}, {"step": 1, "loss": 10.8, "lr": 0.002},
             {"step": 2, "loss": 10.7, "lr": 0.0019}]
    (dead / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    args = _train_args(recipe_file, dead) + ["--set", "train.max_steps=3", "--set", "train.save_every=0"]
    assert "model saved" in _in_process(args, capsys)
    # NEEDS training/train.py: a run that starts at step 0 must start metrics.jsonl afresh (it is
    # truncated today only when a checkpoint is resumed, so the dead run's lines stay in the log).
    assert _logged_steps(dead) == [1, 2, 3], _logged_steps(dead)
    assert (dead / "metrics.jsonl").read_text().count('"event": "setup"') == 1
