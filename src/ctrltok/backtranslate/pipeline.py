"""Instruction backtranslation (Humpback, Li et al. 2023) with self-rewriting and self-curation.

Unlabelled text becomes instruction data: each self-contained segment of a document is treated as
the *answer*, a backward model M_yx (trained on gold pairs with the roles swapped) writes the
instruction it answers, the seed model rewrites the answer for that instruction (seed 003, after
Nguyen et al. 2024, but done by the seed model itself and *before* curation), scores the pair 1-5,
and the pairs scoring at least ``keep_score`` are mixed with the gold pairs, each source marked by
its own system prompt, to fine-tune M1. ``iterations > 1`` curates again with M1, and so on::

    documents -> segment -> augment (M_yx) -> rewrite (M0) -> curate (M0) -> select -> finetune -> M1
                               ^ backward: gold pairs, roles swapped       curate (M1) -> select -> M2 ...

Every stage is a generator over :class:`Pair` records that yields each input once, either kept or
with ``drop`` set to a reason; :func:`_run_stage` appends what it yields to ``<stage>.jsonl``
(flushed per record) and writes ``<stage>.done`` at the end. Rerunning on the same folder skips done
stages and continues a partial one after its last complete line (a torn last line is cut off), so
a killed run neither loses nor duplicates a record. Counts in the report are read back from those
files, so they cover every run that contributed to them.

LLM calls go through one injected :class:`ChatModel` (rendering + ``complete(prompts, sampling)``)
built by ``backend_factory(name, recipe)``, and training through an injected ``trainer(recipe,
out_dir)``, so tests run the whole pipeline with fakes::

    report = run_backtranslation(load_recipe("recipes/backtranslate-cpu.yaml"), Path("runs/bt"))

The curation parser is strict: the last non-empty line must be ``Score: N``. Anything else is a
parse failure, a number outside 1-5 is counted apart, and the report shows both rates.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ctrltok.core.config import BacktranslateConfig, ConfigError, Recipe
from ctrltok.generation.completion import Backend, Prompt, Sampling

SCORES = (1, 2, 3, 4, 5)
AGGREGATES = ("median", "mean")
PYDOC = "python:pydoc_topics"
Message = dict[str, str]


# --------------------------------------------------------------------------- records


@dataclass
class Pair:
    """One candidate (instruction, response) pair as it moves through the stages."""

    id: str  # stable: "<document id>#<segment index>"
    source: str  # the document it came from
    response: str
    instruction: str = ""
    original_response: str | None = None  # the segment as found, once rewritten
    curator_outputs: list[str] = field(default_factory=list)
    scores: list[int | None] = field(default_factory=list)  # per sample; None = did not parse
    score: float | None = None  # aggregate of the samples in 1..5
    drop: str | None = None  # reason, or None when kept

    @classmethod
    def from_json(cls, data: dict, where: str) -> "Pair":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown or "id" not in data or "response" not in data:
            raise ValueError(f"{where}: not a backtranslation record (keys {sorted(data)})")
        return cls(**data)


@dataclass
class ChatModel:
    """A backend plus the chat rendering of its model: conversations in, completions out.

    ``render`` turns a conversation into a prompt ending in the assistant's generation prompt:
    token ids (the default factory: injection-safe, so a document that spells ``<|im_end|>`` stays
    text) or a string (tests' fakes). ``encode_text`` encodes an answer prefix as plain text, for
    id prompts.
    """

    backend: Backend
    render: Callable[[list[Message]], Prompt]
    encode_text: Callable[[str], list[int]] | None = None

    def prompt(self, conversation: list[Message], answer_prefix: str = "") -> Prompt:
        rendered = self.render(conversation)
        if not answer_prefix:
            return rendered
        if isinstance(rendered, str):
            return rendered + answer_prefix
        if self.encode_text is None:
            raise ValueError("an answer prefix on id prompts needs ChatModel.encode_text")
        return list(rendered) + self.encode_text(answer_prefix)

    def chat(self, conversations: list[list[Message]], sampling: Sampling, answer_prefix: str = "") -> list[str]:
        """Completions of each conversation; ``answer_prefix`` is written at the start of the
        assistant's reply (a prefill) and is not part of the returned text."""
        outs = self.backend.complete([self.prompt(c, answer_prefix) for c in conversations], sampling)
        want = len(conversations) * max(1, sampling.n)
        if len(outs) != want:  # a backend bug would otherwise shift every later record
            raise RuntimeError(f"backend returned {len(outs)} completions for {want} requested")
        return outs


def load_chat_model(name: str, recipe: Recipe) -> ChatModel:
    """The default backend factory: vLLM when installed with a GPU, else batched transformers
    (``completion.make_backend``), prompting with the recipe's chat template (``data.template``),
    the same one the trainer used, so M_yx is prompted exactly as it was trained. Prompts are ids
    from the injection-safe encoder: corpus text and model outputs never become control tokens."""
    from ctrltok.core.chat import render_prompt
    from ctrltok.generation.completion import make_backend

    batch = (recipe.backtranslate or BacktranslateConfig()).batch_size
    backend = make_backend(name, kind="auto", batch_size=batch, dtype=recipe.model.dtype, attn=recipe.model.attn)
    tokenizer = backend.tokenizer
    template = recipe.data.template

    def render(messages: list[Message]) -> list[int]:
        return render_prompt(messages, tokenizer, template)

    def encode_text(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    return ChatModel(backend, render, encode_text)


# --------------------------------------------------------------------------- prompts


def load_text(ref: str, key: str) -> str:
    """A prompt: ``ctrltok:<file>`` (package data under ctrltok/resources) or a path."""
    if ref.startswith("ctrltok:"):
        target = resources.files("ctrltok") / "resources" / ref.split(":", 1)[1]
        if not target.is_file():
            raise ConfigError(f"backtranslate.{key} = {ref!r}: no such resource in ctrltok/resources")
        return target.read_text(encoding="utf-8").strip()
    path = Path(ref).expanduser()
    if not path.is_file():
        raise ConfigError(f"backtranslate.{key} = {ref!r}: no such file")
    return path.read_text(encoding="utf-8").strip()


def fill(template: str, key: str, **values: str) -> str:
    """Fill ``{name}`` placeholders; plain replace, since responses are full of braces."""
    for name, value in values.items():
        if "{" + name + "}" not in template:
            raise ConfigError(f"backtranslate.{key}: the prompt has no {{{name}}} placeholder")
    out = template
    for name, value in values.items():
        out = out.replace("{" + name + "}", value)
    return out


# --------------------------------------------------------------------------- segment


def read_documents(source: str, text_field: str = "text", limit: int | None = None) -> Iterator[tuple[str, str]]:
    """``(document id, text)`` from ``python:pydoc_topics`` (the interpreter's bundled docs, on
    every machine) or anything :func:`ctrltok.core.records.read_records` reads: JSONL, Parquet, a
    folder of ``.txt`` files, a ``datasets`` name."""
    def docs() -> Iterator[tuple[str, str]]:
        if source == PYDOC:
            from pydoc_data.topics import topics

            for key in sorted(topics):
                yield f"pydoc:{key}", topics[key]
            return
        from ctrltok.core.records import read_records

        for where, rec in read_records(source, text_field=text_field):
            text = rec.get(text_field)
            if not isinstance(text, str):
                raise ValueError(f"{where}: no text field {text_field!r} (fields {sorted(rec)}); "
                                 "set backtranslate.corpus_field")
            yield str(rec.get("id", where)), text

    for n, doc in enumerate(docs()):
        if limit is not None and n >= limit:
            return
        yield doc


_RULE = re.compile(r"^\s*([*=~^\-#])\1{2,}\s*$")  # a heading underline: *****, =====, -----
_CONNECTIVE = re.compile(r"^(and|but|or|so|also|however|moreover|furthermore|therefore|thus|hence|"
                         r"in addition|as a result|otherwise|then|see also)\b", re.I)


def _sections(text: str) -> list[str]:
    """Split at headings (a line underlined by a rule); the headings themselves are dropped."""
    lines = text.replace("\r\n", "\n").split("\n")
    sections, current = [], []
    i = 0
    while i < len(lines):
        if i + 1 < len(lines) and lines[i].strip() and _RULE.match(lines[i + 1]):
            sections.append("\n".join(current))
            current = []
            i += 2
            continue
        current.append(lines[i])
        i += 1
    sections.append("\n".join(current))
    return [s.strip("\n") for s in sections if s.strip()]


def _units(section: str) -> list[str]:
    """Paragraphs, with an indented block (code, a grammar) glued to the paragraph introducing it,
    so no segment ends on "is equivalent to:" with the example cut away."""
    units: list[str] = []
    for block in re.split(r"\n\s*\n", section):
        if not block.strip():
            continue
        indented = block[:1].isspace()
        if units and (indented or units[-1].rstrip().endswith(":")):
            units[-1] = units[-1] + "\n\n" + block
        else:
            units.append(block.strip("\n"))
    return units


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def quality_issue(text: str, cfg: BacktranslateConfig) -> str | None:
    """The first heuristic a candidate fails, or None. The paper filters by length, dedups, and
    drops low-quality segments by simple heuristics; these are ours."""
    if len(text) < cfg.min_chars:
        return "too_short"
    if len(text) > cfg.max_chars:
        return "too_long"
    visible = [c for c in text if not c.isspace()]
    letters = [c for c in visible if c.isalpha()]
    if len(letters) < 0.55 * len(visible):
        return "mostly_symbols"  # tables, code dumps, link lists
    if sum(c.isupper() for c in letters) > 0.3 * len(letters):
        return "shouting"
    first = text.lstrip()
    if first[:1].islower() or _CONNECTIVE.match(first) or first[:1] in ",;:)]}":
        return "not_self_contained"  # continues a sentence or paragraph we do not have
    last_line = text.rstrip().rsplit("\n", 1)[-1]
    if not last_line[:1].isspace() and text.rstrip()[-1:] in ",:;(-":
        return "not_self_contained"  # stops mid-thought (an indented example may end anyhow)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) >= 4 and len(set(lines)) < 0.5 * len(lines):
        return "repetitive"
    return None


def segment(documents: Iterable[tuple[str, str]], cfg: BacktranslateConfig,
            stats: Counter | None = None) -> Iterator[Pair]:
    """Documents -> candidate responses: whole paragraphs packed greedily up to ``max_chars``
    within one section, filtered by :func:`quality_issue`, deduplicated by normalised hash, at
    most ``max_per_document`` kept per document and ``max_candidates`` in all.
    Ids are ``<document id>#<k>``, stable for the same corpus and settings."""
    stats = stats if stats is not None else Counter()
    seen: set[str] = set()
    kept = 0
    for doc_id, text in documents:
        stats["documents"] += 1
        k = kept_here = 0
        for section in _sections(text):
            chunks: list[str] = []
            for unit in _units(section):
                if chunks and len(chunks[-1]) + 2 + len(unit) <= cfg.max_chars:
                    chunks[-1] += "\n\n" + unit
                else:
                    chunks.append(unit)
            for chunk in chunks:
                pair = Pair(id=f"{doc_id}#{k}", source=doc_id, response=chunk)
                k += 1
                pair.drop = quality_issue(chunk, cfg)
                if pair.drop is None and cfg.max_per_document is not None and kept_here >= cfg.max_per_document:
                    pair.drop = "document_cap"  # spread a small budget over more documents
                if pair.drop is None:
                    digest = hashlib.sha1(normalise(chunk).encode()).hexdigest()
                    if digest in seen:
                        pair.drop = "duplicate"
                    seen.add(digest)
                yield pair
                if pair.drop is None:
                    kept += 1
                    kept_here += 1
                    if cfg.max_candidates is not None and kept >= cfg.max_candidates:
                        return


# --------------------------------------------------------------------------- augment, rewrite


def _batches(items: Iterable[Pair], size: int) -> Iterator[list[Pair]]:
    batch: list[Pair] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


_LABEL = re.compile(r"^\s*(?:\*\*|#+\s*)?(?:instruction|user|question|prompt|query|request|human)"
                    r"(?:\*\*)?\s*:\s*(?:\*\*)?\s*", re.I)
_QUOTES = ('""', "''", "``", "\u201c\u201d")


def clean_instruction(raw: str, response: str, cfg: BacktranslateConfig) -> tuple[str, str | None]:
    """Strict cleanup of M_yx's output: trim, drop one leading role label and wrapping quotes.
    Returns ``(instruction, drop reason or None)``."""
    text = _LABEL.sub("", raw.strip(), count=1).strip()
    if len(text) >= 2 and text[0] + text[-1] in _QUOTES:
        text = text[1:-1].strip()
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(line.rstrip() for line in text.splitlines()))
    if len(text) < cfg.min_instruction_chars or not any(c.isalpha() for c in text):
        return text, "instruction_empty"
    if len(text) > cfg.max_instruction_chars:
        return text, "instruction_too_long"
    norm = normalise(text)
    if len(norm) >= 20 and norm in normalise(response):
        return text, "instruction_copies_response"  # the backward model echoed the answer
    return text, None


def augment(pairs: Iterable[Pair], model: ChatModel, cfg: BacktranslateConfig, seed: int = 0) -> Iterator[Pair]:
    """M_yx writes the instruction each candidate answers (prompt: its system prompt + the response)."""
    system = load_text(cfg.backward_system, "backward_system")
    sampling = Sampling(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                        n=1, seed=seed)
    for batch in _batches(pairs, cfg.batch_size):
        convs = [[{"role": "system", "content": system}, {"role": "user", "content": p.response}] for p in batch]
        for pair, raw in zip(batch, model.chat(convs, sampling)):
            instruction, reason = clean_instruction(raw, pair.response, cfg)
            yield replace(pair, instruction=instruction, drop=reason)


_PREFACE = re.compile(r"^(?:sure|certainly|here(?:'s| is| are)|rewritten)[^\n]{0,100}:[ \t]*\n", re.I)


def clean_rewrite(raw: str) -> str:
    """Trim and remove a one-line preface ("Here is the rewritten answer:") the prompt asked not for."""
    return _PREFACE.sub("", raw.strip(), count=1).strip()


def distinct_ngrams(text: str, n: int = 4) -> float:
    """Share of distinct word n-grams; 1.0 for text that never repeats itself."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


# Whole pydoc topics score >= 0.76 and segments about 0.9; a small model stuck in a loop scores
# 0.15-0.5 (measured on SmolLM2-135M rewrites). Curation should catch those too, but a small
# curator rarely does, and a loop is never a good answer.
MIN_DISTINCT_NGRAMS = 0.7


def rewrite_issue(text: str) -> str | None:
    """Why a cleaned rewrite is unusable, or None."""
    if sum(c.isalpha() for c in text) < 20:
        return "rewrite_empty"
    if "Draft answer:" in text or "Instruction:\n" in text:
        return "rewrite_echoes_prompt"  # the model copied the prompt's scaffolding
    if distinct_ngrams(text) < MIN_DISTINCT_NGRAMS:
        return "rewrite_repetitive"
    return None


def rewrite(pairs: Iterable[Pair], model: ChatModel, cfg: BacktranslateConfig, seed: int = 0) -> Iterator[Pair]:
    """The seed model rewrites each response for its instruction; the segment stays in
    ``original_response``. An unusable rewrite (:func:`rewrite_issue`) is dropped with its reason,
    not silently replaced by the original."""
    prompt = load_text(cfg.rewrite_prompt, "rewrite_prompt")
    sampling = Sampling(max_new_tokens=cfg.rewrite_max_new_tokens, temperature=cfg.rewrite_temperature,
                        top_p=cfg.top_p, n=1, seed=seed)
    for batch in _batches(pairs, cfg.batch_size):
        convs = [[{"role": "user", "content": fill(prompt, "rewrite_prompt", instruction=p.instruction,
                                                   response=p.response)}] for p in batch]
        for pair, raw in zip(batch, model.chat(convs, sampling)):
            text = clean_rewrite(raw)
            reason = rewrite_issue(text)
            yield replace(pair, response=text if reason is None else pair.response,
                          original_response=pair.response, drop=reason)


# --------------------------------------------------------------------------- curate, select

_SCORE = re.compile(r"Score:[ \t]*([0-9]{1,9})")


def parse_score(text: str) -> int | None:
    """The strict parser: the last non-empty line, stripped, must be exactly ``Score: N``.

    Returns N (which may be outside 1..5: the caller counts that apart) or None. "Score: 4/5",
    "**Score: 4**", "score: 4", "Score: 4." and a score followed by more text all fail."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return None
    match = _SCORE.fullmatch(lines[-1])
    return int(match.group(1)) if match else None


def aggregate(scores: list[int | None], how: str) -> float | None:
    valid = [s for s in scores if s in SCORES]
    if not valid:
        return None
    return float(statistics.median(valid)) if how == "median" else sum(valid) / len(valid)


def curate(pairs: Iterable[Pair], model: ChatModel, cfg: BacktranslateConfig, seed: int = 0) -> Iterator[Pair]:
    """The curator scores each pair ``curation_samples`` times; the score is the median (or mean,
    ``score_aggregate``) of the samples that parsed to 1..5. A pair with none is dropped as
    ``score_unparsed`` (or ``score_out_of_range`` when every failing sample was a number outside 1..5)."""
    prompt = load_text(cfg.curation_prompt, "curation_prompt")
    n = cfg.curation_samples
    sampling = Sampling(max_new_tokens=cfg.curation_max_new_tokens, temperature=cfg.curation_temperature,
                        top_p=cfg.top_p, n=n, seed=seed)
    for batch in _batches(pairs, cfg.batch_size):
        convs = [[{"role": "user", "content": fill(prompt, "curation_prompt", instruction=p.instruction,
                                                   response=p.response)}] for p in batch]
        prefix = cfg.curation_answer_prefix
        outs = model.chat(convs, sampling, answer_prefix=prefix)
        if prefix:
            # Prefilled: the reply starts with the prefix; its first line must complete the strict form.
            outs = [prefix + (o.split("\n", 1)[0]) for o in outs]
        for i, pair in enumerate(batch):
            raw = outs[i * n:(i + 1) * n]  # prompt-major
            scores = [parse_score(t) for t in raw]
            score = aggregate(scores, cfg.score_aggregate)
            reason = None
            if score is None:
                reason = "score_unparsed" if any(s is None for s in scores) else "score_out_of_range"
            yield replace(pair, curator_outputs=raw, scores=scores, score=score, drop=reason)


def select(pairs: Iterable[Pair], keep_score: int) -> Iterator[Pair]:
    for pair in pairs:
        yield replace(pair, drop=None if pair.score is not None and pair.score >= keep_score else "score_below_keep")


# --------------------------------------------------------------------------- persistence


def _read_lines(path: Path, repair: bool = False) -> Iterator[Pair]:
    """Records of a stage file. With ``repair``, a torn last line (a kill mid-write) is cut off."""
    if not path.exists():
        return
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        if not repair:
            raise ValueError(f"{path}: the last line is incomplete; rerun the stage to repair it")
        with path.open("r+b") as fh:
            fh.truncate(end)
    for lineno, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                yield Pair.from_json(json.loads(line), f"{path}:{lineno}")
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not JSON ({exc})") from exc


def kept(path: Path) -> Iterator[Pair]:
    return (p for p in _read_lines(path) if p.drop is None)


def _run_stage(out_dir: Path, name: str, stage: Callable[[Iterable[Pair]], Iterator[Pair]],
               inputs: Iterable[Pair] = (), skip: str = "inputs", stats: Counter | None = None) -> Path:
    """Run one stage into ``<name>.jsonl``, resuming, and mark it done.

    ``skip="inputs"``: inputs whose id is already written are not passed to the stage (LLM
    stages; outputs are written in input order, so the written ids are a prefix).
    ``skip="outputs"``: the stage regenerates everything and already-written ids are not written
    again (``segment``: cheap, deterministic, and its dedup must see every earlier segment)."""
    path, marker = out_dir / f"{name}.jsonl", out_dir / f"{name}.done"
    if marker.exists():
        return path
    done = {p.id for p in _read_lines(path, repair=True)}
    if skip == "inputs":
        inputs = (p for p in inputs if p.id not in done)
    start = time.perf_counter()
    with path.open("a", encoding="utf-8") as fh:
        for pair in stage(inputs):
            if pair.id in done:
                if skip == "inputs":
                    raise RuntimeError(f"stage {name} yielded {pair.id} twice")
                continue
            fh.write(json.dumps(dataclasses.asdict(pair), ensure_ascii=False) + "\n")
            fh.flush()
            done.add(pair.id)
    info = {"records": len(done), "seconds_last_run": round(time.perf_counter() - start, 2),
            "stats": dict(stats or {})}
    _atomic_write(marker, json.dumps(info))
    return path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- training stages


def read_gold(source: str) -> list[tuple[str, str]]:
    """Gold ``(instruction, response)`` pairs: every user turn followed by an assistant turn in
    ``{"messages": [...]}`` records, or ``instruction``/``response`` (also ``output``) fields."""
    from ctrltok.core.records import read_records

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
    _atomic_write(path, "\n".join(lines) + "\n")
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
    _atomic_write(marker, json.dumps({"model": str(model), "examples": n}))
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
             iteration: int, trainer: Callable[[Recipe, Path], Path]) -> Path:
    """M_i: SFT on gold + selected pairs, each source marked by its system prompt (the paper's tags)."""
    cfg = recipe.backtranslate or BacktranslateConfig()

    def chats() -> Iterator[list[Message]]:
        for instr, resp in gold:
            yield [{"role": "system", "content": cfg.gold_tag}, {"role": "user", "content": instr},
                   {"role": "assistant", "content": resp}]
        for p in selected:
            yield [{"role": "system", "content": cfg.generated_tag}, {"role": "user", "content": p.instruction},
                   {"role": "assistant", "content": p.response}]

    return _train_stage(recipe, out_dir, f"model-{iteration}", chats(), cfg.finetune_steps, trainer)


