"""Generation from a ctrltok checkpoint: one call for a batch of conversations, a JSONL batch mode
and an interactive chat (``ctrltok generate`` / ``ctrltok chat``).

    model, tokenizer, template = load_for_generation("runs/eot")      # template from ctrltok.json
    out = generate(model, tokenizer, [[{"role": "user", "content": "Hi"}]], template)
    out[0]["text"], out[0]["stopped"]

What it guarantees:

* **Injection-safe prompts.** Prompt ids come from :func:`ctrltok.core.chat.render_prompt`'s encoder:
  only the template's markup becomes control ids; a user who types ``<EOT>`` gets ordinary text
  tokens. Ids go to ``model.generate`` as they are; no rendered string is ever re-tokenised.
* **Stops and blocks come from the checkpoint.** The model's ``generation_config`` is the base:
  generation stops at its ``eos_token_id`` list (plus the template's end-of-turn token, in case a
  model was not prepared by ctrltok) and its ``suppress_tokens`` (blocked control tokens, filler
  rows) get ``-inf`` logits from transformers' own processor, so they are never emitted.
* **Batched == one at a time.** Prompts are sorted by length and left-padded; transformers derives
  positions from the attention mask, so greedy batched output equals one-prompt-at-a-time output
  (tested)::

      row 0   .  .  a  b  c | g g g      attention_mask 0 0 1 1 1 | 1 1 1
      row 1   d  e  f  g  h | g g g      attention_mask 1 1 1 1 1 | 1 1 1

Each result is ``{"text", "ids", "stopped", "n_tokens"}``: ``ids`` are the generated ids up to and
including the stop id, ``text`` decodes them without the stop id (other special tokens are kept,
so a model that writes control markup shows it), ``stopped`` says a stop id came within
``max_new_tokens``.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import IO, Any

import torch

from ctrltok.core.chat import get_encoder, validate_messages
from ctrltok.core.records import RecordError
from ctrltok.core.templates import get_template

MANIFEST = "ctrltok.json"  # the same file train.save_final writes
DEFAULT_TEMPLATE = "default"


def checkpoint_template(model_dir: str | os.PathLike) -> str:
    """The template a checkpoint was trained with (``ctrltok.json``), else ``default``."""
    path = Path(model_dir) / MANIFEST
    if not path.exists():
        return DEFAULT_TEMPLATE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); pass --template explicitly") from exc
    return manifest.get("template") or DEFAULT_TEMPLATE


def load_for_generation(model_dir: str | os.PathLike, dtype: str = "float32",
                        attn: str = "sdpa") -> tuple[Any, Any, str]:
    """``(model, tokenizer, template_name)`` for a checkpoint folder, alias or hub name."""
    from ctrltok.core.models import load_model

    model, tokenizer = load_model(model_dir, dtype=dtype, attn=attn)
    return model, tokenizer, checkpoint_template(model_dir)


def stop_ids(model, tokenizer, template: str) -> list[int]:
    """Ids that end generation: the generation_config's eos ids, then the template's end of turn."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    eot = _token_id(tokenizer, get_template(template, tokenizer).end_of_turn)
    if eot is not None and eot not in ids:
        ids.append(eot)
    return ids


def _token_id(tokenizer, text: str | None) -> int | None:
    if not text:
        return None
    i = tokenizer.convert_tokens_to_ids(text)
    if i is None or (i == tokenizer.unk_token_id and text != tokenizer.unk_token):
        return None
    return int(i)


def prompt_ids(tokenizer, conversations: list[list[dict]], template: str) -> list[list[int]]:
    """Injection-safe prompt ids (conversation + the template's generation prompt), one per conversation."""
    encoder = get_encoder(tokenizer, template)
    sources = [f"conversation {i}" for i in range(len(conversations))]
    return [ex.input_ids for ex in encoder.encode_many(conversations, sources, add_generation_prompt=True)]


