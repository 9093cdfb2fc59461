"""Instruction backtranslation (Humpback, Li et al. 2023) with self-rewriting and self-curation.

Unlabelled text becomes instruction data: each self-contained segment of a document is treated as
the *answer*, a backward model M_yx (trained on gold pairs with the roles swapped) writes the
instruction it answers, the seed model rewrites the answer for that instruction (seed 003, after
Nguyen et al. 2024, but done by the seed model itself and *before* curation), scores the pair 1-5,
and the pairs scoring at least ``keep_score`` are mixed with the gold pairs, each source marked by
its own system prompt, to fine-tune M1. ``iterations > 1`` curates again with M1, and so on::

    documents -> segment -> augment (M_yx) -> rewrite (M0) -> curate (M0) -> select -> finetune -> M1
                               ^ backward: gold pairs, roles swapped       curate (M1) -> select -> M2 ...

The modules: :mod:`~ctrltok.backtranslate.segment` (documents -> candidates, quality heuristics),
:mod:`~ctrltok.backtranslate.stages` (the LLM stages and their strict parsers),
:mod:`~ctrltok.backtranslate.report` (counts, rates, histogram, samples), and this one: the stage
files and the orchestration, training included.

Every stage is a generator over :class:`~ctrltok.backtranslate.pairs.Pair` records that yields
each input once, kept or with ``drop`` set to a reason; it runs on the stage runner
(:func:`ctrltok.core.stages.run_stage`) into ``<stage>.jsonl`` with a ``<stage>.done`` marker,
an LLM stage committing one shard per backend batch. Rerunning on the same folder skips done
stages and continues a partial one at its first missing shard, so a killed run neither loses
nor duplicates a record and redoes at most the batch it was killed in. Counts in the report are
read back from those files, so they cover every run that contributed to them.

LLM calls go through one injected :class:`~ctrltok.backtranslate.stages.ChatModel` built by
``backend_factory(name, recipe)``, and training through an injected ``trainer(recipe, out_dir)``,
so tests run the whole pipeline with fakes::

    report = run_backtranslation(load_recipe("recipes/backtranslate-cpu.yaml"), Path("runs/bt"))

``ctrltok backtranslate`` (:mod:`ctrltok.cli.backtranslate`) prints the report.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import torch

from ctrltok.backtranslate.pairs import SETTINGS_FILE, Pair, kept
from ctrltok.backtranslate.report import build_report
from ctrltok.backtranslate.segment import read_documents, segment
from ctrltok.backtranslate.stages import (
    ChatModel,
    Message,
    augment,
    curate,
    keep_threshold,
    load_text,
    rewrite,
    select,
)
from ctrltok.core.chat import render_prompt
from ctrltok.core.config import BacktranslateConfig, Recipe
from ctrltok.core.records import read_records
from ctrltok.core.stages import atomic_write, run_stage
from ctrltok.generation.completion import make_backend
from ctrltok.training.train import train

CHEAP_SHARD = 1000  # pairs per shard of the stages without model calls (redone whole on resume is cheap)


def load_chat_model(name: str, recipe: Recipe) -> ChatModel:
    """The default backend factory: vLLM when installed with a GPU, else batched transformers
    (``completion.make_backend``), prompting with the recipe's chat template (``data.template``),
    the same one the trainer used, so M_yx is prompted exactly as it was trained. Prompts are ids
    from the injection-safe encoder: corpus text and model outputs never become control tokens."""
    batch = (recipe.backtranslate or BacktranslateConfig()).batch_size
    backend = make_backend(name, kind="auto", batch_size=batch, dtype=recipe.model.dtype, attn=recipe.model.attn)
    tokenizer = backend.tokenizer
    template = recipe.data.template

    def render(messages: list[Message]) -> list[int]:
        return render_prompt(messages, tokenizer, template)

    def encode_text(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    return ChatModel(backend, render, encode_text)


# --------------------------------------------------------------------------- stage files


def _stage(out_dir: Path, name: str, stage: Callable[[Iterable[Pair]], Iterator[Pair]], inputs: Iterable[Pair] = (),
           skip: str = "inputs", shard_size: int = CHEAP_SHARD, stats: Counter | None = None) -> Path:
    """Run one stage into ``<name>.jsonl`` (resuming; nothing if ``<name>.done`` exists).

    ``skip="inputs"``: a resumed stage is not given the inputs of its complete shards (LLM stages,
    one shard per batch). ``skip="outputs"``: the stage regenerates everything and the outcomes
    already written are discarded (``segment``: cheap, deterministic, and its dedup must see every
    earlier segment). ``stats`` (the stage's own counters) are kept in the marker."""
    path = out_dir / f"{name}.jsonl"
    run_stage(path, lambda items: (pair.outcome() for pair in stage(items)), inputs, skip=skip,
              shard_size=shard_size, info=lambda: {"stats": dict(stats or {})})
    return path


# --------------------------------------------------------------------------- training stages


def read_gold(source: str) -> list[tuple[str, str]]:
    """Gold ``(instruction, response)`` pairs: every user turn followed by an assistant turn in
    ``{"messages": [...]}`` records, or ``instruction``/``response`` (also ``output``) fields."""
    pairs = []
    for where, rec in read_records(source):
        if isinstance(rec.get("messages"), list):
            msgs = rec["messages"]
            for a, b in zip(msgs, msgs[1:]):
                if a.get("role") == "user" and b.get("role") == "assistant":
                    pairs.append((str(a.get("content", "")), str(b.get("content", ""))))
        elif "instruction" in rec and ("response" in rec or "output" in rec):
            pairs.append((str(rec["instruction"]), str(rec.get("response", rec.get("output")))))
        else:
            raise ValueError(f"{where}: a gold record needs messages or instruction/response "
                             f"(fields {sorted(rec)}); see backtranslate.gold")
    if not pairs:
        raise ValueError(f"{source}: no gold (instruction, response) pairs (backtranslate.gold)")
    return pairs


def _write_chats(path: Path, chats: Iterable[list[Message]]) -> int:
    """A trainer input file, written whole then renamed, so it is never seen half-written."""
    lines = [json.dumps({"messages": c}, ensure_ascii=False) for c in chats]
    atomic_write(path, "\n".join(lines) + "\n")
    return len(lines)


def _train_stage(recipe: Recipe, out_dir: Path, name: str, chats: Iterable[list[Message]],
                 steps: int | None, trainer: Callable[[Recipe, Path], Path]) -> Path:
    """Fine-tune ``model.name`` on ``chats`` into ``out_dir/name`` (the trainer resumes itself)."""
    marker = out_dir / f"{name}.done"
    if marker.exists():
        return Path(json.loads(marker.read_text())["model"])
    data_file = out_dir / f"{name}.train.jsonl"
    n = _write_chats(data_file, chats)
    sub = replace(recipe, name=f"{recipe.name}-{name}",
                  data=replace(recipe.data, kind="chat", train=str(data_file), eval=None, limit=None,
                               loss_on="assistant"),
                  train=replace(recipe.train, max_steps=steps if steps is not None else recipe.train.max_steps))
    model = Path(trainer(sub, out_dir / name))
    atomic_write(marker, json.dumps({"model": str(model), "examples": n}))
    return model


def backward(recipe: Recipe, gold: list[tuple[str, str]], out_dir: Path,
             trainer: Callable[[Recipe, Path], Path]) -> Path:
    """Train M_yx: gold pairs with the roles swapped (the response is the user turn)."""
    cfg = recipe.backtranslate or BacktranslateConfig()
    system = load_text(cfg.backward_system, "backward_system")
    chats = ([{"role": "system", "content": system}, {"role": "user", "content": resp},
              {"role": "assistant", "content": instr}] for instr, resp in gold)
    return _train_stage(recipe, out_dir, "backward", chats, cfg.backward_steps, trainer)


def finetune(recipe: Recipe, gold: list[tuple[str, str]], selected: Iterable[Pair], out_dir: Path,
             name: str, trainer: Callable[[Recipe, Path], Path]) -> Path:
    """M_i (``name``: ``model-i``): SFT on gold + selected pairs, each source marked by its system
    prompt (the paper's tags)."""
    cfg = recipe.backtranslate or BacktranslateConfig()

    def chats() -> Iterator[list[Message]]:
        for instr, resp in gold:
            yield [{"role": "system", "content": cfg.gold_tag}, {"role": "user", "content": instr},
                   {"role": "assistant", "content": resp}]
        for p in selected:
            yield [{"role": "system", "content": cfg.generated_tag}, {"role": "user", "content": p.instruction},
                   {"role": "assistant", "content": p.response}]

    return _train_stage(recipe, out_dir, name, chats(), cfg.finetune_steps, trainer)


def uncurated_sample(pairs: Callable[[], Iterable[Pair]], n: int, seed: int) -> Iterator[Pair]:
    """``n`` of the pairs ``pairs()`` yields, drawn uniformly at random under ``seed``, in their
    order: two passes over the stream, holding one 64-bit key per pair, never the pairs."""
    keys = [_draw_key(p, seed) for p in pairs()]
    if n <= 0 or not keys:
        return iter(())
    cut = sorted(keys)[min(n, len(keys)) - 1]
    return (p for p in pairs() if _draw_key(p, seed) <= cut)


def _draw_key(pair: Pair, seed: int) -> int:
    """A pair's place in the seeded draw: its id hashed under the seed (the same on every machine)."""
    digest = hashlib.blake2b(pair.id.encode(), digest_size=8, key=seed.to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little")


# --------------------------------------------------------------------------- the pipeline


def _note_settings(out_dir: Path, recipe: Recipe) -> None:
    """Record the settings of the first run; on a resume, warn which ones changed, since the
    stages already done keep what the earlier settings produced (raising ``iterations`` is the
    usual, intended case)."""
    path = out_dir / SETTINGS_FILE
    now = {"model": recipe.model.name, **dataclasses.asdict(recipe.backtranslate or BacktranslateConfig())}
    if not path.exists():
        atomic_write(path, json.dumps(now, indent=1))
        return
    before = json.loads(path.read_text())
    changed = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
    if changed:
        warnings.warn(f"{out_dir}: resuming with changed settings {changed}; stages already done keep "
                      "their earlier results (delete their <stage>.done and .jsonl files to redo them)",
                      stacklevel=3)


class _Models:
    """Loads one model at a time: consecutive stages on the same model share it."""

    def __init__(self, factory: Callable[[str, Recipe], ChatModel], recipe: Recipe):
        self.factory, self.recipe, self.name, self.model = factory, recipe, None, None

    def get(self, name: str) -> ChatModel:
        if name != self.name:
            self.model = None  # free the previous one first
            self.model, self.name = self.factory(name, self.recipe), name
        return self.model

    def release(self) -> None:
        """Drop the loaded model before training, which needs the memory (a GPU at scale)."""
        self.model = self.name = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_backtranslation(recipe: Recipe, out_dir: Path, backend_factory: Callable[[str, Recipe], ChatModel] = load_chat_model,
                        trainer: Callable[[Recipe, Path], Path] = train) -> dict:
    """Run (or resume) the whole pipeline into ``out_dir``; returns the report (also ``report.json``)."""
    cfg = recipe.backtranslate or BacktranslateConfig()
    cfg.check(recipe.source)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = recipe.train.seed
    _note_settings(out_dir, recipe)
    models = _Models(backend_factory, recipe)
    gold = read_gold(cfg.gold)
    batch = cfg.batch_size  # an LLM stage commits a shard per backend batch

    stats: Counter = Counter()
    _stage(out_dir, "segments", lambda _: segment(read_documents(cfg.corpus, cfg.corpus_field, cfg.max_documents),
                                                  cfg, stats), skip="outputs", stats=stats)
    m_yx = backward(recipe, gold, out_dir, trainer)
    if cfg.seed_model == "model":
        seed_model = recipe.model.name
    elif cfg.seed_model == "train":
        gold_chats = ([{"role": "user", "content": i}, {"role": "assistant", "content": r}] for i, r in gold)
        seed_model = str(_train_stage(recipe, out_dir, "seed", gold_chats, cfg.seed_steps, trainer))
    else:
        seed_model = cfg.seed_model
    last = _stage(out_dir, "augmented", lambda it: augment(it, models.get(str(m_yx)), cfg, seed),
                  kept(out_dir / "segments.jsonl"), shard_size=batch)
    if cfg.rewrite:
        last = _stage(out_dir, "rewritten", lambda it: rewrite(it, models.get(seed_model), cfg, seed), kept(last),
                      shard_size=batch)
    curator, final = seed_model, None
    for i in range(1, cfg.iterations + 1):
        curated = _stage(out_dir, f"curated-{i}", lambda it, c=curator: curate(it, models.get(c), cfg, seed),
                         kept(last), shard_size=batch)
        threshold = keep_threshold((p.score for p in kept(curated)), cfg)
        selected = _stage(out_dir, f"selected-{i}", lambda it, t=threshold: select(it, t), kept(curated))
        if not (out_dir / f"model-{i}.done").exists():
            models.release()
        final = finetune(recipe, gold, kept(selected), out_dir, f"model-{i}", trainer)
        curator = str(final)
        if i == 1 and cfg.baseline:  # the ablation: as many pairs, not curated
            n = sum(1 for _ in kept(selected))
            if n:
                finetune(recipe, gold, uncurated_sample(lambda: kept(last), n, seed), out_dir, "baseline-1", trainer)
            else:  # it would train model-1's data again
                warnings.warn(f"{out_dir}: curation selected no pairs, so there is no baseline-1 to compare "
                              "(backtranslate.baseline)", stacklevel=2)
    return build_report(out_dir, cfg, {"backward": str(m_yx), "seed": seed_model, "final": str(final)},
                        gold=len(gold))
