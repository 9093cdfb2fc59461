"""The one batched generator, and replies to conversations from a ctrltok checkpoint.

:func:`generate_batch` is the only code in ctrltok that calls ``model.generate``: token-id prompts
in, generated ids out. The conversation API below (:func:`generate`, :func:`chat_session`, used by
``ctrltok generate`` / ``ctrltok chat`` and held-out evaluation), the LLM backend
(:class:`ctrltok.generation.completion.TransformersBackend`) and the conditional evaluation
(:func:`ctrltok.evaluation.conditional.conditional_eval`) all call it.

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
  rows), together with any ids the caller adds, get ``-inf`` logits, so they are never emitted.
* **Decoding is the recipe's.** ``training.setup.prepare_model`` writes a recipe's ``decoding``
  section into the generation_config, so ``generation_config.json`` carries it; the conversation
  API starts from it and the caller's values override it, both through
  :func:`ctrltok.core.decoding.resolve_decoding`, the one resolver (the commands and evaluation
  use it too). :func:`generation_config` is the one place settings become the
  ``GenerationConfig`` that ``model.generate`` gets.
* **Batched == one at a time.** Prompts are sorted by length (longest first, so similar lengths
  share a batch and memory peaks early) and left-padded; transformers derives positions from the
  attention mask, so greedy batched output equals one-prompt-at-a-time output (tested)::

      row 0   .  .  a  b  c | g g g      attention_mask 0 0 1 1 1 | 1 1 1
      row 1   d  e  f  g  h | g g g      attention_mask 1 1 1 1 1 | 1 1 1

  With ``share_prefix`` the prompts' common prefix (a template's system turn) is encoded once per
  batch and its KV cache shared by every row: ``[shared prefix | left padding | rest]``.
* **Seeded, and the caller's RNG left alone.** Sampling draws from a forked RNG seeded with
  ``seed``: the same prompts, settings and batch size give the same ids.

Each :func:`generate` result is ``{"text", "ids", "stopped", "n_tokens"}``: ``ids`` are the
generated ids up to and including the stop id, ``text`` decodes them without the stop id (other
special tokens are kept, so a model that writes control markup shows it), ``stopped`` says a stop
id came within ``max_new_tokens``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from typing import IO, Any

import torch
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteriaList,
)

from ctrltok.core.chat import get_encoder
from ctrltok.core.config import DecodingConfig
from ctrltok.core.decoding import check_knobs, decoding_kwargs, resolve_decoding
from ctrltok.core.models import load_model
from ctrltok.core.templates import get_template
from ctrltok.training.checkpoint import RunManifest

MIN_SHARED_PREFIX = 4  # tokens; below this the extra forward call for a shared prefix costs more than it saves


def load_for_generation(model_dir: str | os.PathLike, dtype: str = "float32",
                        attn: str = "sdpa") -> tuple[Any, Any, str]:
    """``(model, tokenizer, template_name)`` for a checkpoint folder, alias or hub name; the
    template is the one the run manifest names (``default`` without one)."""
    model, tokenizer = load_model(model_dir, dtype=dtype, attn=attn)
    return model, tokenizer, RunManifest.read(model_dir).template


def eos_ids(generation_config: Any, tokenizer: Any = None) -> list[int]:
    """The generation_config's eos ids (the tokenizer's eos when it names none), in order."""
    eos = generation_config.eos_token_id
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return list(dict.fromkeys(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])))


def stop_ids(model, tokenizer, template: str) -> list[int]:
    """Ids that end generation: the generation_config's eos ids, then the template's end of turn."""
    ids = eos_ids(model.generation_config, tokenizer)
    eot = get_template(template, tokenizer).end_of_turn_id(tokenizer)
    if eot is not None and eot not in ids:
        ids.append(eot)
    return ids


def prompt_ids(tokenizer, conversations: list[list[dict]], template: str) -> list[list[int]]:
    """Injection-safe prompt ids (conversation + the template's generation prompt), one per conversation."""
    encoder = get_encoder(tokenizer, template)
    sources = [f"conversation {i}" for i in range(len(conversations))]
    return [ex.input_ids for ex in encoder.encode_many(conversations, sources, add_generation_prompt=True)]


class SuppressMask:
    """``-inf`` logits for a set of ids, from a mask built once.

    Same effect as transformers' ``SuppressTokensLogitsProcessor``, which :func:`generate_batch`
    replaces with it: that one calls ``torch.isin(arange(vocab), ids)`` at every step, which is far
    slower than a mask fill for a blocked-token list the size of EPE's or the filler padding, and
    dominated the time per generated token. Like the built-in one it runs before temperature,
    top-k and top-p. The saved checkpoint keeps ``suppress_tokens``, so plain ``transformers``
    still never emits them (tested as well).
    """

    def __init__(self, ids: Sequence[int]):
        self.ids = torch.tensor(sorted(set(ids)), dtype=torch.long)
        self._mask: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._mask is None or self._mask.shape[0] != scores.shape[-1] or self._mask.device != scores.device:
            mask = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
            mask[self.ids[self.ids < scores.shape[-1]].to(scores.device)] = True
            self._mask = mask
        return scores.masked_fill(self._mask, float("-inf"))


class StopStrings:
    """Stopping criterion: a row is done once its *generated* text contains a stop string.

    transformers' own ``stop_strings`` also matches across the prompt/generation boundary; callers
    want "the answer contains the stop string", so only generated tokens are decoded (with
    ``decode``). It records, per row, how many tokens had been generated when it fired.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str], prompt_len: int) -> None:
        self.decode = decode
        self.stop = list(stop)
        self.prompt_len = prompt_len
        self.fired_at: dict[int, int] = {}

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for row, ids in enumerate(input_ids[:, self.prompt_len:].tolist()):
            if row in self.fired_at:
                done[row] = True
                continue
            text = self.decode(ids)
            if any(s in text for s in self.stop):
                self.fired_at[row] = len(ids)
                done[row] = True
        return done


class GeneratedRepetitionPenalty:
    """The repetition penalty as LIMA describes it: on previously *generated* tokens, never on a
    stop id.

    transformers' built-in penalty (CTRL's) counts every id in the sequence, the prompt's included.
    A template that closes the user's turn with the token the reply must end with (LIMA's ``<EOT>``,
    after every turn) then has its stop decision penalised in every reply, and a model that
    learned to end with ``<EOT>`` ends with its old end-of-sequence token instead, or runs on
    (bench/README "outcomes"). Here ids of the prompt (the first ``prompt_length`` columns) are not
    counted and stop ids keep their logits; every other id is penalised exactly as transformers
    does. :func:`generate_batch` uses it in place of the built-in processor, at its place in the
    order (before temperature, top-k and top-p). The saved checkpoint keeps ``repetition_penalty``,
    so plain transformers still penalises the prompt's ids (README, "Decoding").
    """

    def __init__(self, penalty: float, stops: Sequence[int], prompt_length: int):
        self.inner = RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=prompt_length)
        self.stops = torch.tensor(sorted(set(stops)), dtype=torch.long)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        stops = self.stops[self.stops < scores.shape[-1]].to(scores.device)
        kept = scores.index_select(-1, stops)
        return self.inner(input_ids, scores).index_copy(-1, stops, kept)


def generation_config(model, *, max_new_tokens: int, temperature: float, top_p: float | None, n: int,
                      stops: Sequence[int], pad_id: int | None, top_k: int | None = None,
                      repetition_penalty: float | None = None, no_repeat_ngram_size: int | None = None) -> Any:
    """The model's generation_config with these settings on top: the one place settings become the
    ``GenerationConfig`` that ``model.generate`` gets. ``None`` keeps the model's value (for
    ``top_p``, ``top_k``, ``repetition_penalty``, ``no_repeat_ngram_size``); ``top_k == 0`` is no
    top-k filtering.

    Greedy decoding (``temperature == 0``) generates one sequence per prompt whatever ``n``; the
    sampling knobs are cleared so transformers does not warn about them; a repetition penalty and
    a no-repeat n-gram size apply to greedy decoding too. The pad id is the config's, else
    ``pad_id``, else the first stop id; it fills left padding (masked out) and the rows that
    stopped early (cut off again).
    """
    config = copy.deepcopy(model.generation_config)
    config.max_new_tokens = max_new_tokens
    config.max_length = None  # max_new_tokens is the only length limit
    config.eos_token_id = list(stops) or None
    config.do_sample = temperature > 0
    if temperature > 0:
        config.temperature = temperature
        if top_p is not None:
            config.top_p = top_p
        if top_k is not None:
            config.top_k = top_k
        config.num_return_sequences = n
    else:
        config.temperature = config.top_p = config.top_k = None
        config.num_return_sequences = 1
    if repetition_penalty is not None:
        config.repetition_penalty = repetition_penalty
    if no_repeat_ngram_size is not None:
        config.no_repeat_ngram_size = no_repeat_ngram_size
    if config.pad_token_id is None:
        pad = pad_id if pad_id is not None else (stops[0] if stops else None)
        if pad is None:
            raise ValueError("the tokenizer has no pad token and the model no eos id; set tokenizer.pad_token")
        config.pad_token_id = int(pad)
    config.return_dict_in_generate = False
    return config


def shared_prefix_cache(model, batch: list[list[int]], copies: int = 1,
                        min_shared: int = MIN_SHARED_PREFIX) -> tuple[Any, int]:
    """KV cache of the prompts' common prefix (the chat template's system turn), computed once.

    Rendered prompts usually start with the same template header; encoding it once and repeating
    its cache for every row (``copies`` sequences per prompt) saves that share of the prefill.
    Positions still come from the attention mask, so the padding that then sits between the
    prefix and the rest is invisible. Returns ``(None, 0)`` when there is nothing worth sharing.
    """
    if len(batch) < 2:
        return None, 0
    shared = 0
    for column in zip(*batch):
        if any(t != column[0] for t in column):
            break
        shared += 1
    shared = min(shared, min(len(ids) for ids in batch) - 1)  # each row keeps a token to feed
    if shared < min_shared:
        return None, 0
    cache = DynamicCache(config=model.config)
    prefix = torch.tensor([batch[0][:shared]], dtype=torch.long, device=_device(model))
    model(input_ids=prefix, past_key_values=cache, use_cache=True, logits_to_keep=1)
    # generate() expands inputs for num_return_sequences but not a given cache: do it here.
    cache.batch_repeat_interleave(len(batch) * copies)
    return cache, shared


def _device(model) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def generate_batch(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 128, temperature: float = 0.0,
                   top_p: float | None = None, top_k: int | None = None, repetition_penalty: float | None = None,
                   no_repeat_ngram_size: int | None = None, n: int = 1, seed: int = 0, batch_size: int = 8,
                   stop_ids: Sequence[int] | None = None, suppress_ids: Sequence[int] = (),
                   pad_id: int | None = None, stop_strings: Sequence[str] = (),
                   decode: Callable[[list[int]], str] | None = None,
                   share_prefix: bool = False) -> list[list[int]]:
    """``n`` continuations of each token-id prompt: new ids only, prompt-major (``n`` of prompt 0,
    then of prompt 1, ...).

    Each continuation runs up to and including its first id in ``stop_ids`` (default: the
    model's ``generation_config.eos_token_id``), or up to the token that completed one of
    ``stop_strings`` in ``decode(ids)`` (then ``decode`` is required), or ``max_new_tokens``.
    ``temperature == 0`` is greedy (one generation per prompt, repeated ``n`` times); otherwise
    sampling at ``temperature``, ``top_p`` and ``top_k`` (0: no top-k). ``repetition_penalty``
    and ``no_repeat_ngram_size`` apply to both. ``None`` keeps the model's generation_config
    value (:func:`ctrltok.core.decoding.decoding_kwargs` gives every value of a recipe's decoding).
    ``suppress_ids`` are blocked on top of the model's ``suppress_tokens``. ``batch_size``
    counts sequences per ``model.generate`` call, samples included: a batch holds
    ``max(1, batch_size // n)`` prompts when sampling. ``pad_id`` is used when the model's
    generation_config names no pad token.
    """
    prompts = [[int(t) for t in ids] for ids in prompts]
    check_knobs(max_new_tokens, temperature, top_p, n, batch_size, top_k, repetition_penalty, no_repeat_ngram_size)
    for i, ids in enumerate(prompts):
        if not ids:
            raise ValueError(f"prompt {i} has no tokens")
    if stop_strings and decode is None:
        raise ValueError("stop_strings need decode= (ids -> text) to be matched")
    if not prompts:
        return []
    stops = [int(i) for i in (eos_ids(model.generation_config) if stop_ids is None else stop_ids)]
    config = generation_config(model, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, n=n,
                               stops=stops, pad_id=pad_id, top_k=top_k, repetition_penalty=repetition_penalty,
                               no_repeat_ngram_size=no_repeat_ngram_size)
    processors = LogitsProcessorList()
    suppress = set(config.suppress_tokens or []) | {int(i) for i in suppress_ids}
    if suppress:
        processors.append(SuppressMask(sorted(suppress)))
    # Not None: generate() fills None fields from model.generation_config, which would bring the
    # slow built-in processor back.
    config.suppress_tokens = []
    penalty = config.repetition_penalty if config.repetition_penalty not in (None, 1.0) else None
    config.repetition_penalty = 1.0  # not None: see suppress_tokens; GeneratedRepetitionPenalty applies it
    greedy = temperature == 0
    per_prompt = 1 if greedy else n
    per_batch = batch_size if greedy else max(1, batch_size // n)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
    results: list[list[list[int]]] = [[] for _ in prompts]
    device = _device(model)
    stop_set = set(stops)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.inference_mode():
        torch.manual_seed(seed)
        for start in range(0, len(order), per_batch):
            chunk = order[start:start + per_batch]
            rows = _generate_rows(model, [prompts[i] for i in chunk], config, processors, stop_set,
                                  stop_strings, decode, share_prefix, device, penalty)
            for j, i in enumerate(chunk):
                got = rows[j * per_prompt:(j + 1) * per_prompt]
                results[i] = [list(got[0]) for _ in range(n)] if greedy else got
    return [ids for group in results for ids in group]


def _generate_rows(model, batch: list[list[int]], config: Any, processors: LogitsProcessorList, stops: set[int],
                   stop_strings: Sequence[str], decode: Callable[[list[int]], str] | None, share_prefix: bool,
                   device: torch.device, penalty: float | None = None) -> list[list[int]]:
    """One ``model.generate`` call: ``[shared prefix | left padding | rest of the prompt]`` per row
    (plain left padding without a shared prefix), each output row cut at its stop; ``penalty``:
    the repetition penalty on the generated ids (:class:`GeneratedRepetitionPenalty`)."""
    cache, shared = (shared_prefix_cache(model, batch, config.num_return_sequences or 1) if share_prefix
                     else (None, 0))
    width = shared + max(len(ids) - shared for ids in batch)
    input_ids = torch.full((len(batch), width), int(config.pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, :shared] = torch.tensor(ids[:shared], dtype=torch.long)
        attention_mask[row, :shared] = 1
        input_ids[row, width - len(ids) + shared:] = torch.tensor(ids[shared:], dtype=torch.long)
        attention_mask[row, width - len(ids) + shared:] = 1
    if penalty is not None:  # every row's prompt fills the first `width` columns
        processors = LogitsProcessorList([*processors, GeneratedRepetitionPenalty(penalty, sorted(stops), width)])
    criteria = StoppingCriteriaList()
    stopper = None
    if stop_strings:
        stopper = StopStrings(decode, stop_strings, width)  # type: ignore[arg-type]
        criteria.append(stopper)
    extra = {"past_key_values": cache} if cache is not None else {}
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                         generation_config=config, logits_processor=processors, stopping_criteria=criteria, **extra)
    return [_cut(generated, stops, stopper.fired_at.get(row) if stopper else None)
            for row, generated in enumerate(out[:, width:].tolist())]


def _cut(generated: list[int], stops: set[int], fired_at: int | None) -> list[int]:
    """Up to and including the first stop id, or up to a stop string that completed before it."""
    end = next((k for k, t in enumerate(generated) if t in stops), None)
    if fired_at is not None and (end is None or fired_at <= end):
        return generated[:fired_at]
    return generated if end is None else generated[:end + 1]


# -- conversations -------------------------------------------------------------------------
def generate_ids(model, tokenizer, prompts: list[list[int]], template: str, max_new_tokens: int | None = None,
                 temperature: float | None = None, seed: int = 0, batch_size: int = 8, *,
                 decoding: DecodingConfig | None = None, share_prefix: bool = False) -> list[dict]:
    """Like :func:`generate`, for prompts that are already ids. The one place replies are built
    (stop ids, text, ``stopped``): ``ctrltok generate`` / ``chat`` and the held-out stop rate
    (:func:`ctrltok.evaluation.evaluate.evaluate_model`, with ``share_prefix``) count stops alike."""
    decoding = resolve_decoding(model, decoding, max_new_tokens=max_new_tokens, temperature=temperature)
    stops = stop_ids(model, tokenizer, template)
    outs = generate_batch(model, prompts, **decoding_kwargs(decoding), seed=seed, batch_size=batch_size,
                          stop_ids=stops, pad_id=tokenizer.pad_token_id, share_prefix=share_prefix)
    stop_set = set(stops)
    return [_result(ids, stop_set, tokenizer) for ids in outs]


def _result(ids: list[int], stops: set[int], tokenizer) -> dict:
    stopped = bool(ids) and ids[-1] in stops
    body = ids[:-1] if stopped else ids
    return {"text": tokenizer.decode(body, skip_special_tokens=False), "ids": ids,
            "stopped": stopped, "n_tokens": len(ids)}


def generate(model, tokenizer, conversations: list[list[dict]], template: str, max_new_tokens: int | None = None,
             temperature: float | None = None, seed: int = 0, batch_size: int = 8, *,
             decoding: DecodingConfig | None = None, share_prefix: bool = False) -> list[dict]:
    """Reply to each conversation; ``[{"text", "ids", "stopped", "n_tokens"}]`` in input order.

    Decoding: ``decoding``, else the model's generation_config (for a ctrltok checkpoint, the
    recipe's ``decoding`` section); ``max_new_tokens`` and ``temperature`` (0: greedy) override it.
    """
    if conversations and isinstance(conversations[0], dict):
        raise TypeError("conversations must be a list of conversations (lists of messages), not one conversation")
    prompts = prompt_ids(tokenizer, conversations, template)
    return generate_ids(model, tokenizer, prompts, template, max_new_tokens, temperature, seed, batch_size,
                        decoding=decoding, share_prefix=share_prefix)


# -- interactive ---------------------------------------------------------------------------
EXIT_COMMANDS = ("/exit", "/quit")


def chat_session(model, tokenizer, template: str, stdin: IO[str], stdout: IO[str], max_new_tokens: int | None = None,
                 temperature: float | None = None, seed: int = 0, system: str | None = None, *,
                 decoding: DecodingConfig | None = None) -> list[dict]:
    """Read user lines from ``stdin``, print replies to ``stdout``, keep the history; returns it.
    Decoding as in :func:`generate`.

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
        res = generate(model, tokenizer, [history], template, max_new_tokens, temperature, seed + turn, 1,
                       decoding=decoding)[0]
        turn += 1
        history.append({"role": "assistant", "content": res["text"]})
        stdout.write(res["text"] + ("" if res["stopped"] else " [...]") + "\n")
        stdout.flush()
    return history
