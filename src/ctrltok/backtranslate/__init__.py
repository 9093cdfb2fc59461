"""Instruction backtranslation (Humpback), one job per module: ``pairs`` (the record and its stage
files), ``segment`` (documents -> candidates), ``stages`` (the LLM stages and their parsers),
``report`` (counts, rates, histogram), ``pipeline`` (stage files, training, orchestration)."""
