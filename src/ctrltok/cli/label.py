"""`ctrltok label`: score and label sentences for conditional training."""

from __future__ import annotations

from ctrltok.conditional.label import label_file


def label(a):
    label_file(a.input, a.out, scorer=a.scorer, threshold=a.threshold, misaligned_fraction=a.misaligned_fraction,
               drop_fraction=a.drop_fraction, seed=a.seed, processes=a.processes, text_field=a.text_field,
               on_error=a.on_error)
