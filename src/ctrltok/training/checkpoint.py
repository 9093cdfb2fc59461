"""Atomic training checkpoints, resume, and the run manifest (``ctrltok.json``).

:class:`RunManifest` is the only code that writes or reads ``ctrltok.json``: what the final save
records beside a model (tokens, template, end-of-turn token, the recipe's values, the run's summary)
and what generation, evaluation, the card and ``inspect`` read back from it. It names no machine:
the local paths among the recipe's values and the run identity's inputs (the data, the base model
folder, the recipe file) are written relative to the run folder (``../data/chats.jsonl``; the key
``paths`` says so), and :meth:`RunManifest.recipe` reads them back as paths from here. Each
checkpoint's ``state.json`` records the run identity the same way: relative to the run folder
(not to the checkpoint's own folder).

A checkpoint is a folder ``<out>/checkpoints/step-000040``::

    model/            DDP, FSDP2, one process: torch.distributed.checkpoint (DCP) of the trainable
                      parameters and the optimizer state, one file per writing rank + .metadata.
                      FSDP2 ranks write their own shards; DDP's replicated tensors are written once.
                      DCP reshards on load: a run may resume on another number of processes, or
                      switch between DDP and FSDP2.
    deepspeed/        DeepSpeed: the engine's own checkpoint (module, ZeRO optimizer partitions)
    scheduler.pt      the learning-rate schedule (main process)
    rng-00000.pt ...  each rank's RNG states: torch, CUDA when present, numpy, python
    state.json        the step, the loader's position (data, plan, rows, per step), the engine

Frozen parameters are left out (under LoRA a checkpoint holds the adapters and the new token rows):
a resumed run rebuilds them from the base model exactly as the first run did. The loader's position
is the step (the order is a pure function of seed and step) plus the data and plan identity.

Publishing: every rank writes into ``step-000040.tmp``; after a barrier the main process writes
``state.json``, makes the bytes durable and renames the folder into place, then the oldest
checkpoints beyond ``train.save_total_limit`` go. A run killed while writing (even by SIGKILL)
never leaves a folder that looks complete; the next run removes the leftovers and resumes from the
newest complete checkpoint. Every rank writes into the same folder, so on several nodes ``--out``
must be on a filesystem they share (``ctrltok.training.engines.check_shared_output``).
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
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from ctrltok.core.config import Recipe, recipe_from_mapping
from ctrltok.core.inputs import portable, portable_inputs

STATE = "state.json"
MANIFEST = "ctrltok.json"
DEFAULT_TEMPLATE = "default"
RELATIVE = "relative to this folder"  # the manifest's `paths` once its local paths are written so


def portable_run(run: Any, base: str | os.PathLike) -> Any:
    """A run identity's dict (``{"values", "inputs", ...}``) with its local paths relative to ``base``."""
    if not isinstance(run, dict):
        return run
    values = run.get("values")
    return {**run, "values": portable(values, base, dotted=True) if isinstance(values, dict) else values,
            "inputs": portable_inputs(run.get("inputs"), base)}


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
    def for_run(cls, token_manifest: dict, recipe: Recipe, end_of_turn: str, summary: dict,
                run: dict | None = None) -> RunManifest:
        """The manifest the final save of a training run writes (``complete`` set by :meth:`write`);
        ``run``: the run's identity (:mod:`ctrltok.training.runs`), what a rerun is compared with."""
        return cls({**token_manifest, "template": recipe.data.template, "end_of_turn": end_of_turn,
                    "recipe": recipe.name, "recipe_values": asdict(recipe), "summary": summary, "run": run,
                    "complete": False})

    def write(self, model_dir: str | os.PathLike, complete: bool | None = None) -> Path:
        """Write atomically (a temporary file renamed into place): a reader never sees half a file.
        The file's local paths are relative to ``model_dir`` (see the module docstring); ``values``
        in memory keep them as the run was given them (the card, written from them, scrubs its own)."""
        if complete is not None:
            self.values["complete"] = complete
        values = self.values
        if values.get("paths") != RELATIVE:  # as given (a run's final save): written relative, once
            values = {**values, "paths": RELATIVE}
            if isinstance(values.get("recipe_values"), dict):
                values["recipe_values"] = portable(values["recipe_values"], model_dir)
            if "run" in values:
                values["run"] = portable_run(values["run"], model_dir)
        path = Path(model_dir) / MANIFEST
        tmp = path.with_name(MANIFEST + ".tmp")
        tmp.write_text(json.dumps(values, indent=1, default=str), encoding="utf-8")
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
        if self.values.get("paths") == RELATIVE and self.path is not None:
            values = portable(values, self.path.parent, back=True)
        values = {k: v for k, v in values.items() if k != "source" and v is not None}
        return recipe_from_mapping(values, f"{self.path or MANIFEST}:recipe_values")


