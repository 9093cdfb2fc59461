"""What a command reads, by content: input fingerprints, and input paths recorded without the machine.

A *fingerprint* names an input by what is in it, cheaply (:func:`input_fingerprint`):

    a file                 {"path", "size", "head_tail"}: its size and a hash of its first and last
                           256 KiB (an edit of the middle that keeps the size is not seen)
    a folder               {"path", "files": [...]}: the same for each data file in it
    a prepared folder      {"path", "prepared", "tokenizer", "sources"}: its manifest's keys
    ctrltok:<resource>     the shipped file's fingerprint
    a hub dataset          {"hub", "revision", "data_files"}
    a local model folder   its config, tokenizer and weight files (:func:`model_fingerprint`)

Two fingerprints are of the same input when their :func:`content` (the fingerprint without the
``path`` it was read from) is equal: the same bytes elsewhere are the same input. The run identity
(:mod:`ctrltok.training.runs`), the stage runner's resume check (``StageRun(inputs=...)`` in
:mod:`ctrltok.core.stages`: labelling, annotation, ``prepare``) and the prepared-data cache key
(:mod:`ctrltok.data.prepare`) all use these, so an input that changed in place is seen everywhere
the same way.

Paths a run records (``ctrltok.json``, each checkpoint's ``state.json``) name no machine:
:func:`portable` writes the recipe's path values (:data:`PATH_KEYS`) relative to the run folder,
``./`` or ``../`` first, and :func:`resolved` reads them back. :func:`is_local` tells a local path
from a ``ctrltok:`` resource, an ``hf:`` spec or a hub name, so that identities compare local inputs
by their fingerprints, never by how the path was spelled (a moved run folder still resumes).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ctrltok.core.config import ConfigError, Recipe, SourceConfig, source_config
from ctrltok.core.records import FORMATS, RecordError, file_format, resource_path

HEAD_TAIL = 1 << 18  # bytes hashed at each end of a file
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
# A prepared data folder's manifest (data/store.py writes and reads it under this name, imported from
# here): a prepared folder is fingerprinted by its keys, and core cannot import the data layer.
PREPARED_MANIFEST = "ctrltok-data.json"
# A LoRA run's adapter folder inside its output, in PEFT's format (core/models.py loads it and
# re-exports these): named here because fingerprinting an adapter-only run must not import torch.
ADAPTER = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Recipe values that may name a local file or folder (dotted keys; ``source`` is the recipe file).
PATH_KEYS = ("source", "model.name", "tokens.charter", "data.train", "data.eval", "epe.sidecar",
             "epe.eval_sidecar", "train.deepspeed", "backtranslate.corpus", "backtranslate.gold",
             "backtranslate.seed_model", "backtranslate.backward_system", "backtranslate.rewrite_prompt",
             "backtranslate.curation_prompt")
NOT_PATHS = ("ctrltok:", "hf:", "python:")  # shipped resources, hub specs, built-in corpora
LOCAL = "<local path>"  # what a local path reads as in a comparison (its content is compared apart)


# -- fingerprints ---------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def file_fingerprint(path: str | os.PathLike, name: str | None = None) -> dict[str, Any]:
    """``{"path", "size", "head_tail"}``: the size and a hash of the first and last ``HEAD_TAIL`` bytes."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        digest.update(fh.read(HEAD_TAIL))
        if size > HEAD_TAIL:
            fh.seek(max(HEAD_TAIL, size - HEAD_TAIL))
            digest.update(fh.read(HEAD_TAIL))
    return {"path": name or str(path), "size": size, "head_tail": digest.hexdigest()[:16]}


def data_files(folder: Path) -> list[Path]:
    """The files of a folder that ctrltok reads as records (what ``core.records`` reads, in order)."""
    return [p for p in sorted(folder.iterdir()) if p.is_file() and file_format(p)[0] is not None]


