"""`ctrltok annotate`: write an EPE sidecar with an LLM (resumes).

The command layer of :mod:`ctrltok.epe.annotate`: it loads the model and the charter by name,
reads the corpus, calls :func:`~ctrltok.epe.annotate.annotate_records` and prints the summary.
"""

from __future__ import annotations

import json
from pathlib import Path

from ctrltok.cli.checks import check_output
from ctrltok.core.inputs import model_fingerprint
from ctrltok.core.tokens import load_charter
from ctrltok.epe.annotate import annotate_records
from ctrltok.generation.completion import Sampling, make_backend


def annotate_file(model: str, input: str, out: str, max_new_tokens: int = 160, charter: str | None = None,
                  batch_size: int = 8) -> dict:
    """Annotate the corpus ``input`` with the model ``model`` into the sidecar ``out``; print the summary.

    An unfinished job in ``OUT.parts`` resumes only with the same input and model (``annotate_records``
    compares their fingerprints); ``out`` may not be ``input``."""
    check_output(out, {"--input": input})
    model_fp = model_fingerprint(model) or {"name": model}
    backend = make_backend(model, kind="transformers")
    summary = annotate_records(input, backend, Path(out), load_charter(charter),
                               tokenizer=getattr(backend, "tokenizer", None), batch_size=batch_size,
                               sampling=Sampling(max_new_tokens=max_new_tokens), inputs={"model": model_fp})
    print(json.dumps(summary, indent=1))
    return summary


def annotate(a):
    annotate_file(a.model, a.input, a.out, max_new_tokens=a.max_new_tokens)
