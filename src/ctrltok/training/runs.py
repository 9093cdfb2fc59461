"""A run tied to its settings: what a training run is made of, and whether an output folder holds it.

A :class:`RunIdentity` is two things, hashed into one ``key``:

* ``values``: the recipe's values that change what is trained, by dotted key (``train.lr``,
  ``data.train``, ``lora.target_modules``, ...). Left out (:data:`EXCLUDED`): ``name`` and
  ``source`` (labels), ``train.log_every``, ``train.report_to``, ``train.push_to_hub``,
  ``train.save_total_limit`` (what is reported, uploaded or kept), ``train.compile``,
  ``train.gradient_checkpointing`` and ``train.strategy`` (how it runs: the same weights; DDP and
  FSDP2 checkpoints load into each other), ``data.workers`` (encoding processes), the
  ``backtranslate`` section (the pipeline's, not the trainer's) and ``decoding`` (how the saved
  model is served, written at the final save).
* ``inputs``: a fingerprint of every input the recipe reads (:func:`~ctrltok.core.inputs.recipe_inputs`):
  per file its path, size and a hash of its first and last 256 KiB (an edit of the middle that
  keeps the size is not seen); per folder the same for each data file in it; for a prepared folder
  its manifest's keys; for a hub dataset its name and revision; for a local model folder its
  config, tokenizer and weight files (:mod:`ctrltok.core.inputs`).

A local path among the values (``data.train``, ``model.name``, ... :data:`~ctrltok.core.inputs.PATH_KEYS`)
is compared by its input's fingerprint, not by its spelling: the same file named by another path,
or a run folder moved elsewhere (whose manifest records paths relative to itself), is the same run.

The identity is stored in the run manifest (``ctrltok.json``, key ``run``) and in every checkpoint
(``state.json``, key ``run``). :func:`check_run` compares it, before anything loads, with what an
output folder holds:

* nothing there: ``"fresh"``;
* a finished run of the same identity: ``"done"`` (nothing to train);
* an unfinished one of the same identity: ``"resume"`` from the newest checkpoint;
* other settings: a :class:`RunError` naming the keys that differ and the two ways on: a new
  output folder (``--out``), or ``resume_with_changes`` (``--resume-with-changes``) when every
  difference is one of :data:`SAFE_CHANGES` (more steps or tokens, other eval/save intervals);
* a ``train.max_steps`` below the step the folder already reached: a :class:`RunError`.

Resumable stage folders (:mod:`ctrltok.core.stages`) compare their inputs' fingerprints
themselves (``StageRun(inputs=...)``: ``label``, ``annotate``, ``prepare``); :func:`check_inputs`
records them beside the stage files of a pipeline whose stages do not (``backtranslate``).
"""

from __future__ import annotations

import hashlib
import json
import os
import typing
from dataclasses import MISSING, asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

from ctrltok.core.config import ConfigError, Recipe
from ctrltok.core.inputs import (
    PATH_KEYS,
    changed,
    content,
    describe,
    pathless,
    recipe_inputs,
    what_changed,
)
from ctrltok.core.stages import atomic_write
from ctrltok.training.checkpoint import STATE, RunManifest, latest_checkpoint

Status = Literal["fresh", "resume", "done"]
VERSION = 1
# Recipe values that do not change what is trained (see the module docstring).
EXCLUDED = ("name", "source", "train.log_every", "train.report_to", "train.push_to_hub", "train.save_total_limit",
            "train.compile", "train.gradient_checkpointing", "train.strategy", "data.workers", "backtranslate",
            "decoding")
# What --resume-with-changes may change in a run that has started: how long it trains, how often it
# evaluates and saves. The data order is a function of the seed and the step, so a longer run
# continues the same sequence (the learning-rate schedule is stretched to the new length).
SAFE_CHANGES = ("train.max_steps", "train.num_tokens", "train.epochs", "train.eval_every", "train.save_every")
INPUTS_FILE = "ctrltok-inputs.json"  # check_inputs' record beside a stage folder's shards


class RunError(ConfigError):
    """An output folder that holds a run made with other settings, or one further along than asked."""


# -- the recipe's values --------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _sections() -> dict[str, type]:
    """Recipe field -> its dataclass, for every section (``model``, ..., ``epe``, ``conditional``)."""
    out = {}
    for name, tp in typing.get_type_hints(Recipe).items():
        candidates = [tp, *typing.get_args(tp)]
        cls = next((c for c in candidates if is_dataclass(c)), None)
        if cls is not None:
            out[name] = cls
    return out


SECTIONS = _sections()