def _folder_fingerprint(folder: Path, name: str) -> dict[str, Any]:
    manifest = folder / PREPARED_MANIFEST
    if manifest.is_file():  # a prepared folder: its keys say what it was made from
        try:
            m = json.loads(manifest.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise RecordError(f"{manifest}: not valid JSON ({exc}); prepare the folder again") from None
        out = {"path": name, "prepared": m.get("data_key"), "tokenizer": m.get("tokenizer")}
        if m.get("sources_key"):  # absent in folders prepared before inputs were recorded
            out["sources"] = m["sources_key"]
        return out
    files = data_files(folder)
    if not files:
        kinds = ", ".join(f"*.{f}" for f in FORMATS)
        raise RecordError(f"{folder}: no data files in this folder (ctrltok reads {kinds}, .jsonl and .json "
                          "also .gz or .zst compressed); point at a file or a folder holding such files")
    return {"path": name, "files": [{**file_fingerprint(p), "path": p.name} for p in files]}


def input_fingerprint(source: str | os.PathLike | SourceConfig | dict) -> dict[str, Any]:
    """The fingerprint of one input as :func:`ctrltok.core.records.read_records` reads it: a file, a
    folder (its data files; a prepared folder by its keys), ``ctrltok:<resource>``, or a hub
    dataset (by name and revision). A folder without data files, or a missing file, is a
    :class:`~ctrltok.core.records.RecordError` naming it."""
    src = source_config(str(source) if isinstance(source, Path) else source, "input")
    if src.hf is not None:
        return {"hub": src.label, "revision": src.revision, "data_files": _plain(src.data_files)}
    text = str(src.path)
    if text.startswith("ctrltok:"):
        return file_fingerprint(resource_path(text.split(":", 1)[1]), text)
    path = Path(text).expanduser()
    if path.is_dir():
        return _folder_fingerprint(path, text)
    if path.is_file():
        return file_fingerprint(path, text)
    if file_format(path)[0] is not None or text.startswith(("/", "./", "../", "~")):
        raise RecordError(f"{text}: no such file")
    return {"hub": text}  # a `datasets` name (core.records reads it so)


def model_fingerprint(name: str) -> dict[str, Any] | None:
    """A local model folder's config, tokenizer and weight files; an adapter-only run's (no
    ``config.json``: ``save.merged: false``) also its adapter's config and weights, ``adapter/...``,
    the weights it is loaded with. ``None`` for an alias or hub name (the name itself is among the
    recipe's values)."""
    path = Path(name).expanduser()
    if not path.is_dir():
        return None
    files = [p for p in sorted(path.iterdir()) if p.is_file()
             and (p.name in MODEL_FILES or p.suffix in (".safetensors", ".bin", ".gguf"))]
    adapter = path / ADAPTER
    # Only where the adapter is what loads (core.models.adapter_only): beside merged weights it is
    # already in them, and counting it would change the fingerprint recorded by runs on such folders.
    if not (path / "config.json").is_file() and adapter.is_dir():
        files += [p for p in sorted(adapter.iterdir()) if p.is_file()
                  and (p.name == ADAPTER_CONFIG or p.suffix == ".safetensors")]
    return {"path": name, "files": [{**file_fingerprint(p), "path": p.relative_to(path).as_posix()} for p in files]}


def recipe_inputs(recipe: Recipe, data_only: bool = False) -> dict[str, dict[str, Any]]:
    """Fingerprints of everything ``recipe`` reads, by the dotted key that names it (with
    ``data_only``, what the prepared documents are made from: no model, no DeepSpeed config). A
    missing input is a :class:`ConfigError` naming the recipe file and the key."""
    out: dict[str, dict[str, Any]] = {}
    for which in ("train", "eval"):
        if getattr(recipe.data, which) is None:
            continue
        sources = recipe.data.sources(which)
        for i, src in enumerate(sources):
            key = f"data.{which}" + (f"[{i}]" if len(sources) > 1 else "")
            try:
                out[key] = input_fingerprint(src)
            except RecordError as exc:
                raise ConfigError(f"{recipe.source}: {key}: {exc}") from None
    files = {"tokens.charter": recipe.tokens.charter, "train.deepspeed": None if data_only else recipe.train.deepspeed}
    if recipe.epe is not None:
        files.update({"epe.sidecar": recipe.epe.sidecar, "epe.eval_sidecar": recipe.epe.eval_sidecar})
    for key, value in files.items():
        if value:
            try:  # `ctrltok:<resource>` names a shipped file (the sidecar of epe-cpu, say)
                path = resource_path(value.split(":", 1)[1]) if value.startswith("ctrltok:") else Path(value).expanduser()
            except RecordError as exc:
                raise ConfigError(f"{recipe.source}: {key}: {exc}") from None
            if not path.is_file():
                raise ConfigError(f"{recipe.source}: {key} = {value!r}: no such file")
            out[key] = file_fingerprint(path, value)
    fingerprint = None if data_only else model_fingerprint(recipe.model.name)
    if fingerprint is not None:
        out["model.name"] = fingerprint
    return out


def content(fingerprint: dict[str, Any] | None) -> Any:
    """A fingerprint without the path it was read from: the same bytes elsewhere are the same input."""
    if not isinstance(fingerprint, dict):
        return fingerprint
    return {k: v for k, v in fingerprint.items() if k != "path"}


def changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The names whose fingerprints in ``old`` and ``new`` differ in content, sorted."""
    return [k for k in sorted(set(old) | set(new)) if content(old.get(k)) != content(new.get(k))]


def describe(fingerprint: dict[str, Any] | None) -> str:
    """A fingerprint for a person: its size and hash, its files, or its prepared data key."""
    if not fingerprint:
        return "none"
    if "size" in fingerprint:
        return f"{fingerprint['size']:,} bytes, {fingerprint['head_tail']}"
    if "files" in fingerprint:
        return f"{len(fingerprint['files'])} files, {sum(f['size'] for f in fingerprint['files']):,} bytes"
    if "prepared" in fingerprint:
        return f"prepared data {fingerprint['prepared']}"
    return json.dumps(fingerprint, sort_keys=True)


def what_changed(old: dict[str, Any], new: dict[str, Any]) -> str:
    """``old`` and ``new`` (fingerprints by name) as one clause naming every input that differs:
    ``input a.jsonl -> b.jsonl`` or ``input a.jsonl: contents changed (12 bytes, 3f.. -> ...)``."""
    parts = []
    for key in changed(old, new):
        a, b = old.get(key) or {}, new.get(key) or {}
        if a.get("path") is not None and a.get("path") == b.get("path"):
            parts.append(f"{key} {a['path']}: contents changed ({describe(a)} -> {describe(b)})")
        else:
            parts.append(f"{key} {a.get('path', describe(a))} -> {b.get('path', describe(b))}")
    return "; ".join(parts)


# -- paths without the machine --------------------------------------------------------------------
def is_local(text: Any) -> bool:
    """Whether a recipe's path value names a local file or folder (not ``ctrltok:``, ``hf:``,
    ``python:`` or a hub name): by its spelling (absolute, ``./``, ``../``, ``~``, a file suffix),
    else, for ``a/b``, by whether it exists here (a hub name is spelled so too). A bare name
    (``smollm2-135m``, ``model``) is an alias or a keyword, and stays as it is."""
    if not isinstance(text, str) or not text or text.startswith(NOT_PATHS):
        return False
    if text.startswith(("/", "./", "../", "~")) or text in (".", ".."):
        return True
    path = Path(text)
    if file_format(path)[0] is not None or path.suffix in (".json", ".txt", ".yaml", ".yml"):
        return True
    return "/" in text and path.exists()


def _map_paths(value: Any, fn) -> Any:
    """``fn`` over the path strings of one recipe value: a string, a list of strings and source
    mappings (their ``path``), or a mapping."""
    if isinstance(value, str):
        return fn(value) if is_local(value) else value
    if isinstance(value, list):
        return [_map_paths(v, fn) for v in value]
    if isinstance(value, dict) and isinstance(value.get("path"), str):
        return {**value, "path": _map_paths(value["path"], fn)}
    return value


def pathless(value: Any) -> Any:
    """A recipe value with every local path read as :data:`LOCAL`: how an identity compares values
    whose inputs it compares by fingerprint (so a path spelled otherwise, or a moved run folder,
    is no difference)."""
    return _map_paths(value, lambda _: LOCAL)


def portable_path(text: str, base: str | os.PathLike) -> str:
    """A local path as written in a run folder ``base``: relative to it, ``./`` or ``../`` first."""
    rel = os.path.relpath(os.path.abspath(os.path.expanduser(text)), os.path.abspath(base))
    return rel if rel == "." or rel.startswith("..") else f"./{rel}"


def resolved_path(text: str, base: str | os.PathLike) -> str:
    """A path :func:`portable_path` wrote, back as a path from here (absolute ones unchanged)."""
    return os.path.normpath(os.path.join(base, text)) if text.startswith(("./", "../")) or text in (".", "..") else text


def portable(values: dict[str, Any], base: str | os.PathLike, dotted: bool = False, back: bool = False) -> dict:
    """``values`` with the local paths of :data:`PATH_KEYS` written relative to ``base`` (``back``:
    read back from there). ``values`` is nested by section (``{"data": {"train": ...}}``, as
    ``asdict(recipe)``) or, with ``dotted``, flat (``{"data.train": ...}``, as an identity)."""
    fn = (lambda p: resolved_path(p, base)) if back else (lambda p: portable_path(p, base))
    out = dict(values)
    for key in PATH_KEYS:
        section, _, name = key.partition(".")
        if dotted or not name:
            if key in out:
                out[key] = _map_paths(out[key], fn)
        elif isinstance(out.get(section), dict) and name in out[section]:
            out[section] = {**out[section], name: _map_paths(out[section][name], fn)}
    return out


def portable_inputs(inputs: dict[str, Any] | None, base: str | os.PathLike) -> dict[str, Any] | None:
    """Fingerprints by name with each local ``path`` written relative to ``base``."""
    if not isinstance(inputs, dict):
        return inputs
    out = {}
    for key, fp in inputs.items():
        if isinstance(fp, dict) and isinstance(fp.get("path"), str):
            fp = {**fp, "path": _map_paths(fp["path"], lambda p: portable_path(p, base))}
        out[key] = fp
    return out