# --------------------------------------------------------------------------- the pipeline


def check_config(cfg: BacktranslateConfig, source: str = "<recipe>") -> None:
    def bad(key: str, msg: str) -> ConfigError:
        return ConfigError(f"{source}: backtranslate.{key} {msg}")

    if cfg.score_aggregate not in AGGREGATES:
        raise bad("score_aggregate", f"= {cfg.score_aggregate!r}; expected one of {list(AGGREGATES)}")
    if cfg.keep_score not in SCORES:
        raise bad("keep_score", f"= {cfg.keep_score}; expected 1..5")
    for key in ("curation_samples", "iterations", "batch_size", "max_new_tokens", "rewrite_max_new_tokens",
                "curation_max_new_tokens"):
        if getattr(cfg, key) < 1:
            raise bad(key, f"= {getattr(cfg, key)}; expected >= 1")
    if cfg.min_chars > cfg.max_chars:
        raise bad("min_chars", f"= {cfg.min_chars} exceeds max_chars = {cfg.max_chars}")
    if cfg.curation_samples > 1 and cfg.curation_temperature == 0:
        raise bad("curation_temperature", "= 0 with curation_samples > 1: greedy samples are identical; "
                  "set a temperature (e.g. 0.7) or curation_samples: 1")


def _note_settings(out_dir: Path, recipe: Recipe, console: Any) -> None:
    """Record the settings of the first run; on a resume, say which ones changed, since the stages
    already done keep what the earlier settings produced (raising ``iterations`` is the usual,
    intended case)."""
    path = out_dir / "backtranslate.settings.json"
    now = {"model": recipe.model.name, **dataclasses.asdict(recipe.backtranslate or BacktranslateConfig())}
    if not path.exists():
        _atomic_write(path, json.dumps(now, indent=1))
        return
    before = json.loads(path.read_text())
    changed = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
    if changed:
        from rich.console import Console

        (console or Console(stderr=True)).print(
            f"[yellow]{out_dir}: resuming with changed settings {changed}; stages already done keep "
            f"their earlier results (delete their <stage>.done and .jsonl files to redo them)[/yellow]")


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
        import gc

        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass


