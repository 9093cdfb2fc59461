"""A doctor for checkpoints (what `ctrltok inspect` prints).

Reports what a checkpoint holds (embedding rows, tokenizer length, added tokens with ids, named
templates, tied or not, stop and suppressed ids) and what is wrong with it: a tokenizer shorter or
longer than the embedding (seed 000 warns about pairing its 49,280-row model with the original
49,152-token tokenizer), control tokens that are not atomic, templates that write tokens the
tokenizer lacks, stop tokens missing from the generation config, suppressed ids out of range.
It reads config and tokenizer files only, so it is fast even for large models.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from ctrltok.core.models import ADAPTER, adapter_only, adapter_rows
from ctrltok.core.templates import (
    DEFAULT,
    Template,
    default_template_name,
    get_template,
    missing_tokens,
)
from ctrltok.training.checkpoint import RunManifest


@dataclass
class Report:
    path: str
    model_rows: int | None
    tokenizer_length: int
    tied: bool | None
    added_tokens: list[dict]
    templates: list[str]
    stop_ids: list[int]
    suppressed: int
    suppressed_sample: list[int]
    recipe: str | None
    problems: list[str] = field(default_factory=list)
    # which named template `apply_chat_template(messages)` renders (the saved chat_template.jinja)
    default_template: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def inspect_checkpoint(path: str | Path) -> Report:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint folder")
    problems: list[str] = []
    tok = AutoTokenizer.from_pretrained(path)
    rows = tied = None
    try:
        config = AutoConfig.from_pretrained(path)
        rows = getattr(config, "vocab_size", None) or getattr(config.get_text_config(), "vocab_size", None)
        tied = bool(getattr(config, "tie_word_embeddings", False))
    except (OSError, ValueError) as exc:
        if adapter_only(path):  # save.merged: false: the embedding the adapter carries is the model's
            try:
                rows = adapter_rows(path / ADAPTER)
            except (OSError, ValueError) as err:
                problems.append(f"an adapter-only folder whose adapter weights cannot be read ({err}): "
                                "it cannot be loaded; copy the run's adapter/ folder again or re-save the run")
        else:
            problems.append(f"no readable config.json ({exc}); only the tokenizer was checked")
    n = len(tok)
    if rows is not None and rows != n:
        problems.append(
            f"tokenizer has {n:,} tokens but the model has {rows:,} embedding rows: "
            + ("ids past the last row would crash" if n > rows else
               f"ids {n:,}-{rows - 1:,} have no token; is this the tokenizer saved with the model?")
        )
    added = []
    for i, t in sorted(tok.added_tokens_decoder.items()):
        if t.content.startswith("<|ctrltok_filler_"):
            continue
        ids = tok(t.content, add_special_tokens=False).input_ids
        atomic = ids == [i]
        added.append({"id": i, "token": t.content, "special": t.special, "atomic": atomic})
        if not atomic:
            problems.append(f"token {t.content!r} (id {i}) is not atomic: it encodes as {ids}")
    fillers = sum(1 for t in tok.added_tokens_decoder.values() if t.content.startswith("<|ctrltok_filler_"))
    templates = tok.chat_template
    names = sorted(templates) if isinstance(templates, dict) else (["(unnamed)"] if templates else [])
    if isinstance(templates, dict):
        for name, source in templates.items():
            miss = missing_tokens(Template(name, source, ""), tok)
            if miss:
                problems.append(f"template {name!r} writes {miss}, which the tokenizer lacks")
    stop_ids: list[int] = []
    suppressed: list[int] = []
    try:
        gc = GenerationConfig.from_pretrained(path)
        eos = gc.eos_token_id
        stop_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        suppressed = list(gc.suppress_tokens or [])
    except OSError:
        problems.append("no generation_config.json: generation will not stop at the end-of-turn token")
    manifest = RunManifest.read(path)
    recipe = None
    default = default_template_name(templates)
    if manifest.exists:
        recipe = manifest.values.get("recipe")
        trained = _trained_source(manifest.template, tok)
        if isinstance(templates, dict) and trained is not None and templates.get(DEFAULT) != trained:
            problems.append(f"the default chat template is {default!r}, not the trained {manifest.template!r}: plain "
                            "apply_chat_template(messages) renders another format than the model learned")
        eot = manifest.end_of_turn
        if eot and tok.convert_tokens_to_ids(eot) not in stop_ids:
            problems.append(f"the template's end-of-turn token {eot!r} is not a stop id of the generation config")
        for t in manifest.tokens:
            if t.get("blocked") and t["id"] not in suppressed:
                problems.append(f"blocked token {t['text']!r} (id {t['id']}) is not suppressed at generation")
    if fillers and rows is not None:
        filler_ids = [i for i, t in tok.added_tokens_decoder.items() if t.content.startswith("<|ctrltok_filler_")]
        free = sorted(set(filler_ids) - set(suppressed))
        if free:
            problems.append(f"{len(free)} filler ids are not suppressed (e.g. {free[:3]}): they could be generated")
    if rows is not None:
        bad = [i for i in suppressed + stop_ids if i >= rows]
        if bad:
            problems.append(f"generation config names ids past the embedding: {bad[:5]}")
    return Report(str(path), rows, n, tied, added, names, stop_ids, len(suppressed), suppressed[:8], recipe, problems,
                  default)


def _trained_source(name: str, tok) -> str | None:
    try:
        return get_template(name, tok).source
    except ValueError:
        return None
