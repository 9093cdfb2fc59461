"""Where ctrltok keeps what it fetches and converts, and the embedded default's names, without torch.

:mod:`ctrltok.core.models` converts the embedded default into :func:`default_model_dir` and loads
it; the command checks (:mod:`ctrltok.cli.checks`) only ask whether a name is an alias and whether
its converted copy is there, before anything heavy is imported, so these live apart from the loader.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"
# Aliases are matched case-insensitively; each maps to the cache folder name of the converted copy.
ALIASES = {"smollm2-135m": DEFAULT_MODEL, "smollm2-135m-instruct": DEFAULT_MODEL}
# Written last into a converted checkpoint; its presence (inside the renamed folder) is what
# "complete" means.
MARKER = "ctrltok-source.json"


def cache_dir() -> Path:
    """Where ctrltok keeps downloads and converted models: ``$CTRLTOK_CACHE`` or ``~/.cache/ctrltok``."""
    env = os.environ.get("CTRLTOK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ctrltok"


def default_model_dir() -> Path:
    """The embedded default's converted copy (it may not be there yet)."""
    return cache_dir() / "models" / DEFAULT_MODEL


def is_complete(folder: Path) -> bool:
    """True when ``folder`` holds a finished conversion (its marker is written last, then renamed)."""
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()