class SuppressMask:
    """``-inf`` logits for the ids of ``generation_config.suppress_tokens``, from a mask built once.

    Same effect as transformers' ``SuppressTokensLogitsProcessor``, which this replaces inside
    :func:`generate_ids`: that one calls ``torch.isin(arange(vocab), ids)`` at every step, and on this
    machine (torch 2.13 CPU) ``isin`` over a 49k vocabulary with 63 or more ids costs about 1 s per
    call against about 0.05 s for a mask fill, so a blocked-token list the size of EPE's or the
    filler padding dominated the time per generated token. The saved checkpoint keeps
    ``suppress_tokens``, so plain ``transformers`` still never emits them (tested as well).
    """

    def __init__(self, ids: list[int]):
        self.ids = torch.tensor(sorted(set(ids)), dtype=torch.long)
        self._mask: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._mask is None or self._mask.shape[0] != scores.shape[-1] or self._mask.device != scores.device:
            mask = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
            mask[self.ids[self.ids < scores.shape[-1]].to(scores.device)] = True
            self._mask = mask
        return scores.masked_fill(self._mask, float("-inf"))


def _generation_config(model, tokenizer, stops: list[int], max_new_tokens: int, temperature: float):
    config = copy.deepcopy(model.generation_config)
    config.max_new_tokens = max_new_tokens
    config.max_length = None  # max_new_tokens is the only limit
    config.eos_token_id = stops or None
    config.do_sample = temperature > 0
    if temperature > 0:
        config.temperature = temperature
    else:
        config.temperature = config.top_p = config.top_k = None  # greedy: silence sampling warnings
    config.num_return_sequences = 1
    if config.pad_token_id is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else None)
        if pad is None:
            raise ValueError("the tokenizer has no pad token and the model no eos id; set tokenizer.pad_token")
        config.pad_token_id = int(pad)
    config.return_dict_in_generate = False
    return config


