"""Atomic training checkpoints, resume, and the run manifest (``ctrltok.json``).

:class:`RunManifest` is the only code that writes or reads ``ctrltok.json``: what the final save
records beside a model (tokens, template, end-of-turn token, the recipe's values, the run's summary)
and what generation, evaluation, the card and ``inspect`` read back from it.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ctrltok.core.config import Recipe, recipe_from_mapping

STATE = "state.json"
MANIFEST = "ctrltok.json"
DEFAULT_TEMPLATE = "default"


@dataclass
class RunManifest:
    """``ctrltok.json``: what a saved model was made with. ``values`` is the JSON object itself
    (``tokens``, ``template``, ``end_of_turn``, ``recipe``, ``recipe_values``, ``summary``,
    ``complete``, ...), kept as a dict so older and newer files round-trip unchanged."""

    values: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @classmethod
    def read(cls, model_dir: str | os.PathLike) -> RunManifest:
        """The manifest in ``model_dir``; an empty one when there is none (a hub model, a plain folder)."""
        path = Path(model_dir) / MANIFEST
        if not path.is_file():
            return cls({}, None)
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a JSON object, found {type(values).__name__}")
        return cls(values, path)

    @classmethod
    def for_run(cls, token_manifest: dict, recipe: Recipe, end_of_turn: str, summary: dict) -> RunManifest:
        """The manifest the final save of a training run writes (``complete`` set by :meth:`write`)."""
        return cls({**token_manifest, "template": recipe.data.template, "end_of_turn": end_of_turn,
                    "recipe": recipe.name, "recipe_values": asdict(recipe), "summary": summary, "complete": False})

    def write(self, model_dir: str | os.PathLike, complete: bool | None = None) -> Path:
        """Write atomically (a temporary file renamed into place): a reader never sees half a file."""
        if complete is not None:
            self.values["complete"] = complete
        path = Path(model_dir) / MANIFEST
        tmp = path.with_name(MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self.values, indent=1, default=str), encoding="utf-8")
        os.replace(tmp, path)
        self.path = path
        return path

    @property
    def exists(self) -> bool:
        return self.path is not None

    @property
    def complete(self) -> bool:
        return bool(self.values.get("complete", False))

    @property
    def template(self) -> str:
        """The chat template the model was trained with (``default`` when unknown)."""
        return self.values.get("template") or DEFAULT_TEMPLATE

    @property
    def end_of_turn(self) -> str | None:
        return self.values.get("end_of_turn")

    @property
    def tokens(self) -> list[dict]:
        return list(self.values.get("tokens") or [])

    @property
    def summary(self) -> dict:
        return dict(self.values.get("summary") or {})

    def recipe(self) -> Recipe | None:
        """The training recipe, rebuilt from the recorded values (``None`` if none were recorded)."""
        values = self.values.get("recipe_values")
        if not isinstance(values, dict):
            return None
        values = {k: v for k, v in values.items() if k != "source" and v is not None}
        return recipe_from_mapping(values, f"{self.path or MANIFEST}:recipe_values")


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
