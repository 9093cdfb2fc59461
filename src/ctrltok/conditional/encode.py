"""Labelled records -> Examples for conditional training (Korbak et al. 2023, seed 001).

Control ids are inserted from the record's ``segments`` (what :mod:`ctrltok.conditional.label`
writes), never parsed from text, so a document spelling ``<|aligned|>`` cannot forge the id.
"""

from __future__ import annotations

from typing import Any

from ctrltok.conditional.label import CONTROL_TEXT, LabelError
from ctrltok.core.example import IGNORE, Example


def encode_labelled(record: dict[str, Any], tokenizer: Any, aligned_id: int, misaligned_id: int,
                    max_length: int | None = None, supervise_control: bool = True, eos_id: int | None = None,
                    source: str = "") -> Example:
    """A labelled record -> an :class:`Example` for plain next-token prediction.

    Control ids are inserted here, never parsed from text: segment text is encoded with
    ``split_special_tokens=True``, so a document spelling ``<|aligned|>`` stays plain text.
    Consecutive unprefixed segments are encoded together, so the ids equal the tokenizer's own
    encoding of ``labelled_text`` whenever the text spells no special token. Every token is
    supervised, control tokens too unless ``supervise_control=False``. ``eos_id`` (e.g. the id of
    ``<|endoftext|>``) is appended, supervised, to close the document. Longer than ``max_length``:
    truncated to ``max_length``.
    """
    segments = record.get("segments")
    if not isinstance(segments, list):
        raise LabelError(f"{source or 'record'}: no 'segments' list; label it first (ctrltok label)")
    ids: list[int] = []
    labels: list[int] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            piece = tokenizer("".join(run), add_special_tokens=False, split_special_tokens=True)["input_ids"]
            ids.extend(piece)
            labels.extend(piece)
            run.clear()

    for j, seg in enumerate(segments):
        if not isinstance(seg, dict) or not isinstance(seg.get("text"), str):
            raise LabelError(f"{source or 'record'} segment {j}: expected {{\"text\": str, \"control\": ...}}, "
                             f"found {seg!r:.80}")
        control = seg.get("control")
        if control is not None:
            if control not in CONTROL_TEXT:
                raise LabelError(f"{source or 'record'} segment {j}: control {control!r}, expected "
                                 "'aligned', 'misaligned' or null")
            flush()
            cid = aligned_id if control == "aligned" else misaligned_id
            ids.append(cid)
            labels.append(cid if supervise_control else IGNORE)
        run.append(seg["text"])
    flush()
    if eos_id is not None:
        ids.append(eos_id)
        labels.append(eos_id)
    if max_length is not None and len(ids) > max_length:
        ids, labels = ids[:max_length], labels[:max_length]
    return Example(input_ids=ids, labels=labels, source=source)


# Evaluation: does the control token steer the scorer's verdict?
