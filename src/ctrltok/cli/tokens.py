"""`ctrltok add-tokens`, `render`, `inspect`: vocabulary surgery and encoding from the command line."""

from __future__ import annotations

import sys

from ctrltok.core.chat import render_file
from ctrltok.core.tokens import save_with_tokens
from ctrltok.evaluation.doctor import inspect_checkpoint, print_report


def add_tokens(a):
    out = save_with_tokens(a.model, a.preset, init=a.init, pad_to_multiple_of=a.pad_to_multiple_of, out=a.out,
                           template=a.template)
    print(f"saved to {out}")
    print_report(inspect_checkpoint(out))


def render(a):
    n = render_file(a.model, a.template, a.input, a.out, loss_on=a.loss_on)
    print(f"wrote {n} encoded conversations to {a.out}", file=sys.stderr)


def inspect(a):
    report = inspect_checkpoint(a.path)
    if a.json:
        print(report.to_json())
    else:
        print_report(report)
    return 1 if report.problems and a.strict else 0
