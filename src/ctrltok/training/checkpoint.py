"""Atomic training checkpoints and resume.

A checkpoint is a folder ``<out>/checkpoints/step-000040`` holding the trainable tensors
(safetensors), the optimizer and scheduler state, the RNG states and ``state.json``. It is written
into ``step-000040.tmp-<pid>`` and renamed into place only when complete, so a run killed while
writing (even by SIGKILL) never leaves a folder that looks complete; the next run ignores and
removes the leftovers and resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STATE = "state.json"


def checkpoint_root(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def latest_checkpoint(out_dir: Path) -> Path | None:
    root = checkpoint_root(out_dir)
    if not root.exists():
        return None
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and ".tmp" not in p.name
            and (p / STATE).exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def clean_partial(out_dir: Path) -> None:
    root = checkpoint_root(out_dir)
    if root.exists():
        for p in root.iterdir():
            if ".tmp" in p.name:
                shutil.rmtree(p, ignore_errors=True)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(out_dir: Path, step: int, model: torch.nn.Module, optimizer, scheduler, state: dict,
                    keep: int = 2) -> Path:
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = trainable_state(model)
    shared: dict[int, str] = {}
    unique = {}
    for name, t in tensors.items():  # tied weights appear once
        if t.data_ptr() in shared:
            continue
        shared[t.data_ptr()] = name
        unique[name] = t
    save_file(unique, tmp / "trainable.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
               tmp / "rng.pt")
    (tmp / STATE).write_text(json.dumps({**state, "step": step}, indent=1))
    for f in tmp.iterdir():  # make the bytes durable before the rename makes them visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    done = sorted((p for p in root.iterdir() if p.is_dir() and ".tmp" not in p.name), key=lambda p: p.name)
    for old in done[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler) -> dict:
    tensors = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors
               and not any(q.data_ptr() == p.data_ptr() and m in tensors for m, q in params.items())]
    if missing:
        raise RuntimeError(f"{path}: checkpoint lacks trainable tensors {missing[:3]}; was it written by another recipe?")
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)
    optim = torch.load(path / "optim.pt", weights_only=False)
    optimizer.load_state_dict(optim["optimizer"])
    scheduler.load_state_dict(optim["scheduler"])
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    return json.loads((path / STATE).read_text())
