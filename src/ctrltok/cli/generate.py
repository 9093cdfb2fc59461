"""`ctrltok generate` and `ctrltok chat`: load a checkpoint by name or path, read and write files,
print. The generating itself is :mod:`ctrltok.generation.generate`, which takes objects only.

Decoding: the checkpoint's ``generation_config.json`` (a ctrltok run writes its recipe's
``decoding`` section there), with the decoding flags on top (:func:`decoding_flags`), resolved by
:func:`ctrltok.core.decoding.resolve_decoding` (:func:`model_decoding`):
``--greedy`` or ``--temperature 0`` decode greedily whatever the checkpoint says.
"""

from __future__ import annotations

import json
import os
import sys
from typing import IO, Any

from ctrltok.cli.checks import UsageError, check_output, output_file
from ctrltok.core.config import DecodingConfig
from ctrltok.core.conversation import to_conversation
from ctrltok.core.decoding import describe_decoding, resolve_decoding
from ctrltok.core.records import read_records
from ctrltok.generation.generate import chat_session, load_for_generation
from ctrltok.generation.generate import generate as generate_replies

DECODING_FLAGS = ("greedy", "temperature", "top_p", "top_k", "repetition_penalty", "no_repeat_ngram_size",
                  "max_new_tokens")


def decoding_flags(a) -> dict[str, Any]:
    """The decoding flags the user gave (``None`` and an unset ``--greedy`` left out), as
    :func:`ctrltok.core.decoding.resolve_decoding` takes them."""
    flags = {k: getattr(a, k) for k in DECODING_FLAGS if getattr(a, k, None) is not None}
    if not flags.get("greedy"):  # --greedy is False when not given (--temperature 0 is kept: it is a value)
        flags.pop("greedy", None)
    return flags


def model_decoding(model, flags: dict[str, Any] | None = None, *, max_new_tokens: int | None = None,
                   temperature: float | None = None) -> DecodingConfig:
    """The checkpoint's decoding (its generation_config) with the flag values on top, and the
    functions' ``max_new_tokens`` / ``temperature`` keywords over those (where given); a value out
    of range is a :class:`UsageError`. What every command's decoding comes from."""
    try:
        return resolve_decoding(model, **_flags(flags, max_new_tokens, temperature))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _flags(decoding: dict[str, Any] | None, max_new_tokens: int | None, temperature: float | None) -> dict[str, Any]:
    """The keyword shortcuts merged into the flag values (the explicit keywords win)."""
    flags = dict(decoding or {})
    if max_new_tokens is not None:
        flags["max_new_tokens"] = max_new_tokens
    if temperature is not None:
        flags["temperature"] = temperature
    return flags


def generate(a):
    flags = decoding_flags(a)
    if a.input:
        n = generate_file(a.model, a.input, a.out, template=a.template, seed=a.seed, decoding=flags)
        if a.out != "-":
            print(f"wrote {n} replies to {a.out}", file=sys.stderr)
        return
    results = generate_prompts(a.model, [a.prompt], template=a.template, seed=a.seed, decoding=flags)
    print(results[0]["text"])


def chat(a):
    chat_loop(a.model, template=a.template, seed=a.seed, system=a.system, decoding=decoding_flags(a))


def generate_file(model_dir: str | os.PathLike, input_jsonl: str | os.PathLike, out_jsonl: str | os.PathLike,
                  template: str | None = None, max_new_tokens: int | None = None, temperature: float | None = None,
                  seed: int = 0, batch_size: int = 8, decoding: dict[str, Any] | None = None) -> int:
    """Reply to every record of ``input_jsonl`` (any layout :func:`ctrltok.core.conversation.to_conversation`
    reads; ``{"prompt": "..."}`` alone is one user turn).

    Each output line is the input record plus ``output`` (the text), ``output_ids``, ``stopped`` and
    ``n_tokens``, in input order, written batch by batch. Every record is read and checked before the
    model loads; the output is written to ``OUT.tmp`` and renamed into place when complete (``-``:
    stdout), and may not be the input. Returns the number of lines written.

    Decoding: the checkpoint's, with ``decoding`` (flag values, :func:`decoding_flags`) and
    ``max_new_tokens`` / ``temperature`` on top; it is printed to stderr.
    """
    out = str(out_jsonl)
    check_output(out, {"--input": str(input_jsonl)})
    flags = _flags(decoding, max_new_tokens, temperature)
    if flags.get("max_new_tokens", 1) < 1:  # before the model loads; model_decoding checks the rest
        raise UsageError(f"--max-new-tokens {flags['max_new_tokens']}: expected an integer >= 1")
    records = list(read_records(str(input_jsonl)))
    if not records:
        raise UsageError(f"--input {input_jsonl}: no records; nothing to reply to")
    convs = [to_conversation(rec, where, prompt_only=True) for where, rec in records]
    model, tokenizer, saved = load_for_generation(model_dir)
    template = template or saved
    settings = model_decoding(model, flags)
    print(f"decoding: {describe_decoding(settings)}", file=sys.stderr)
    written = 0
    with output_file(out) as fh:  # a half-written file never looks finished
        for start in range(0, len(convs), batch_size):
            outs = generate_replies(model, tokenizer, convs[start:start + batch_size], template, seed=seed + start,
                                    batch_size=batch_size, decoding=settings)
            for (_, rec), res in zip(records[start:start + batch_size], outs):
                line = {**rec, "output": res["text"], "output_ids": res["ids"], "stopped": res["stopped"],
                        "n_tokens": res["n_tokens"]}
                fh.write(json.dumps(line, ensure_ascii=False) + "\n")
                written += 1
            fh.flush()
    return written


def generate_prompts(model_dir: str | os.PathLike, prompts: list[str], template: str | None = None,
                     max_new_tokens: int | None = None, temperature: float | None = None, seed: int = 0,
                     batch_size: int = 8, decoding: dict[str, Any] | None = None) -> list[dict]:
    """``ctrltok generate --prompt TEXT``: each prompt as one user message; decoding as in
    :func:`generate_file`."""
    model, tokenizer, saved = load_for_generation(model_dir)
    settings = model_decoding(model, decoding, max_new_tokens=max_new_tokens, temperature=temperature)
    print(f"decoding: {describe_decoding(settings)}", file=sys.stderr)
    convs = [[{"role": "user", "content": p}] for p in prompts]
    return generate_replies(model, tokenizer, convs, template or saved, seed=seed, batch_size=batch_size,
                            decoding=settings)


def chat_loop(model_dir: str | os.PathLike, template: str | None = None, max_new_tokens: int | None = None,
              temperature: float | None = None, seed: int = 0, system: str | None = None,
              stdin: IO[str] | None = None, stdout: IO[str] | None = None,
              decoding: dict[str, Any] | None = None) -> list[dict]:
    """``ctrltok chat``: an interactive conversation with a checkpoint on stdin/stdout; decoding as
    in :func:`generate_file`, said in the first line."""
    model, tokenizer, saved = load_for_generation(model_dir)
    settings = model_decoding(model, decoding, max_new_tokens=max_new_tokens, temperature=temperature)
    stdout = stdout or sys.stdout
    template = template or saved
    stdout.write(f"chatting with {model_dir} (template {template!r}; {describe_decoding(settings)}); "
                 "/exit or Ctrl-D ends, /reset clears\n")
    return chat_session(model, tokenizer, template, stdin or sys.stdin, stdout, seed=seed, system=system,
                        decoding=settings)
