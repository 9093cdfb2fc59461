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
document, flushed as they come, so a killed run resumes where it stopped without losing or
duplicating a document. LLM calls go through a ``complete(prompts, sampling)`` backend
(:mod:`ctrltok.generation.completion`), so tests use a fake.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib import resources
from pathlib import Path

from ctrltok.conditional.segment import split_sentences
from ctrltok.core.records import read_records
from ctrltok.core.tokens import CharterItem, load_charter
from ctrltok.generation.completion import Backend, Sampling

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


def build_prompt(context: str, charter: list[CharterItem], tokenizer=None) -> str:
    template = (resources.files("ctrltok") / "resources" / "annotate_prompt.txt").read_text(encoding="utf-8")
    items = "\n".join(f"{c.id} {c.title}: {c.text}" for c in charter)
    content = template.format(charter=items, text=defang(context))
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    return content


def annotate_records(records: list[tuple[str, dict]], backend: Backend, out: Path, charter: list[CharterItem],
                     tokenizer=None, window_chars: int = 1500, batch_size: int = 8,
                     sampling: Sampling | None = None, id_field: str = "id", text_field: str = "text") -> dict:
    """Annotate documents not yet in ``out`` (or its failures file); returns the counts."""
    out = Path(out)
    failures = out.with_name(out.name.replace(".jsonl", "") + ".failures.jsonl")
    done: set[str] = set()
    for path in (out, failures):
        if path.exists():
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        done.add(json.loads(line)["doc_id"])
                    except (json.JSONDecodeError, KeyError):
                        pass  # a line cut by a kill: its document is simply redone
            _drop_partial_line(path)
    ids = {c.id for c in charter}
    sampling = sampling or Sampling(max_new_tokens=160, temperature=0.0)
    counts: Counter = Counter()
    todo = []
    for where, rec in records:
        doc_id, text = rec.get(id_field), rec.get(text_field)
        if not isinstance(doc_id, (str, int)) or not isinstance(text, str) or not text.strip():
            counts["skipped: no id or no text"] += 1
            continue
        if str(doc_id) in done:
            counts["already annotated (resumed)"] += 1
            continue
        todo.append((str(doc_id), text))
    with open(out, "a", encoding="utf-8") as ok_fh, open(failures, "a", encoding="utf-8") as bad_fh:
        for i in range(0, len(todo), batch_size):
            batch = todo[i:i + batch_size]
            offsets = [insertion_offset(t) for _, t in batch]
            contexts = [t[:o][-window_chars:] for (_, t), o in zip(batch, offsets)]
            answers = backend.complete([build_prompt(c, charter, tokenizer) for c in contexts], sampling)
            if len(answers) != len(batch):
                raise RuntimeError(f"backend returned {len(answers)} answers for {len(batch)} prompts")
            for (doc_id, _), offset, context, answer in zip(batch, offsets, contexts, answers):
                try:
                    reflection, chosen = parse_answer(answer, ids, context)
                except AnnotationParseError as exc:
                    counts[f"failed: {exc.reason}"] += 1
                    bad_fh.write(json.dumps({"doc_id": doc_id, "reason": exc.reason, "answer": answer}) + "\n")
                    bad_fh.flush()
                    continue
                counts["annotated"] += 1
                ok_fh.write(json.dumps({"doc_id": doc_id, "offset": offset, "reflection_3p": reflection,
                                        "charter": chosen}) + "\n")
                ok_fh.flush()
    attempted = sum(v for k, v in counts.items() if k == "annotated" or k.startswith("failed"))
    failed = sum(v for k, v in counts.items() if k.startswith("failed"))
    summary = {"counts": dict(counts), "attempted": attempted,
               "parse_failure_rate": failed / attempted if attempted else 0.0, "sidecar": str(out),
               "failures": str(failures)}
    out.with_name(out.name.replace(".jsonl", "") + ".summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _drop_partial_line(path: Path) -> None:
    """A kill mid-write leaves a line without its newline: cut it so appends start clean."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def annotate_file(model: str, input: str, out: str, max_new_tokens: int = 160, charter: str | None = None,
                  batch_size: int = 8) -> dict:
    """`ctrltok annotate`: write an EPE sidecar for a corpus with a model (resumes)."""
    from ctrltok.generation.completion import make_backend

    backend = make_backend(model, kind="transformers")
    summary = annotate_records(list(read_records(input)), backend, Path(out), load_charter(charter),
                               tokenizer=getattr(backend, "tokenizer", None), batch_size=batch_size,
                               sampling=Sampling(max_new_tokens=max_new_tokens))
    print(json.dumps(summary, indent=1))
    return summary

