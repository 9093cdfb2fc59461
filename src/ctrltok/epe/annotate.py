"""EPE annotation stage: an LLM writes the sidecar that reflection insertion reads.

For each corpus document, the insertion point is the sentence boundary nearest the middle of the
document (``segment.split_sentences``), the model reads the text before it (the last
``window_chars`` characters) and the charter, and must answer in exactly this form::

    Reflection: <one to three sentences, third person, about the text so far>
    Charter: 2.1, 5.3

The parser is strict: both lines, in that order, nothing else but blank lines; charter ids must be
ids of the charter (at least one); the reflection 20-600 characters and not the document's own
text. Every failure is counted under its reason and written to ``OUT.failures.jsonl``; accepted
annotations go to ``OUT`` (the sidecar format of :mod:`ctrltok.epe.reflection`), one line per
document. The run is a stage of :mod:`ctrltok.core.stages`: one shard per batch in
``OUT.parts/``, each renamed into place when its batch is answered, so a killed run resumes after
the last answered batch without losing or duplicating a document; at the end the shards are
appended to ``OUT`` and its failures file. Documents already in those files are not annotated
again, so a grown corpus costs only its new documents. An unfinished job resumes only over the same
inputs: given the corpus as a path, its fingerprint (:mod:`ctrltok.core.inputs`: path, size, a hash
of its head and tail) is compared, with whatever else the caller fingerprints (the model); another
file, or the same one edited in place, is refused with one line naming it. LLM calls go through a
``complete(prompts, sampling)`` backend (:mod:`ctrltok.generation.completion`), so tests use a
fake; ``ctrltok annotate`` (:mod:`ctrltok.cli.annotate`) loads the model by name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from ctrltok.core.chat import get_encoder
from ctrltok.core.inputs import input_fingerprint
from ctrltok.core.records import read_records
from ctrltok.core.segment import split_sentences
from ctrltok.core.stages import JsonlSink, Outcome, StageRun, atomic_write, read_jsonl
from ctrltok.core.templates import Template
from ctrltok.core.tokens import CharterItem
from ctrltok.generation.completion import Backend, Prompt, Sampling

_ANSWER = re.compile(r"\A\s*Reflection:[ \t]*(?P<r>[^\n]+?)[ \t]*\n\s*Charter:[ \t]*(?P<c>[^\n]*?)[ \t]*\s*\Z")
_ID = re.compile(r"\d+\.\d+")


class AnnotationParseError(ValueError):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def insertion_offset(text: str) -> int:
    """The sentence boundary closest to the middle of the text (0 < offset < len(text) when possible)."""
    pieces = split_sentences(text)
    if len(pieces) < 2:
        return len(text)
    bounds, pos = [], 0
    for p in pieces[:-1]:
        pos += len(p)
        bounds.append(pos)
    return min(bounds, key=lambda b: abs(b - len(text) / 2))


def defang(text: str) -> str:
    """Break control-token spellings so a document cannot forge the prompt's own markup."""
    return re.sub(r"<(\|?)([A-Za-z_][\w.]*)(\|?)>", lambda m: f"< {m.group(1)}{m.group(2)}{m.group(3)} >", text)


def parse_answer(answer: str, charter_ids: set[str], context: str = "") -> tuple[str, list[str]]:
    """The strict parser; raises AnnotationParseError with a short reason."""
    m = _ANSWER.match(answer)
    if not m:
        raise AnnotationParseError("not in the 'Reflection: / Charter:' form")
    reflection, charter = m.group("r").strip(), m.group("c").strip()
    if not 20 <= len(reflection) <= 600:
        raise AnnotationParseError("reflection length outside 20-600 characters")
    if context and reflection in context:
        raise AnnotationParseError("reflection copies the document")
    parts = [p.strip() for p in charter.split(",")] if charter else []
    if not parts or not all(_ID.fullmatch(p) for p in parts):
        raise AnnotationParseError("charter line is not a comma-separated list of ids")
    unknown = [p for p in parts if p not in charter_ids]
    if unknown:
        raise AnnotationParseError("unknown charter id")
    return reflection, list(dict.fromkeys(parts))


