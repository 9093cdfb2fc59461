"""Named chat templates, shipped as package data (``ctrltok/templates/*.jinja``).

A template is a Hugging Face chat template plus two facts ctrltok needs: the token that closes a
turn (supervised with the assistant's reply, and where generation stops) and the control-token
presets it depends on.

``install_templates(tokenizer, default=NAME)`` stores the templates in a tokenizer as named
templates, with the template the run trains on as the tokenizer's *default*::

    tokenizer.chat_template == {"default": <the trained template>, "chatml": ..., "eot": ...,
                                "epe": ..., "oasst": ..., "model": <the base model's own>}

``save_pretrained`` writes the default to ``chat_template.jinja`` and the others to
``additional_chat_templates/NAME.jinja``, so plain transformers renders the trained format with
``apply_chat_template(messages)`` (what vLLM, TGI and ``pipeline`` call) and any other one by name,
``apply_chat_template(messages, chat_template="chatml")``.

Two namespaces meet here. Inside ctrltok (recipes' ``data.template``, ``--template``, the manifest)
``default`` is ChatML, the shipped ``default.jinja``, also called ``chatml``; inside a saved
tokenizer the key ``default`` is transformers' default slot, holding whichever template the run
trained on, and ChatML is always there as ``chatml``. :func:`get_template` resolves ctrltok's names
(shipped names first), :func:`default_template_name` tells which named template fills the slot.

Reading a saved folder back (the model card, the checkpoint doctor, the command layer's checks):
:func:`saved_templates` gives its templates by name, :func:`trained_source` the text of the one a
run trained on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path


@dataclass(frozen=True)
class Template:
    name: str
    source: str  # the Jinja text
    end_of_turn: str  # the token string that closes a turn
    presets: tuple[str, ...] = ()  # token presets the template needs

    def end_of_turn_id(self, tokenizer) -> int | None:
        """The id of :attr:`end_of_turn` in ``tokenizer``, or ``None`` when the tokenizer lacks it
        (the one place this lookup is made: the encoder, generation config, stop rate all use it)."""
        i = tokenizer.convert_tokens_to_ids(self.end_of_turn)
        if i is None or (i == tokenizer.unk_token_id and self.end_of_turn != tokenizer.unk_token):
            return None
        return int(i)


# name -> (end of turn, presets, package file)
_SPECS = {
    "default": ("<|im_end|>", (), "default"),
    "chatml": ("<|im_end|>", (), "default"),  # the same ChatML file under the name a saved tokenizer uses
    "epe": ("<|im_end|>", ("epe",), "epe"),
    "oasst": ("<|endoftext|>", ("oasst",), "oasst"),
    "eot": ("<EOT>", ("eot",), "eot"),
}
NAMES = (*_SPECS, "model")
DEFAULT = "default"  # transformers' key for the template apply_chat_template uses when none is named
CHATML = "chatml"  # ChatML's name in a saved tokenizer (its `default` slot holds the trained template)
# Where save_pretrained writes the templates: the default slot, and each other one by name.
DEFAULT_FILE, ADDITIONAL_DIR = "chat_template.jinja", "additional_chat_templates"


@lru_cache(maxsize=None)
def _read(file: str) -> str:
    return (resources.files("ctrltok") / "templates" / f"{file}.jinja").read_text(encoding="utf-8")


def get_template(name: str, tokenizer=None) -> Template:
    """A shipped template by name, or `model` (the tokenizer's own), or a name saved in the tokenizer.

    Shipped names win over a tokenizer's saved ones: ``get_template("default", tok)`` is ChatML even
    when ``tok``'s default slot holds another (trained) template.
    """
    if name in _SPECS:
        eot, presets, file = _SPECS[name]
        return Template(name, _read(file), eot, presets)
    saved = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if name == "model" and isinstance(saved, str):
        return Template("model", saved, tokenizer.eos_token)
    if isinstance(saved, dict) and name in saved:
        return Template(name, saved[name], tokenizer.eos_token)
    known = sorted(NAMES if saved is None else set(NAMES) | set(saved if isinstance(saved, dict) else []))
    raise ValueError(f"unknown chat template {name!r}; expected one of {known}")


def preset_template(presets: Sequence[str]) -> str:
    """The template for a tokenizer given the tokens of ``presets``: the first preset that has a
    template of its own (the one that writes its tokens: ``eot``, ``oasst``, ``epe``), else ``default``."""
    own = {preset: name for name, (_, needs, _) in _SPECS.items() for preset in needs}
    return next((own[p] for p in presets if p in own), DEFAULT)


def trained_source(name: str | None, saved: dict[str, str] | str | None) -> str | None:
    """The text of the template a run trained on (``name``, as its manifest records it): a shipped
    one, else the one saved by that name (``saved``: the tokenizer's ``chat_template``, or
    :func:`saved_templates`; a single unnamed template is ``model``); None when neither has it."""
    if not name:
        return None
    if name in _SPECS:
        return get_template(name).source
    if isinstance(saved, str):
        return saved if name == "model" else None
    return (saved or {}).get(name)


_LITERAL = re.compile(r"'((?:[^'\\]|\\.)*)'|\"((?:[^\"\\]|\\.)*)\"")


def missing_tokens(template: Template, tokenizer) -> list[str]:
    """Token-like strings the template writes (``<...>`` / ``<|...|>``) that the tokenizer lacks."""
    literals = "".join(a or b for a, b in _LITERAL.findall(template.source))
    vocab = tokenizer.get_vocab()
    wanted = set(re.findall(r"<\|[^|<>\s]+\|>|<[A-Za-z_][\w.]*>", literals))
    return sorted(t for t in wanted if t not in vocab)


def _shipped_sources() -> set[str]:
    return {_read(file) for _, _, file in _SPECS.values()}


class _Saved:
    """A stand-in holding a template dict for :func:`get_template` (``model`` and saved names)."""

    def __init__(self, tokenizer, templates: dict[str, str]):
        self.chat_template = templates
        self.eos_token = tokenizer.eos_token


def install_templates(tokenizer, names: list[str] | None = None, default: str | Template = DEFAULT) -> dict[str, str]:
    """Store the named templates in the tokenizer, with ``default`` (the template the run trains on,
    a name or a resolved :class:`Template`) in transformers' default slot.

    Every template is kept under its own name (ChatML under ``chatml``); the model's own template,
    found as a plain string or as the default slot of a tokenizer ctrltok did not write, is kept as
    ``model``. Templates whose tokens the tokenizer lacks are skipped unless named explicitly, in
    which case the missing tokens are an error; a default whose tokens are missing (ChatML, the
    recipes' default, on a GPT-2 tokenizer for a text recipe) leaves the model's own in the slot.
    """
    current = tokenizer.chat_template
    templates: dict[str, str] = dict(current) if isinstance(current, dict) else {}
    if isinstance(current, str):
        templates["model"] = current
    elif DEFAULT in templates and "model" not in templates and templates[DEFAULT] not in _shipped_sources():
        templates["model"] = templates[DEFAULT]  # a hub tokenizer's named templates: its default is its own
    trained = default if isinstance(default, Template) else get_template(default, _Saved(tokenizer, templates))
    explicit = set(names or [])
    for name in names or [n for n in _SPECS if n != DEFAULT]:
        if name == "model":
            continue
        t = get_template(name)
        missing = missing_tokens(t, tokenizer)
        if missing and name in explicit:
            raise ValueError(f"template {name!r} writes {missing}, which the tokenizer lacks; add preset(s) "
                             f"{list(t.presets)} first")
        if not missing:
            templates[CHATML if name == DEFAULT else name] = t.source
    if trained.name not in _SPECS or not missing_tokens(trained, tokenizer):
        templates[DEFAULT] = trained.source
    elif "model" in templates:  # ChatML on a tokenizer without its tokens (a text recipe): the model's own
        templates[DEFAULT] = templates["model"]
    tokenizer.chat_template = templates
    return templates


def default_template_name(templates: dict[str, str] | str | None) -> str | None:
    """Which template fills a saved tokenizer's default slot (``tokenizer.chat_template``): the
    first other saved name whose source equals it (ctrltok's names before ``model``), else the
    shipped template it equals (``chatml`` in checkpoints from before ``chatml`` was saved), else
    ``default`` (a template of its own); ``model`` for a single unnamed template; None for none."""
    if isinstance(templates, str):
        return "model"
    if not isinstance(templates, dict) or DEFAULT not in templates:
        return None
    source = templates[DEFAULT]
    order = [n for n in NAMES if n != DEFAULT] + sorted(set(templates) - set(NAMES))
    named = next((n for n in order if n in templates and templates[n] == source), None)
    if named is not None:
        return named
    return next((n for n, (_, _, file) in _SPECS.items() if n != DEFAULT and _read(file) == source), DEFAULT)


def saved_templates(folder: str | Path) -> dict[str, str]:
    """The named chat templates a saved tokenizer folder holds: name -> Jinja source, read from the
    files (``default`` for the default slot's file), else, in older layouts that keep them inside
    ``tokenizer_config.json``, from there (as transformers loads them: the files win). Empty for a
    folder with none, or no folder."""
    folder = Path(folder).expanduser()
    found: dict[str, str] = {}
    main = folder / DEFAULT_FILE
    if main.is_file():
        found[DEFAULT] = main.read_text(encoding="utf-8")
    for path in sorted((folder / ADDITIONAL_DIR).glob("*.jinja")):
        found[path.stem] = path.read_text(encoding="utf-8")
    if found:
        return found
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return found
    saved = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(saved, str):
        found[DEFAULT] = saved
    elif isinstance(saved, list):
        found.update({t["name"]: t.get("template") or "" for t in saved if isinstance(t, dict) and t.get("name")})
    return found