def recipe_values(recipe: Recipe | dict[str, Any]) -> dict[str, Any]:
    """The values of ``recipe`` (a :class:`Recipe`, or its ``asdict`` form as a manifest records it)
    that change what is trained, by dotted key. An absent optional section is ``{"epe": None}``."""
    raw = asdict(recipe) if is_dataclass(recipe) else dict(recipe)
    out: dict[str, Any] = {}
    for section, value in raw.items():
        if section in EXCLUDED:
            continue
        if section in SECTIONS and isinstance(value, dict):
            for key, v in value.items():
                dotted = f"{section}.{key}"
                if dotted not in EXCLUDED:
                    out[dotted] = _plain(v)
        else:
            out[section] = _plain(value)
    return out


def _field_default(dotted: str) -> Any:
    """The default of one recipe field (what an identity stored before the field existed meant)."""
    section, _, key = dotted.partition(".")
    cls = SECTIONS.get(section)
    for f in fields(cls) if cls is not None else ():
        if f.name == key:
            if f.default is not MISSING:
                return _plain(f.default)
            if f.default_factory is not MISSING:
                return _plain(f.default_factory())
    return _Absent


class _Absent:
    """A key one identity has and the other has no default for."""


# -- the identity ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunIdentity:
    """What a training run is made of (see the module docstring); ``inputs`` is ``None`` when
    unknown (a run recorded before identities were, rebuilt from its manifest's recipe values)."""

    values: dict[str, Any]
    inputs: dict[str, Any] | None
    key: str = ""

    @classmethod
    def of(cls, values: dict[str, Any], inputs: dict[str, Any] | None) -> RunIdentity:
        text = json.dumps({"values": {k: _compared(k, v) for k, v in values.items()},
                           "inputs": {k: content(v) for k, v in (inputs or {}).items()}}, sort_keys=True, default=str)
        return cls(values, inputs, hashlib.sha256(text.encode("utf-8")).hexdigest()[:16])

    def to_dict(self) -> dict[str, Any]:
        """What the manifest's and each checkpoint's ``run`` key holds."""
        return {"version": VERSION, "key": self.key, "values": self.values, "inputs": self.inputs}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunIdentity:
        return cls(dict(data.get("values") or {}), data.get("inputs"), str(data.get("key", "")))

    def differences(self, old: RunIdentity) -> list[tuple[str, Any, Any]]:
        """``(key, old value, this value)`` for every recipe value and input that differs."""
        out = []
        dropped = {k for k, v in {**old.values, **self.values}.items() if k in SECTIONS}
        for key in sorted(set(self.values) | set(old.values)):
            if key.partition(".")[0] in dropped and "." in key:
                continue  # an optional section present on one side only: reported once, by its name
            new_v = self.values.get(key, _field_default(key))
            old_v = old.values.get(key, _field_default(key))
            if key in SECTIONS:  # `epe: None` on one side, its fields on the other
                new_v = None if self.values.get(key, "set") is None else "set"
                old_v = None if old.values.get(key, "set") is None else "set"
            if _compared(key, new_v) != _compared(key, old_v):
                out.append((key, old_v, new_v))
        if old.inputs is not None and self.inputs is not None:
            for key in changed(old.inputs, self.inputs):
                base = key.split("[", 1)[0]  # data.train[1] is one source of data.train
                if not any(d[0] in (key, base) for d in out):
                    out.append((f"{key} (contents)", describe(old.inputs.get(key)), describe(self.inputs.get(key))))
        return out


def _compared(key: str, value: Any) -> Any:
    """A value as identities compare it: a local path by its input's fingerprint (in ``inputs``), so
    not by how it is spelled here."""
    return pathless(value) if key in PATH_KEYS else value


def run_identity(recipe: Recipe) -> RunIdentity:
    """``recipe``'s identity: its values that change what is trained and its inputs' fingerprints.
    Reads a few hundred KiB per input file; a missing input is a :class:`ConfigError` naming its key."""
    return RunIdentity.of(recipe_values(recipe), recipe_inputs(recipe))


# -- an output folder -----------------------------------------------------------------------------
def _short(value: Any, width: int = 40) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def _stored(manifest: RunManifest) -> RunIdentity | None:
    """The identity a manifest records; for one written before identities were, its recipe values."""
    if isinstance(manifest.values.get("run"), dict):
        return RunIdentity.from_dict(manifest.values["run"])
    if isinstance(manifest.values.get("recipe_values"), dict):
        return RunIdentity.of(recipe_values(manifest.values["recipe_values"]), None)
    return None