def run_backtranslation(recipe: Recipe, out_dir: Path, backend_factory: Callable[[str, Recipe], ChatModel] = load_chat_model,
                        trainer: Callable[[Recipe, Path], Path] | None = None, console: Any = None) -> dict:
    """Run (or resume) the whole pipeline into ``out_dir``; returns the report (also ``report.json``)."""
    cfg = recipe.backtranslate or BacktranslateConfig()
    check_config(cfg, recipe.source)
    if trainer is None:
        from ctrltok.training.train import train as trainer
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = recipe.train.seed
    _note_settings(out_dir, recipe, console)
    models = _Models(backend_factory, recipe)
    gold = read_gold(cfg.gold)

    stats: Counter = Counter()
    _run_stage(out_dir, "segments", lambda _: segment(read_documents(cfg.corpus, cfg.corpus_field, cfg.max_documents),
                                                      cfg, stats), skip="outputs", stats=stats)
    m_yx = backward(recipe, gold, out_dir, trainer)
    if cfg.seed_model == "model":
        seed_model = recipe.model.name
    elif cfg.seed_model == "train":
        gold_chats = ([{"role": "user", "content": i}, {"role": "assistant", "content": r}] for i, r in gold)
        seed_model = str(_train_stage(recipe, out_dir, "seed", gold_chats, cfg.seed_steps, trainer))
    else:
        seed_model = cfg.seed_model
    last = _run_stage(out_dir, "augmented", lambda it: augment(it, models.get(str(m_yx)), cfg, seed),
                      kept(out_dir / "segments.jsonl"))
    if cfg.rewrite:
        last = _run_stage(out_dir, "rewritten", lambda it: rewrite(it, models.get(seed_model), cfg, seed), kept(last))
    curator, final = seed_model, None
    for i in range(1, cfg.iterations + 1):
        curated = _run_stage(out_dir, f"curated-{i}", lambda it, c=curator: curate(it, models.get(c), cfg, seed),
                             kept(last))
        selected = _run_stage(out_dir, f"selected-{i}", lambda it: select(it, cfg.keep_score), kept(curated))
        if not (out_dir / f"model-{i}.done").exists():
            models.release()
        final = finetune(recipe, gold, kept(selected), out_dir, i, trainer)
        curator = str(final)
    from ctrltok.backtranslate.report import build_report, print_report

    report = build_report(out_dir, cfg, {"backward": str(m_yx), "seed": seed_model, "final": str(final)},
                          gold=len(gold))
    print_report(report, console)
    return report
