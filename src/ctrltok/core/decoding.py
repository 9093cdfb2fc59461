"""A recipe's decoding, to and from a model's ``generation_config``, with the commands' flags on top.

The decoding contract has one owner, this module; setup, generation, evaluation and the commands
all import it from here. It sits in ``core`` because ``training.setup`` writes it and
``generation`` reads it while ``generation`` imports ``training.checkpoint``: in either package
it would make the two import each other::

    recipe.decoding --apply_decoding--> generation_config(.json) --served_decoding--> DecodingConfig
                                                                    + flags: override_decoding
    resolve_decoding(model, decoding=None, **flags) = both steps: what the commands and evaluation call

* :func:`apply_decoding` writes a recipe's ``decoding`` into a ``GenerationConfig`` (``prepare_model``
  does it once), so ``save_pretrained`` carries it to ``generation_config.json``.
* :func:`served_decoding` reads it back as plain ``model.generate`` would use it.
* :func:`override_decoding` puts flag values on top, checking each (``ValueError``);
  :func:`resolve_decoding` is the served decoding (or a given one) with the flags on top.
* :func:`decoding_kwargs` makes the result :func:`ctrltok.generation.generate.generate_batch`'s
  keywords; :func:`check_knobs` is the range check both use.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ctrltok.core.config import DecodingConfig

HF_DEFAULT_TOP_K = 50  # what transformers samples with when a generation_config names no top_k


def check_knobs(max_new_tokens: int, temperature: float, top_p: float | None, n: int, batch_size: int,
                top_k: int | None, repetition_penalty: float | None, no_repeat_ngram_size: int | None) -> None:
    """``ValueError`` naming the first value out of range (``None``: the model's own, not checked)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = no top-k filtering), got {top_k}")
    if repetition_penalty is not None and not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 = none), got {repetition_penalty}")
    if no_repeat_ngram_size is not None and no_repeat_ngram_size < 0:
        raise ValueError(f"no_repeat_ngram_size must be >= 0 (0 = off), got {no_repeat_ngram_size}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def apply_decoding(config: Any, decoding: DecodingConfig) -> None:
    """Write a recipe's ``decoding`` into a ``GenerationConfig`` in place: what
    ``save_pretrained`` puts in ``generation_config.json``, so plain transformers (and servers that
    read the file for their defaults) decode as the recipe says, and ctrltok's own commands start from it
    (:func:`served_decoding`). Stops, pads and blocked ids are left as they are.

    Greedy (``do_sample: false``) clears the sampling values: transformers refuses to save a
    greedy config that names a temperature. A sampling config without ``top_k`` saves ``top_k: 0``,
    since a missing one means 50 to transformers.
    """
    config.do_sample = decoding.do_sample
    if decoding.do_sample:
        config.temperature, config.top_p = decoding.temperature, decoding.top_p
        config.top_k = decoding.top_k or 0
    else:
        config.temperature = config.top_p = config.top_k = None
    config.repetition_penalty = decoding.repetition_penalty
    config.no_repeat_ngram_size = decoding.no_repeat_ngram_size
    config.max_new_tokens = decoding.max_new_tokens
    config.max_length = None  # max_new_tokens is the only length limit


def served_decoding(config: Any) -> DecodingConfig:
    """The decoding a ``GenerationConfig`` holds, as plain ``model.generate`` would use it: the
    recipe's for a ctrltok checkpoint (:func:`apply_decoding`), transformers' defaults where the
    file names nothing (greedy, ``top_k`` 50 when sampling), ``DecodingConfig``'s
    ``max_new_tokens`` where it sets none. A greedy config has no top-k (a flag that switches
    sampling on gets none)."""
    top_k = (HF_DEFAULT_TOP_K if config.top_k is None else int(config.top_k)) if config.do_sample else 0
    return DecodingConfig(do_sample=bool(config.do_sample),
                          temperature=float(config.temperature) if config.temperature else 1.0,
                          top_p=float(config.top_p) if config.top_p is not None else 1.0,
                          top_k=top_k or None,
                          repetition_penalty=float(config.repetition_penalty or 1.0),
                          no_repeat_ngram_size=int(config.no_repeat_ngram_size or 0),
                          max_new_tokens=int(config.max_new_tokens or DecodingConfig().max_new_tokens))


def override_decoding(decoding: DecodingConfig, *, greedy: bool = False, temperature: float | None = None,
                      top_p: float | None = None, top_k: int | None = None, repetition_penalty: float | None = None,
                      no_repeat_ngram_size: int | None = None, max_new_tokens: int | None = None) -> DecodingConfig:
    """``decoding`` with the given values on top (``None``: keep it), as the commands' flags do.

    ``temperature == 0`` or ``greedy`` switch sampling off; a temperature above 0 switches it on.
    ``top_k == 0`` is no top-k filtering. Values out of range raise ``ValueError``.
    """
    out = dataclasses.replace(decoding)
    if temperature is not None:
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        out.do_sample = temperature > 0
        if temperature > 0:
            out.temperature = temperature
    if greedy:
        out.do_sample = False
    if top_p is not None:
        out.top_p = top_p
    if top_k is not None:
        out.top_k = top_k or None
    if repetition_penalty is not None:
        out.repetition_penalty = repetition_penalty
    if no_repeat_ngram_size is not None:
        out.no_repeat_ngram_size = no_repeat_ngram_size
    if max_new_tokens is not None:
        out.max_new_tokens = max_new_tokens
    check_knobs(out.max_new_tokens, out.temperature, out.top_p, 1, 1, out.top_k or 0, out.repetition_penalty,
                out.no_repeat_ngram_size)
    return out


def resolve_decoding(model: Any, decoding: DecodingConfig | None = None, **flags: Any) -> DecodingConfig:
    """``decoding`` (default: the model's own, :func:`served_decoding` of its generation_config)
    with ``flags`` on top: any of :func:`override_decoding`'s keywords, ``None`` keeping the value.
    Values out of range raise ``ValueError``."""
    base = decoding if decoding is not None else served_decoding(model.generation_config)
    return override_decoding(base, **flags)


def decoding_kwargs(decoding: DecodingConfig) -> dict[str, Any]:
    """``decoding`` as :func:`ctrltok.generation.generate.generate_batch`'s keyword arguments
    (greedy: temperature 0), every value explicit, so nothing falls back to the model's
    generation_config."""
    return {"max_new_tokens": decoding.max_new_tokens, "temperature": decoding.temperature if decoding.do_sample else 0.0,
            "top_p": decoding.top_p, "top_k": decoding.top_k or 0, "repetition_penalty": decoding.repetition_penalty,
            "no_repeat_ngram_size": decoding.no_repeat_ngram_size}


def describe_decoding(decoding: DecodingConfig) -> str:
    """One line for a summary: ``sampling T 0.7, top-p 0.9, repetition penalty 1.2, <= 512 new tokens``."""
    parts = [f"sampling T {decoding.temperature:g}, top-p {decoding.top_p:g}"
             + (f", top-k {decoding.top_k}" if decoding.top_k else "") if decoding.do_sample else "greedy"]
    if decoding.repetition_penalty != 1.0:
        parts.append(f"repetition penalty {decoding.repetition_penalty:g}")
    if decoding.no_repeat_ngram_size:
        parts.append(f"no repeated {decoding.no_repeat_ngram_size}-grams")
    parts.append(f"<= {decoding.max_new_tokens} new tokens")
    return ", ".join(parts)