def checkpoint_root(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def _complete(root: Path) -> list[Path]:
    """Published checkpoints, oldest first."""
    if not root.exists():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and ".tmp" not in p.name
            and (p / STATE).exists()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(out_dir: Path) -> Path | None:
    done = _complete(checkpoint_root(out_dir))
    return done[-1] if done else None


def clean_partial(out_dir: Path) -> None:
    root = checkpoint_root(out_dir)
    if root.exists():
        for p in root.iterdir():
            if ".tmp" in p.name:
                shutil.rmtree(p, ignore_errors=True)


def _raw(optimizer):
    """The torch optimizer under accelerate's wrapper (DCP reads its param_groups and state)."""
    return getattr(optimizer, "optimizer", optimizer)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(folder)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: Path, step: int, accelerator, model: torch.nn.Module, optimizer, scheduler,
                    state: dict, keep: int | None = 2, deepspeed: bool = False) -> Path:
    """Every rank: write this rank's part of checkpoint ``step``; the main process publishes it.
    ``keep``: checkpoints kept after this one is published (None: all)."""
    root = checkpoint_root(out_dir)
    final = root / f"step-{step:06d}"
    tmp = root / f"{final.name}.tmp"
    main, rank = accelerator.is_main_process, accelerator.process_index
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / ("deepspeed" if deepspeed else "model")).mkdir(parents=True)
    accelerator.wait_for_everyone()
    if deepspeed:  # the engine: module, ZeRO partitions of the optimizer (every rank)
        model.save_checkpoint(str(tmp / "deepspeed"), tag="state", save_latest=False, exclude_frozen_parameters=True)
    else:
        msd, osd = get_state_dict(model, _raw(optimizer), options=StateDictOptions(ignore_frozen_params=True))
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(tmp / "model"))
    torch.save(rng_state(), tmp / f"rng-{rank:05d}.pt")
    if main:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    accelerator.wait_for_everyone()
    if main:
        state = {**state, "step": step, **({"run": portable_run(state["run"], out_dir)} if "run" in state else {})}
        (tmp / STATE).write_text(json.dumps(state, indent=1))
        _fsync_tree(tmp)  # the bytes are durable before the rename makes them visible
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)  # the rename itself
        for old in _complete(root)[:-keep] if keep else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: Path, accelerator, model: torch.nn.Module, optimizer, scheduler,
                    deepspeed: bool = False) -> dict:
    """Every rank: restore the model, optimizer, scheduler and this rank's RNG from ``path``; return
    its ``state.json``."""
    path = Path(path)
    if (path / "trainable.safetensors").exists():
        raise RuntimeError(f"{path}: a checkpoint in an older ctrltok layout (trainable.safetensors); resume it with "
                           "the ctrltok that wrote it, or train into a new --out")
    kind = "deepspeed" if (path / "deepspeed").is_dir() else "model"
    if kind != ("deepspeed" if deepspeed else "model"):
        raise RuntimeError(f"{path}: written by {'a DeepSpeed' if kind == 'deepspeed' else 'a DDP/FSDP2'} run; this run "
                           f"uses {'DeepSpeed' if deepspeed else 'DDP/FSDP2'}. Resume with the same train.strategy")
    if deepspeed:
        loaded, _ = model.load_checkpoint(str(path / "deepspeed"), tag="state", load_module_strict=False,
                                          load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise RuntimeError(f"{path}: DeepSpeed could not read its checkpoint")
    else:
        options = StateDictOptions(ignore_frozen_params=True)
        msd, osd = get_state_dict(model, _raw(optimizer), options=options)
        state = {"model": msd, "optimizer": osd}
        dcp.load(state, checkpoint_id=str(path / "model"))  # a trainable tensor missing from it is an error
        set_state_dict(model, _raw(optimizer), model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    mine = path / f"rng-{accelerator.process_index:05d}.pt"
    if mine.exists():  # absent when resuming on more processes than wrote the checkpoint
        set_rng_state(torch.load(mine, weights_only=False))
    return json.loads((path / STATE).read_text())