def build_prompt(context: str, charter: list[CharterItem], tokenizer=None) -> Prompt:
    """The annotation prompt for the text before the insertion point.

    With the model's tokenizer: injection-safe ids. The markup comes from the chat template that
    ``apply_chat_template`` uses by default (the model's own, or the one a ctrltok run trained on)
    and the document is encoded as text, so a document that spells ``<|im_end|>`` or ``</s>`` gives
    the model those characters, never the control token; a tokenizer without a chat template gets
    the content alone, also encoded as text. Without one (fake backends): the string, with the
    document's ``<...>`` spellings broken by :func:`defang`, as a string prompt's markup is parsed."""
    template = (resources.files("ctrltok") / "resources" / "annotate_prompt.txt").read_text(encoding="utf-8")
    items = "\n".join(f"{c.id} {c.title}: {c.text}" for c in charter)
    if tokenizer is None:
        return template.format(charter=items, text=defang(context))
    content = template.format(charter=items, text=context)
    saved = getattr(tokenizer, "chat_template", None)
    source = saved.get("default") if isinstance(saved, dict) else saved
    if not source:
        return tokenizer(content, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    served = Template("served", source, tokenizer.eos_token)
    return get_encoder(tokenizer, served).prompt_ids([{"role": "user", "content": content}])


def _sibling(out: Path, suffix: str) -> Path:
    return out.with_name(out.name.replace(".jsonl", "") + suffix)


def _doc_ids(paths: Iterable[Path], repair: bool = False) -> set[str]:
    return {str(rec["doc_id"]) for path in paths for _, rec in read_jsonl(path, repair=repair) if "doc_id" in rec}


def annotate_records(records: Iterable[tuple[str, dict]] | str | os.PathLike, backend: Backend, out: Path,
                     charter: list[CharterItem], tokenizer=None, window_chars: int = 1500, batch_size: int = 8,
                     sampling: Sampling | None = None, id_field: str = "id", text_field: str = "text",
                     inputs: Mapping[str, Any] | None = None) -> dict:
    """Annotate the documents not yet in ``out`` (or its failures file); returns the summary.

    ``records``: ``(where, record)`` pairs, or the corpus as a path (read with
    :func:`~ctrltok.core.records.read_records` and fingerprinted). ``inputs``: fingerprints of what
    else the answers depend on (e.g. ``{"model": model_fingerprint(name)}``). An unfinished job
    resumes only when they and the corpus's fingerprint are the same.
    ``counts`` cover the whole job, including batches an earlier, killed invocation answered;
    ``already annotated (resumed)`` counts the documents this invocation did not ask about.
    """
    out = Path(out)
    failures, summary_path = _sibling(out, ".failures.jsonl"), _sibling(out, ".summary.json")
    folder = Path(f"{out}.parts")
    read = dict(inputs or {})
    if isinstance(records, (str, os.PathLike)):
        read["input"] = input_fingerprint(records)
        records = read_records(records)
    records = list(records)
    # Documents of an unfinished job are in its shards, not yet in OUT (or already there, when a
    # kill came between the merge and the removal of the shards): they still belong to this job.
    unfinished = StageRun(folder)
    pending = _doc_ids(unfinished.shard_files(".jsonl") + unfinished.shard_files(".dropped.jsonl"))
    done = _doc_ids([out, failures], repair=True) - pending
    todo = [(w, rec) for w, rec in records if rec.get(id_field) is None or str(rec[id_field]) not in done]
    sampling = sampling or Sampling(max_new_tokens=160, temperature=0.0)
    settings = {"documents": hashlib.sha256("\n".join(str(r.get(id_field, w)) for w, r in todo).encode()).hexdigest(),
                "window_chars": window_chars, "sampling": dataclasses.asdict(sampling),
                "charter": [c.id for c in charter], "id_field": id_field, "text_field": text_field}
    run = StageRun(folder, shard_size=batch_size, settings=settings,
                   sink=lambda base: JsonlSink(base, dropped="apart"), inputs=read or None)
    ids = {c.id for c in charter}

    def stage(items: Iterable[tuple[str, dict]]) -> Iterator[Outcome]:
        batch: list[tuple[str, dict]] = []
        for item in items:
            batch.append(item)
            if len(batch) == batch_size:
                yield from _annotate_batch(batch, backend, charter, ids, tokenizer, window_chars, sampling,
                                           id_field, text_field)
                batch = []
        if batch:
            yield from _annotate_batch(batch, backend, charter, ids, tokenizer, window_chars, sampling,
                                       id_field, text_field)

    stats = run.run(stage, todo)
    doc_id = (lambda rec: rec["doc_id"])
    run.merge(failures, ".dropped.jsonl", append=True, key=doc_id)
    run.merge(out, append=True, key=doc_id)
    counts = Counter({"annotated": stats.kept, **stats.drops,
                      "already annotated (resumed)": len(records) - len(todo) + stats.resumed_at})
    attempted = sum(v for k, v in counts.items() if k == "annotated" or k.startswith("failed"))
    failed = sum(v for k, v in counts.items() if k.startswith("failed"))
    summary = {"counts": {k: v for k, v in counts.items() if v}, "attempted": attempted,
               "parse_failure_rate": failed / attempted if attempted else 0.0, "sidecar": str(out),
               "failures": str(failures), "first_places": dict(stats.drops.examples)}
    atomic_write(summary_path, json.dumps(summary, indent=1))
    run.remove()
    return summary


def _annotate_batch(batch: list[tuple[str, dict]], backend: Backend, charter: list[CharterItem], ids: set[str],
                    tokenizer, window_chars: int, sampling: Sampling, id_field: str,
                    text_field: str) -> list[Outcome]:
    """One outcome per document of the batch, in order; one backend call for the valid ones."""
    outcomes: list[Outcome | None] = [None] * len(batch)
    asked = []
    for j, (where, rec) in enumerate(batch):
        doc_id, text = rec.get(id_field), rec.get(text_field)
        if not isinstance(doc_id, (str, int)) or not isinstance(text, str) or not text.strip():
            outcomes[j] = Outcome.dropped("skipped: no id or no text", where)
        else:
            asked.append((j, str(doc_id), text))
    offsets = [insertion_offset(t) for _, _, t in asked]
    contexts = [t[:o][-window_chars:] for (_, _, t), o in zip(asked, offsets)]
    answers = backend.complete([build_prompt(c, charter, tokenizer) for c in contexts], sampling) if asked else []
    if len(answers) != len(asked):
        raise RuntimeError(f"backend returned {len(answers)} answers for {len(asked)} prompts")
    for (j, doc_id, _), offset, context, answer in zip(asked, offsets, contexts, answers):
        try:
            reflection, chosen = parse_answer(answer, ids, context)
        except AnnotationParseError as exc:
            outcomes[j] = Outcome.dropped(f"failed: {exc.reason}", doc_id,
                                          {"doc_id": doc_id, "reason": exc.reason, "answer": answer})
            continue
        outcomes[j] = Outcome.keep({"doc_id": doc_id, "offset": offset, "reflection_3p": reflection,
                                    "charter": chosen}, doc_id)
    return outcomes
