"""`ctrltok generate` and `ctrltok chat`: load a checkpoint by name or path, read and write files,
print. The generating itself is :mod:`ctrltok.generation.generate`, which takes objects only."""

from __future__ import annotations

import json
import os
import sys
from typing import IO

from ctrltok.cli.checks import UsageError, check_output, output_file
from ctrltok.core.conversation import to_conversation
from ctrltok.core.records import read_records
from ctrltok.generation.generate import chat_session, load_for_generation
from ctrltok.generation.generate import generate as generate_replies


def generate(a):
    if a.input:
        n = generate_file(a.model, a.input, a.out, template=a.template, max_new_tokens=a.max_new_tokens,
                          temperature=a.temperature)
        if a.out != "-":
            print(f"wrote {n} replies to {a.out}", file=sys.stderr)
        return
    results = generate_prompts(a.model, [a.prompt], template=a.template, max_new_tokens=a.max_new_tokens,
                               temperature=a.temperature)
    print(results[0]["text"])


def chat(a):
    chat_loop(a.model, template=a.template)


def generate_file(model_dir: str | os.PathLike, input_jsonl: str | os.PathLike, out_jsonl: str | os.PathLike,
                  template: str | None = None, max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0,
                  batch_size: int = 8) -> int:
    """Reply to every record of ``input_jsonl`` (any layout :func:`ctrltok.core.conversation.to_conversation`
    reads; ``{"prompt": "..."}`` alone is one user turn).

    Each output line is the input record plus ``output`` (the text), ``output_ids``, ``stopped`` and
    ``n_tokens``, in input order, written batch by batch. Every record is read and checked before the
    model loads; the output is written to ``OUT.tmp`` and renamed into place when complete (``-``:
    stdout), and may not be the input. Returns the number of lines written.
    """
    out = str(out_jsonl)
    check_output(out, {"--input": str(input_jsonl)})
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {max_new_tokens}: expected an integer >= 1")
    records = list(read_records(str(input_jsonl)))
    if not records:
        raise UsageError(f"--input {input_jsonl}: no records; nothing to reply to")
    convs = [to_conversation(rec, where, prompt_only=True) for where, rec in records]
    model, tokenizer, saved = load_for_generation(model_dir)
    template = template or saved
    written = 0
    with output_file(out) as fh:  # a half-written file never looks finished
        for start in range(0, len(convs), batch_size):
            outs = generate_replies(model, tokenizer, convs[start:start + batch_size], template, max_new_tokens,
                                    temperature, seed + start, batch_size)
            for (_, rec), res in zip(records[start:start + batch_size], outs):
                line = {**rec, "output": res["text"], "output_ids": res["ids"], "stopped": res["stopped"],
                        "n_tokens": res["n_tokens"]}
                fh.write(json.dumps(line, ensure_ascii=False) + "\n")
                written += 1
            fh.flush()
    return written


def generate_prompts(model_dir: str | os.PathLike, prompts: list[str], template: str | None = None,
                     max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0,
                     batch_size: int = 8) -> list[dict]:
    """``ctrltok generate --prompt TEXT``: each prompt as one user message."""
    model, tokenizer, saved = load_for_generation(model_dir)
    convs = [[{"role": "user", "content": p}] for p in prompts]
    return generate_replies(model, tokenizer, convs, template or saved, max_new_tokens, temperature, seed,
                            batch_size)


def chat_loop(model_dir: str | os.PathLike, template: str | None = None, max_new_tokens: int = 256,
              temperature: float = 0.0, seed: int = 0, system: str | None = None,
              stdin: IO[str] | None = None, stdout: IO[str] | None = None) -> list[dict]:
    """``ctrltok chat``: an interactive conversation with a checkpoint on stdin/stdout."""
    model, tokenizer, saved = load_for_generation(model_dir)
    stdout = stdout or sys.stdout
    template = template or saved
    stdout.write(f"chatting with {model_dir} (template {template!r}); /exit or Ctrl-D ends, /reset clears\n")
    return chat_session(model, tokenizer, template, stdin or sys.stdin, stdout, max_new_tokens, temperature,
                        seed, system)
