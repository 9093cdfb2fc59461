"""Checks the commands make before loading anything (model names, templates, inputs, outputs), and
the error a command raises for a misuse. A leaf of the command layer: it imports no other ``cli``
module, so every handler module can use it without an import circle."""

from __future__ import annotations

import json
import os
import re
import sys
from contextlib import contextmanager
from difflib import get_close_matches
from pathlib import Path
from typing import IO, Iterator

from ctrltok.core.cache import ALIASES, default_model_dir, is_complete
from ctrltok.core.records import FORMATS, file_format
from ctrltok.core.templates import NAMES, saved_templates

PRESET_NAMES = ("eot", "oasst", "conditional", "epe")  # core.tokens.PRESETS and epe (tested equal)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}(/[A-Za-z0-9][\w.\-]{0,95})?$")


class UsageError(ValueError):
    """A command-line value that cannot work (a name, a path, an option); the message says which."""


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_model_name(name: str, what: str = "--model") -> None:
    """A model name is an existing path, an alias of the embedded default, or a Hub id (cached, when
    offline); anything else is a :class:`UsageError` now, not after seconds of loading."""
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir() and not any((path / f).is_file() for f in ("config.json", "tokenizer_config.json",
                                                                     "tokenizer.json")):
            raise UsageError(f"{what} {name}: this folder holds no model (no config.json or tokenizer files); "
                             "give a checkpoint folder, an alias or a Hub id")
        return
    if name.lower() in ALIASES:
        return
    aliases = ", ".join(sorted(ALIASES))
    near = get_close_matches(name.lower(), list(ALIASES), n=1)
    hint = f" (did you mean {near[0]}?)" if near else ""
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        raise UsageError(f"{what} {name}: no such folder{hint}; give a checkpoint folder, an alias ({aliases}) "
                         "or a Hub id (OWNER/NAME)")
    if not _HUB_ID.match(name) or "--" in name or ".." in name:
        raise UsageError(f"{what} {name!r} is not a local path, an alias ({aliases}) or a Hub id (OWNER/NAME){hint}")
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise UsageError(f"{what} {name}: no such local folder or alias ({aliases}){hint}, and not in the "
                             "Hugging Face cache while HF_HUB_OFFLINE is set; give a checkpoint folder, or go online")


def default_out(out: str | None, name: str) -> Path:
    """``--out``, else ``runs/<recipe name>``."""
    return Path(out) if out else Path("runs") / name


def check_template(name: str, model: str | None, what: str = "--template") -> None:
    """A template is a shipped name (``core.templates.NAMES``) or one the model folder saves."""
    if name in NAMES:
        return
    local = model is not None and Path(model).expanduser().is_dir()
    saved = sorted(saved_templates(model)) if local else []
    if name in saved:
        return
    if model is not None and not local:
        if model.lower() not in ALIASES:
            return  # a Hub model's own named templates are known only once it is downloaded
    known = sorted(set(NAMES) | set(saved))
    near = get_close_matches(name, known, n=1)
    raise UsageError(f"{what} {name!r} is not a chat template; expected one of {known}"
                     + (f" (did you mean {near[0]}?)" if near else ""))


def check_input(value: str, what: str = "--input") -> None:
    """An input path exists, and a folder holds files ctrltok reads (a name that is no path is
    taken as a dataset on the Hub, as :mod:`ctrltok.core.records` reads it)."""
    if value.startswith(("ctrltok:", "hf:")):
        return
    path = Path(value).expanduser()
    if path.is_dir():
        if (path / "ctrltok-data.json").is_file():
            return
        if not any(p.is_file() and file_format(p)[0] is not None for p in path.iterdir()):
            kinds = ", ".join(f"*.{f}" for f in FORMATS)
            raise UsageError(f"{what} {value}: no data files in this folder (ctrltok reads {kinds}, .jsonl and .json "
                             "also .gz or .zst compressed)")
    elif not path.exists() and (file_format(path)[0] is not None or value.startswith(("/", "./", "../", "~"))):
        raise UsageError(f"{what} {value}: no such file")


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file (through links and relative spellings too)."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return os.path.samefile(pa, pb)
    return pa.resolve() == pb.resolve()


def check_output(out: str, inputs: dict[str, str | None]) -> None:
    """``--out`` may not be one of the command's inputs (it would be overwritten while read)."""
    if out == "-":
        return
    if Path(out).expanduser().is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name")
    for flag, value in inputs.items():
        if value and not str(value).startswith(("ctrltok:", "hf:")) and same_file(out, value):
            raise UsageError(f"--out {out} is the {flag} file: writing it would destroy the input; choose another --out")


@contextmanager
def output_file(out: str) -> Iterator[IO[str]]:
    """``--out``, written to ``OUT.tmp`` and renamed into place when complete: an error leaves an
    existing ``OUT`` as it was, a kill leaves at most ``OUT.tmp``. ``-`` is stdout."""
    if out == "-":
        yield sys.stdout
        sys.stdout.flush()
        return
    path = Path(out).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            yield fh
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def model_vocab(name: str) -> dict[str, int] | None:
    """The token -> id map of a model folder's ``tokenizer.json`` (a local folder, or an alias's converted
    copy; ``None`` when there is none)."""
    folder = Path(name).expanduser()
    if not folder.is_dir():  # an alias: its converted copy, when it is there (never converted here)
        if name.lower() not in ALIASES or not is_complete(default_model_dir()):
            return None
        folder = default_model_dir()
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    vocab = (data.get("model") or {}).get("vocab") or {}
    out = dict(vocab) if isinstance(vocab, dict) else {t[0]: i for i, t in enumerate(vocab) if isinstance(t, list)}
    out.update({t["content"]: t["id"] for t in data.get("added_tokens") or [] if "content" in t})
    return out


# `ctrltok eval` defaults, here in the leaf so the parser (cli/main) and the handler (cli/eval) share
# them without importing each other
MAX_PROMPTS = 16  # --max-prompts: prompts generated for (chat stop rate, conditional samples)
SAMPLES = 8  # --samples: conditional samples per prompt and condition