def check_run(out_dir: str | os.PathLike, recipe: Recipe, identity: RunIdentity,
              resume_with_changes: bool = False) -> Status:
    """What training ``recipe`` into ``out_dir`` means: ``"fresh"``, ``"resume"`` (from the newest
    checkpoint; with ``resume_with_changes`` also a finished run continued) or ``"done"``; a
    :class:`RunError` when the folder holds a run made with other settings (the rules are in the
    module docstring). Reads the manifest and the newest checkpoint's ``state.json`` only."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RunError(f"{out}: --out is a file; give a folder for the run")
    if not out.exists():
        return "fresh"
    try:
        manifest = RunManifest.read(out)
    except ValueError as exc:
        raise RunError(f"{exc}; this folder's manifest is damaged: train into a new --out") from None
    last = latest_checkpoint(out)
    if manifest.complete:
        stored, reached, what = _stored(manifest), manifest.summary.get("steps"), "a finished run"
        if stored is None:
            raise RunError(f"{out}: holds a model that no training run wrote (no recipe in {manifest.path.name}); "
                           "train into a new --out")
    elif last is not None:
        state = json.loads((last / STATE).read_text(encoding="utf-8"))
        run = state.get("run")
        stored, reached = (RunIdentity.from_dict(run) if isinstance(run, dict) else None), state.get("step")
        what = f"a run stopped at step {reached} ({last.name})"
        if stored is None:  # a checkpoint written before identities were: the loader check still applies
            return "resume"
    elif manifest.exists:  # the final save was cut short; no checkpoint to resume from
        stored, reached, what = _stored(manifest), None, "a run whose final save did not finish"
        if stored is None:
            return "fresh"
    else:
        return "fresh"
    diff = identity.differences(stored)
    if not diff:
        return "done" if manifest.complete else "resume"
    listed = ", ".join(f"{k} {_short(a)} -> {_short(b)}" for k, a, b in diff)
    unsafe = [k for k, _, _ in diff if k not in SAFE_CHANGES]
    if unsafe:
        raise RunError(f"{out}: holds {what} made with other settings: {listed}; train into a new --out "
                       f"({', '.join(unsafe)} cannot change within a run; --resume-with-changes allows only "
                       f"{', '.join(SAFE_CHANGES)})")
    if not resume_with_changes:
        raise RunError(f"{out}: holds {what} made with other settings: {listed}; rerun with "
                       "--resume-with-changes to continue it with the new values, or train into a new --out")
    max_steps = recipe.train.max_steps
    if max_steps is not None and isinstance(reached, int) and max_steps < reached:
        raise RunError(f"{out}: train.max_steps = {max_steps} is below step {reached}, which {what} already "
                       f"reached; give train.max_steps >= {reached}, or train into a new --out")
    return "resume"


def check_steps(out_dir: str | os.PathLike, total_steps: int) -> None:
    """Refuse a run whose total steps (``train.max_steps``, or what ``num_tokens`` / ``epochs``
    come to) end before the newest checkpoint: ``train()`` calls it once the total is known."""
    last = latest_checkpoint(Path(out_dir))
    if last is not None:
        step = int(json.loads((last / STATE).read_text(encoding="utf-8")).get("step", 0))
        if total_steps < step:
            raise RunError(f"{out_dir}: this run would end at step {total_steps}, before its newest checkpoint "
                           f"({last.name}); train for at least {step} steps (train.max_steps), or into a new --out")


# -- stage folders --------------------------------------------------------------------------------
def check_inputs(folder: str | os.PathLike, inputs: dict[str, Any], started: bool, what: str = "run") -> None:
    """Refuse to resume the stage folder ``folder`` over other inputs, for the commands whose stage
    settings do not cover them. ``started``: whether the folder holds a started run (its stage
    runner's ``run.json``); then the inputs recorded at its start must match ``inputs``. Otherwise
    ``inputs`` are recorded (``ctrltok-inputs.json`` in ``folder``) for the run about to start."""
    folder = Path(folder)
    record = folder / INPUTS_FILE
    if started:
        if not record.is_file():
            return  # started before inputs were recorded: nothing to compare with
        try:
            old = json.loads(record.read_text(encoding="utf-8"))
        except ValueError:
            return
        if changed(old, inputs):
            raise RunError(f"{folder}: an unfinished {what} read other inputs: {what_changed(old, inputs)}; rerun "
                           f"with the same inputs to resume it, or write to a new --out (or delete {folder})")
        return
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(record, json.dumps(inputs, indent=1, sort_keys=True), fsync=False)