def generate_ids(model, tokenizer, prompts: list[list[int]], template: str, max_new_tokens: int = 128,
                 temperature: float = 0.0, seed: int = 0, batch_size: int = 8) -> list[dict]:
    """Like :func:`generate`, for prompts that are already ids."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for i, ids in enumerate(prompts):
        if not ids:
            raise ValueError(f"prompt {i} has no tokens")
    stops = stop_ids(model, tokenizer, template)
    config = _generation_config(model, tokenizer, stops, max_new_tokens, temperature)
    stop_set = set(stops)
    from transformers import LogitsProcessorList

    processors = LogitsProcessorList()
    if config.suppress_tokens:
        processors.append(SuppressMask(list(config.suppress_tokens)))
        # Not None: generate() fills None fields from model.generation_config, which would bring
        # the slow processor back.
        config.suppress_tokens = []
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
    results: list[dict | None] = [None] * len(prompts)
    device = next(model.parameters()).device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode():
        torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            width = max(len(prompts[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), config.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                n = len(prompts[i])
                input_ids[row, width - n:] = torch.tensor(prompts[i], dtype=torch.long)
                mask[row, width - n:] = 1
            out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                 generation_config=config, logits_processor=processors)
            for row, i in enumerate(chunk):
                results[i] = _result(out[row, width:].tolist(), stop_set, tokenizer)
    return results  # type: ignore[return-value]


def _result(generated: list[int], stops: set[int], tokenizer) -> dict:
    end = next((k for k, t in enumerate(generated) if t in stops), None)
    ids = generated if end is None else generated[:end + 1]
    body = ids if end is None else ids[:-1]
    return {"text": tokenizer.decode(body, skip_special_tokens=False), "ids": ids,
            "stopped": end is not None, "n_tokens": len(ids)}


def generate(model, tokenizer, conversations: list[list[dict]], template: str, max_new_tokens: int = 128,
             temperature: float = 0.0, seed: int = 0, batch_size: int = 8) -> list[dict]:
    """Reply to each conversation; ``[{"text", "ids", "stopped", "n_tokens"}]`` in input order."""
    if conversations and isinstance(conversations[0], dict):
        raise TypeError("conversations must be a list of conversations (lists of messages), not one conversation")
    prompts = prompt_ids(tokenizer, conversations, template)
    return generate_ids(model, tokenizer, prompts, template, max_new_tokens, temperature, seed, batch_size)


# -- batch mode ----------------------------------------------------------------------------
def _conversation(rec: dict, where: str) -> list[dict]:
    if "messages" in rec:
        return validate_messages(rec["messages"], where)
    if isinstance(rec.get("prompt"), str):
        msgs = [{"role": "user", "content": rec["prompt"]}]
        if isinstance(rec.get("system"), str):
            msgs.insert(0, {"role": "system", "content": rec["system"]})
        return msgs
    raise RecordError(f"{where}: expected a field `messages` (a list of messages) or `prompt` (a string); "
                     f"found fields {sorted(rec)}")


def generate_file(model_dir: str | os.PathLike, input_jsonl: str | os.PathLike, out_jsonl: str | os.PathLike,
                  template: str | None = None, max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0,
                  batch_size: int = 8) -> int:
    """Reply to every line of ``input_jsonl`` (``{"messages": [...]}`` or ``{"prompt": "..."}``).

    Each output line is the input record plus ``output`` (the text), ``output_ids``, ``stopped`` and
    ``n_tokens``, in input order, written batch by batch. Returns the number of lines written.
    """
    from ctrltok.core.records import read_records  # noqa: F811

    model, tokenizer, saved = load_for_generation(model_dir)
    template = template or saved
    records = list(read_records(str(input_jsonl)))
    convs = [_conversation(rec, where) for where, rec in records]
    out_path = Path(out_jsonl)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    written = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for start in range(0, len(convs), batch_size):
            outs = generate(model, tokenizer, convs[start:start + batch_size], template, max_new_tokens,
                            temperature, seed + start, batch_size)
            for (_, rec), res in zip(records[start:start + batch_size], outs):
                line = {**rec, "output": res["text"], "output_ids": res["ids"], "stopped": res["stopped"],
                        "n_tokens": res["n_tokens"]}
                fh.write(json.dumps(line, ensure_ascii=False) + "\n")
                written += 1
            fh.flush()
    os.replace(tmp, out_path)  # a half-written file never looks finished
    return written


def generate_prompts(model_dir: str | os.PathLike, prompts: list[str], template: str | None = None,
                     max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0,
                     batch_size: int = 8) -> list[dict]:
    """``ctrltok generate --prompt TEXT``: each prompt as one user message."""
    model, tokenizer, saved = load_for_generation(model_dir)
    convs = [[{"role": "user", "content": p}] for p in prompts]
    return generate(model, tokenizer, convs, template or saved, max_new_tokens, temperature, seed, batch_size)


# -- interactive ---------------------------------------------------------------------------
EXIT_COMMANDS = ("/exit", "/quit")


def chat_session(model, tokenizer, template: str, stdin: IO[str], stdout: IO[str], max_new_tokens: int = 256,
                 temperature: float = 0.0, seed: int = 0, system: str | None = None) -> list[dict]:
    """Read user lines from ``stdin``, print replies to ``stdout``, keep the history; returns it.

    Ends on EOF or ``/exit``. ``/reset`` clears the history. A reply cut off by ``max_new_tokens``
    is marked ``[...]`` so the user knows it did not end its turn.
    """
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    turn = 0
    while True:
        stdout.write("> ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            stdout.write("\n")
            break
        text = line.rstrip("\n")
        if text.strip() in EXIT_COMMANDS:
            break
        if text.strip() == "/reset":
            history = history[:1] if system else []
            stdout.write("(history cleared)\n")
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        res = generate(model, tokenizer, [history], template, max_new_tokens, temperature, seed + turn, 1)[0]
        turn += 1
        history.append({"role": "assistant", "content": res["text"]})
        stdout.write(res["text"] + ("" if res["stopped"] else " [...]") + "\n")
        stdout.flush()
    return history


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
