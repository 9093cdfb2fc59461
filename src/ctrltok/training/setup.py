"""Setting up a run: the model with the recipe's tokens, LoRA with the new rows trainable, compile.

The model's ``generation_config`` is set here, once: stop at the end-of-turn and stop tokens, never
emit blocked or filler ids (``core.tokens.apply_generation_config``), and decode as the recipe's
``decoding`` section says (``core.decoding.apply_decoding``); ``save_pretrained`` writes it
to ``generation_config.json``.

:func:`prepare_model` is where a run resolves, once, what the rest of it carries
(:class:`Prepared`): the template and its end-of-turn id, and the EPE charter read from disk.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer

from ctrltok.core.config import ALL_LINEAR, ConfigError, Recipe
from ctrltok.core.decoding import apply_decoding
from ctrltok.core.models import load_model, resolve_model
from ctrltok.core.templates import Template, get_template, install_templates
from ctrltok.core.tokens import (
    FILLER_FORMAT,
    CharterItem,
    ControlToken,
    Surgery,
    add_tokens,
    add_tokens_to_tokenizer,
    apply_generation_config,
    check_sizes,
    is_tied,
    load_charter,
    resolve_tokens,
)
from ctrltok.training.compiling import compile_blocks, compile_unavailable


@dataclass
class Prepared:
    """What a run resolves once and carries: the model with its tokens, the tokenizer with its
    templates, the surgery, the training template (and its end-of-turn id), the EPE charter."""

    model: torch.nn.Module
    tokenizer: Any
    surgery: Surgery
    template: Template
    end_of_turn_id: int | None
    charter: list[CharterItem] | None


def prepare_model(recipe: Recipe) -> Prepared:
    """Load the base model, add the recipe's control tokens, install templates."""
    model, tokenizer = load_model(recipe.model.name, dtype=recipe.model.dtype, attn=recipe.model.attn,
                                  init=recipe.model.init, config_overrides=recipe.model.config,
                                  seed=recipe.train.seed, source=recipe.source)
    template = get_template(recipe.data.template, tokenizer)
    tokens, charter = _recipe_tokens(recipe, template)
    if _carries(tokenizer, tokens):
        # A ctrltok checkpoint already carries these tokens: nothing to add, keep its rows.
        vocab = tokenizer.get_vocab()
        surgery = Surgery(model, tokenizer, tokens, {t.text: vocab[t.text] for t in tokens}, [],
                          filler_ids=_filler_ids(tokenizer))
    else:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        surgery = add_tokens(model, tokenizer, tokens, init=recipe.tokens.init,
                             pad_to_multiple_of=recipe.tokens.pad_to_multiple_of, seed=recipe.train.seed)
    eot_id = template.end_of_turn_id(tokenizer)
    apply_generation_config(model, surgery, eot_id)
    apply_decoding(model.generation_config, recipe.decoding)  # saved to generation_config.json with the stops
    install_templates(tokenizer, default=template)  # the trained template: the saved default
    check_sizes(model, tokenizer)
    return Prepared(model, tokenizer, surgery, template, eot_id, charter)


def _recipe_tokens(recipe: Recipe, template: Template) -> tuple[list[ControlToken], list[CharterItem] | None]:
    """The recipe's tokens plus the presets its template needs, and the charter (read once, EPE)."""
    presets = list(recipe.tokens.presets) + [p for p in template.presets if p not in recipe.tokens.presets]
    charter = load_charter(recipe.tokens.charter) if "epe" in presets or recipe.data.kind == "epe" else None
    tokens = resolve_tokens(recipe.tokens.presets, recipe.tokens.custom, charter)
    for preset in template.presets:
        if preset not in recipe.tokens.presets:
            tokens += [t for t in resolve_tokens([preset], charter=charter) if t not in tokens]
    return tokens, charter


def _carries(tokenizer: Any, tokens: list[ControlToken]) -> bool:
    """A ctrltok checkpoint already carries these tokens: nothing to add, keep its rows."""
    vocab = tokenizer.get_vocab()
    have = [t for t in tokens if t.text in vocab and not t.reuse]
    return bool(have) and len(have) == len([t for t in tokens if not t.reuse])


def prepare_tokenizer(recipe: Recipe) -> tuple[Any, list[CharterItem] | None]:
    """The tokenizer exactly as :func:`prepare_model` leaves it (the recipe's tokens added, fillers,
    templates), without the model's weights: what ``ctrltok prepare`` encodes with. Returns it and
    the charter."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(recipe.model.name))
    template = get_template(recipe.data.template, tokenizer)
    tokens, charter = _recipe_tokens(recipe, template)
    if not _carries(tokenizer, tokens):
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        add_tokens_to_tokenizer(tokenizer, tokens, recipe.tokens.pad_to_multiple_of)
    install_templates(tokenizer, default=template)  # the trained template: the saved default
    return tokenizer, charter


def _filler_ids(tokenizer) -> list[int]:
    prefix = FILLER_FORMAT.split("{")[0]
    return sorted(i for t, i in tokenizer.get_vocab().items() if t.startswith(prefix))


def lora_targets(model, recipe: Recipe) -> str | list[str]:
    """``lora.target_modules`` as PEFT takes it: the string ``"all-linear"`` (every linear layer but
    the output head), or module names, each of which must name a module of ``model`` (a typo is a
    :class:`ConfigError` listing the model's linear layers, not PEFT's error after loading)."""
    targets = list(recipe.lora.target_modules)
    if targets == [ALL_LINEAR]:
        return ALL_LINEAR
    names = [n for n, _ in model.named_modules() if n]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"})
        raise ConfigError(f"{recipe.source}: lora.target_modules: {missing} name no module of "
                          f"{type(model).__name__}; its linear layers are {linear} (or use {ALL_LINEAR})")
    return targets


def apply_lora(model, recipe: Recipe, surgery: Surgery):
    """Wrap in PEFT LoRA with the new rows trainable (embedding and an untied head)."""
    new = sorted(set(surgery.new_ids) | {i for t, i in surgery.ids.items()})
    trainable = None
    if new:
        trainable = {"embed_tokens": new} if is_tied(model) else {"embed_tokens": new, "lm_head": new}
    targets = lora_targets(model, recipe)
    cfg = LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                     target_modules=targets, trainable_token_indices=trainable)
    with warnings.catch_warnings():  # PEFT 0.21 reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        peft_model = get_peft_model(model, cfg)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    if new and not any("trainable_tokens" in n and "embed_tokens" in n for n in names):
        raise RuntimeError("LoRA would leave the new token rows frozen (no trainable_tokens adapter on embed_tokens); "
                           "the new tokens would never learn their meaning")
    return peft_model


def compile_for_training(model, recipe: Recipe) -> str:
    """``train.compile``: compile the decoder layers' MLPs and norms, or say why not (training goes
    on uncompiled, with a warning: a missing C++ compiler should not cost the user the run)."""
    reason = compile_unavailable()
    if reason is not None:
        warnings.warn(f"{recipe.source}: train.compile is on but torch.compile does not work here ({reason}); "
                      "training uncompiled", RuntimeWarning, stacklevel=2)
        return f"off ({reason})"
    return f"{compile_blocks(model)} modules (MLPs and norms of the decoder layers)"
