"""Named chat templates, shipped as package data (``ctrltok/templates/*.jinja``).

A template is a Hugging Face chat template plus two facts ctrltok needs: the token that closes a
turn (supervised with the assistant's reply, and where generation stops) and the control-token
presets it depends on. ``install_templates`` stores the templates in a tokenizer as named templates
(``tokenizer.chat_template = {"default": ..., "epe": ...}``), which ``save_pretrained`` writes and
plain transformers selects with ``apply_chat_template(messages, chat_template="epe")``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources


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


_SPECS = {
    "default": ("<|im_end|>", ()),
    "epe": ("<|im_end|>", ("epe",)),
    "oasst": ("<|endoftext|>", ("oasst",)),
    "eot": ("<EOT>", ("eot",)),
}
NAMES = (*_SPECS, "model")


def _read(name: str) -> str:
    return (resources.files("ctrltok") / "templates" / f"{name}.jinja").read_text(encoding="utf-8")


def get_template(name: str, tokenizer=None) -> Template:
    """A shipped template by name, or `model` (the tokenizer's own), or a name saved in the tokenizer."""
    if name in _SPECS:
        eot, presets = _SPECS[name]
        return Template(name, _read(name), eot, presets)
    saved = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if name == "model" and isinstance(saved, str):
        return Template("model", saved, tokenizer.eos_token)
    if isinstance(saved, dict) and name in saved:
        eot = _SPECS.get(name, (tokenizer.eos_token,))[0]
        return Template(name, saved[name], eot)
    known = sorted(NAMES if saved is None else set(NAMES) | set(saved if isinstance(saved, dict) else []))
    raise ValueError(f"unknown chat template {name!r}; expected one of {known}")


_LITERAL = re.compile(r"'((?:[^'\\]|\\.)*)'|\"((?:[^\"\\]|\\.)*)\"")


def referenced_tokens(source: str, candidates: list[str]) -> list[str]:
    """Which of `candidates` (special-token spellings) the template text writes in string literals."""
    literals = "".join(a or b for a, b in _LITERAL.findall(source))
    return [c for c in candidates if c in literals]


def missing_tokens(template: Template, tokenizer) -> list[str]:
    """Token-like strings the template writes (``<...>`` / ``<|...|>``) that the tokenizer lacks."""
    literals = "".join(a or b for a, b in _LITERAL.findall(template.source))
    vocab = tokenizer.get_vocab()
    wanted = set(re.findall(r"<\|[^|<>\s]+\|>|<[A-Za-z_][\w.]*>", literals))
    return sorted(t for t in wanted if t not in vocab)


def install_templates(tokenizer, names: list[str] | None = None) -> dict[str, str]:
    """Store the named templates in the tokenizer (the model's own one is kept as `model`).

    Templates whose tokens the tokenizer lacks are skipped unless named explicitly, in which case
    the missing tokens are an error.
    """
    current = tokenizer.chat_template
    templates: dict[str, str] = dict(current) if isinstance(current, dict) else {}
    if isinstance(current, str):
        templates["model"] = current
    explicit = set(names or [])
    for name in names or list(_SPECS):
        if name == "model":
            continue
        t = get_template(name)
        missing = missing_tokens(t, tokenizer)
        if missing and name in explicit:
            raise ValueError(f"template {name!r} writes {missing}, which the tokenizer lacks; add preset(s) "
                             f"{list(t.presets)} first")
        if not missing:
            templates[name] = t.source
    tokenizer.chat_template = templates
    return templates
