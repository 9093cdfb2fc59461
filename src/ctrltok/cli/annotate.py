"""`ctrltok annotate`: write an EPE sidecar with an LLM."""

from __future__ import annotations

from ctrltok.epe.annotate import annotate_file


def annotate(a):
    annotate_file(a.model, a.input, a.out, max_new_tokens=a.max_new_tokens)
