"""`ctrltok eval` (held-out loss and end-of-turn rate, or --conditional, or --epe) and
`ctrltok constitution`."""

from __future__ import annotations

import json

from ctrltok.core.heads import constitution_cli
from ctrltok.evaluation.conditional import evaluate_checkpoint
from ctrltok.evaluation.epe import evaluate_epe, print_epe
from ctrltok.evaluation.evaluate import evaluate_cli


def evaluate(a):
    if a.epe:
        result = evaluate_epe(a.model, corpus=a.data, sidecar=a.sidecar)
        print_epe(result)
    elif a.conditional:
        result = evaluate_checkpoint(a.model, scorer=a.scorer, n=a.n, max_new_tokens=a.max_new_tokens, prompts=a.data)
    else:
        result = evaluate_cli(a.model, a.data, a.template, before=a.before, n_generate=a.n,
                              max_new_tokens=a.max_new_tokens)
    if a.json:
        print(json.dumps(result, indent=1, default=str))


def constitution(a):
    constitution_cli(a.model, a.input, as_json=a.json)
