"""Backtranslation's LLM stages, each a generator over :class:`Pair` records that yields every
input once, kept or with ``drop`` set to a reason (the shape :mod:`ctrltok.core.stages` runs)::

    augment  (M_yx)  the backward model writes the instruction each candidate answers
    rewrite  (M0)    the seed model rewrites the answer for that instruction (seed 003)
    curate   (M0/Mi) the curator scores the pair 1-5, ``curation_samples`` times (or once, as the
                     expected value of its next-token probabilities of the digits; or by its
                     likelihood of the response given the instruction, or by how much the
                     instruction raises that likelihood: pmi)
    select           pairs scoring at least ``keep_score`` are kept (or the best ``keep_fraction``)

Models are reached through one :class:`ChatModel` (rendering + a ``complete(prompts, sampling)``
backend), so tests run every stage with fakes. The curation parser is strict: the last non-empty
line must be ``Score: N`` (N whole, or between points: 4.5). Anything else is a parse failure, a
number outside 1-5 is counted apart, and the report shows both rates.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from ctrltok.backtranslate.pairs import SCORES, Pair, on_scale
from ctrltok.backtranslate.segment import normalise
from ctrltok.core.config import LIKELIHOOD_SCORINGS, BacktranslateConfig, ConfigError
from ctrltok.core.records import RecordError, resource_path
from ctrltok.generation.completion import Backend, Prompt, Sampling

Message = dict[str, str]


@dataclass
class ChatModel:
    """A backend plus the chat rendering of its model: conversations in, completions out.

    ``render`` turns a conversation into a prompt ending in the assistant's generation prompt:
    token ids (the default factory: injection-safe, so a document that spells ``<|im_end|>`` stays
    text) or a string (tests' fakes). ``encode_text`` encodes an answer prefix as plain text, for
    id prompts.
    """

    backend: Backend
    render: Callable[[list[Message]], Prompt]
    encode_text: Callable[[str], list[int]] | None = None

    def prompt(self, conversation: list[Message], answer_prefix: str = "") -> Prompt:
        rendered = self.render(conversation)
        if not answer_prefix:
            return rendered
        if isinstance(rendered, str):
            return rendered + answer_prefix
        if self.encode_text is None:
            raise ValueError("an answer prefix on id prompts needs ChatModel.encode_text")
        return list(rendered) + self.encode_text(answer_prefix)

    def chat(self, conversations: list[list[Message]], sampling: Sampling, answer_prefix: str = "") -> list[str]:
        """Completions of each conversation; ``answer_prefix`` is written at the start of the
        assistant's reply (a prefill) and is not part of the returned text."""
        outs = self.backend.complete([self.prompt(c, answer_prefix) for c in conversations], sampling)
        want = len(conversations) * max(1, sampling.n)
        if len(outs) != want:  # a backend bug would otherwise shift every later record
            raise RuntimeError(f"backend returned {len(outs)} completions for {want} requested")
        return outs

    def next_token_choices(self, conversations: list[list[Message]], answer_prefix: str,
                           choices: list[str]) -> list[list[float]]:
        """For each conversation, the log-probability that the assistant, having written
        ``answer_prefix``, writes each of ``choices`` next (``[" 1", ..., " 5"]``). The choices may
        share leading tokens (a space); after those each must be one token, so that one forward
        pass reads them all. Needs id prompts and a backend with ``next_token_logprobs``."""
        if self.encode_text is None:
            raise ValueError("next_token_choices needs id prompts (ChatModel.encode_text)")
        if not hasattr(self.backend, "next_token_logprobs"):
            raise ValueError(f"{type(self.backend).__name__} gives no next-token probabilities "
                             "(backtranslate.curation_scoring: expected); use curation_scoring: generated")
        encoded = [self.encode_text(answer_prefix + c) for c in choices]
        shared = 0
        while all(len(e) > shared for e in encoded) and len({e[shared] for e in encoded}) == 1:
            shared += 1
        tails = [e[shared:] for e in encoded]
        base = self.encode_text(answer_prefix)
        if any(len(t) != 1 for t in tails) or len({t[0] for t in tails}) != len(tails) or encoded[0][:len(base)] != base:
            raise ValueError(f"after the prefix {answer_prefix!r} the choices {choices} are not one distinct token "
                             "each in this tokenizer; backtranslate.curation_scoring: expected cannot read them")
        prompts = [list(self.render(c)) + encoded[0][:shared] for c in conversations]
        out = self.backend.next_token_logprobs(prompts, [t[0] for t in tails])
        if len(out) != len(conversations):
            raise RuntimeError(f"backend returned {len(out)} rows for {len(conversations)} prompts")
        return out

    def answer_logprobs(self, conversations: list[list[Message]], answers: list[str]) -> list[list[float]]:
        """For each conversation, the log-probability of each token of ``answers[i]`` as the
        assistant's reply to it (the answer encoded as plain text, so it never becomes a control
        token). Needs id prompts and a backend with ``continuation_logprobs``."""
        if self.encode_text is None:
            raise ValueError("answer_logprobs needs id prompts (ChatModel.encode_text)")
        if not hasattr(self.backend, "continuation_logprobs"):
            raise ValueError(f"{type(self.backend).__name__} gives no token probabilities "
                             "(backtranslate.curation_scoring: likelihood); use curation_scoring: generated")
        out = self.backend.continuation_logprobs([list(self.render(c)) for c in conversations],
                                                 [self.encode_text(a) for a in answers])
        if len(out) != len(conversations):
            raise RuntimeError(f"backend returned {len(out)} rows for {len(conversations)} prompts")
        return out


# --------------------------------------------------------------------------- prompts


def load_text(ref: str, key: str) -> str:
    """A prompt: ``ctrltok:<file>`` (package data under ctrltok/resources) or a path."""
    if ref.startswith("ctrltok:"):
        try:
            target = resource_path(ref.split(":", 1)[1])
        except RecordError:
            raise ConfigError(f"backtranslate.{key} = {ref!r}: no such resource in ctrltok/resources") from None
        return target.read_text(encoding="utf-8").strip()
    path = Path(ref).expanduser()
    if not path.is_file():
        raise ConfigError(f"backtranslate.{key} = {ref!r}: no such file")
    return path.read_text(encoding="utf-8").strip()


def fill(template: str, key: str, **values: str) -> str:
    """Fill ``{name}`` placeholders; plain replace, since responses are full of braces."""
    for name, value in values.items():
        if "{" + name + "}" not in template:
            raise ConfigError(f"backtranslate.{key}: the prompt has no {{{name}}} placeholder")
    out = template
    for name, value in values.items():
        out = out.replace("{" + name + "}", value)
    return out


# --------------------------------------------------------------------------- augment, rewrite


def _batches(items: Iterable[Pair], size: int) -> Iterator[list[Pair]]:
    batch: list[Pair] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


_LABEL = re.compile(r"^\s*(?:\*\*|#+\s*)?(?:instruction|user|question|prompt|query|request|human)"
                    r"(?:\*\*)?\s*:\s*(?:\*\*)?\s*", re.I)
_QUOTES = ('""', "''", "``", "\u201c\u201d")


def clean_instruction(raw: str, response: str, cfg: BacktranslateConfig) -> tuple[str, str | None]:
    """Strict cleanup of M_yx's output: trim, drop one leading role label and wrapping quotes.
    Returns ``(instruction, drop reason or None)``."""
    text = _LABEL.sub("", raw.strip(), count=1).strip()
    if len(text) >= 2 and text[0] + text[-1] in _QUOTES:
        text = text[1:-1].strip()
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(line.rstrip() for line in text.splitlines()))
    if len(text) < cfg.min_instruction_chars or not any(c.isalpha() for c in text):
        return text, "instruction_empty"
    if len(text) > cfg.max_instruction_chars:
        return text, "instruction_too_long"
    norm = normalise(text)
    if len(norm) >= 20 and norm in normalise(response):
        return text, "instruction_copies_response"  # the backward model echoed the answer
    return text, None


def augment(pairs: Iterable[Pair], model: ChatModel, cfg: BacktranslateConfig, seed: int = 0) -> Iterator[Pair]:
    """M_yx writes the instruction each candidate answers (prompt: its system prompt + the response)."""
    system = load_text(cfg.backward_system, "backward_system")
    sampling = Sampling(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                        n=1, seed=seed)
    for batch in _batches(pairs, cfg.batch_size):
        convs = [[{"role": "system", "content": system}, {"role": "user", "content": p.response}] for p in batch]
        for pair, raw in zip(batch, model.chat(convs, sampling)):
            instruction, reason = clean_instruction(raw, pair.response, cfg)
            yield replace(pair, instruction=instruction, drop=reason)


_PREFACE = re.compile(r"^(?:sure|certainly|here(?:'s| is| are)|rewritten)[^\n]{0,100}:[ \t]*\n", re.I)


def clean_rewrite(raw: str) -> str:
    """Trim and remove a one-line preface ("Here is the rewritten answer:") the prompt asked not for."""
    return _PREFACE.sub("", raw.strip(), count=1).strip()


def distinct_ngrams(text: str, n: int = 4) -> float:
    """Share of distinct word n-grams; 1.0 for text that never repeats itself."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


# The share of distinct 4-grams under which a rewrite is a loop: prose rarely repeats itself, a
# small model stuck in a loop does. Curation should catch loops too, but a small curator rarely
# does, and a loop is never a good answer.
MIN_DISTINCT_NGRAMS = 0.7


def rewrite_issue(text: str) -> str | None:
    """Why a cleaned rewrite is unusable, or None."""
    if sum(c.isalpha() for c in text) < 20:
        return "rewrite_empty"
    if "Draft answer:" in text or "Instruction:\n" in text:
        return "rewrite_echoes_prompt"  # the model copied the prompt's scaffolding
    if distinct_ngrams(text) < MIN_DISTINCT_NGRAMS:
        return "rewrite_repetitive"
    return None


def rewrite(pairs: Iterable[Pair], model: ChatModel, cfg: BacktranslateConfig, seed: int = 0) -> Iterator[Pair]:
    """The seed model rewrites each response for its instruction; the segment stays in
    ``original_response``. An unusable rewrite (:func:`rewrite_issue`) is dropped with its reason,
    not silently replaced by the original."""
    prompt = load_text(cfg.rewrite_prompt, "rewrite_prompt")
    sampling = Sampling(max_new_tokens=cfg.rewrite_max_new_tokens, temperature=cfg.rewrite_temperature,
                        top_p=cfg.top_p, n=1, seed=seed)
    for batch in _batches(pairs, cfg.batch_size):
        convs = [[{"role": "user", "content": fill(prompt, "rewrite_prompt", instruction=p.instruction,
                                                   response=p.response)}] for p in batch]
        for pair, raw in zip(batch, model.chat(convs, sampling)):
            text = clean_rewrite(raw)
            reason = rewrite_issue(text)
            yield replace(pair, response=text if reason is None else pair.response,
                          original_response=pair.response, drop=reason)


# --------------------------------------------------------------------------- curate, select

_SCORE = re.compile(r"Score:[ \t]*([0-9]{1,9}(?:\.[0-9]{1,3})?)")


def parse_score(text: str) -> float | None:
    """The strict parser: the last non-empty line, stripped, must be exactly ``Score: N``, N a whole
    number or a decimal ("Score: 4.5": a rating between points, which a small curator writes as its
    whole answer, not a cut-off one; bench/README "outcomes").

    Returns N (an int when whole; it may be outside 1..5: the caller counts that apart) or None.
    "Score: 4/5", "**Score: 4**", "score: 4", "Score: 4." and a score followed by more text all fail."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return None
    match = _SCORE.fullmatch(lines[-1])
    if not match:
        return None
    value = float(match.group(1))
    return int(value) if value.is_integer() else value


def aggregate(scores: list[float | None], how: str) -> float | None:
    valid = [s for s in scores if on_scale(s)]
    if not valid:
        return None
    return float(statistics.median(valid)) if how == "median" else sum(valid) / len(valid)


def curate(pairs: Iterable[Pair], model: ChatModel, cfg: BacktranslateConfig, seed: int = 0) -> Iterator[Pair]:
    """The curator scores each pair ``curation_samples`` times; the score is the median (or mean,
    ``score_aggregate``) of the samples that parsed to 1..5. A pair with none is dropped as
    ``score_unparsed`` (or ``score_out_of_range`` when every failing sample was a number outside 1..5).
    With ``curation_scoring: expected`` see :func:`curate_expected`, with ``likelihood`` or ``pmi``
    :func:`curate_likelihood`."""
    if cfg.curation_scoring == "expected":
        yield from curate_expected(pairs, model, cfg)
        return
    if cfg.curation_scoring in LIKELIHOOD_SCORINGS:
        yield from curate_likelihood(pairs, model, cfg)
        return
    prompt = load_text(cfg.curation_prompt, "curation_prompt")
    n = cfg.curation_samples
    sampling = Sampling(max_new_tokens=cfg.curation_max_new_tokens, temperature=cfg.curation_temperature,
                        top_p=cfg.top_p, n=n, seed=seed)
    for batch in _batches(pairs, cfg.batch_size):
        convs = [[{"role": "user", "content": fill(prompt, "curation_prompt", instruction=p.instruction,
                                                   response=p.response)}] for p in batch]
        prefix = cfg.curation_answer_prefix
        outs = model.chat(convs, sampling, answer_prefix=prefix)
        if prefix:
            # Prefilled: the reply starts with the prefix; its first line must complete the strict form.
            outs = [prefix + (o.split("\n", 1)[0]) for o in outs]
        for i, pair in enumerate(batch):
            raw = outs[i * n:(i + 1) * n]  # prompt-major
            scores = [parse_score(t) for t in raw]
            score = aggregate(scores, cfg.score_aggregate)
            reason = None
            if score is None:
                reason = "score_unparsed" if any(s is None for s in scores) else "score_out_of_range"
            yield replace(pair, curator_outputs=raw, scores=scores, score=score, drop=reason)


def curate_expected(pairs: Iterable[Pair], model: ChatModel, cfg: BacktranslateConfig) -> Iterator[Pair]:
    """The expected score: the reply is prefilled with ``curation_answer_prefix`` and the curator's
    next-token probabilities of the digits 1..5 are read in one forward pass; the score is
    ``sum(k * p(k)) / sum(p(k))``. Nothing is parsed, so nothing fails to parse; ``scores`` holds the
    most likely digit (the greedy answer, for the histogram) and ``score_probs`` the five
    probabilities, whose sum says how sure the curator was that a digit comes next."""
    prompt = load_text(cfg.curation_prompt, "curation_prompt")
    prefix = cfg.curation_answer_prefix
    digits = [("" if prefix[-1].isspace() else " ") + str(k) for k in SCORES]
    for batch in _batches(pairs, cfg.batch_size):
        convs = [[{"role": "user", "content": fill(prompt, "curation_prompt", instruction=p.instruction,
                                                   response=p.response)}] for p in batch]
        for pair, logps in zip(batch, model.next_token_choices(convs, prefix, digits), strict=True):
            probs = [math.exp(lp) for lp in logps]
            mass = sum(probs)
            best = max(range(len(SCORES)), key=lambda j: probs[j])
            score = sum(k * q for k, q in zip(SCORES, probs)) / mass if mass > 0 else None
            yield replace(pair, curator_outputs=[prefix + digits[best]], scores=[SCORES[best]],
                          score=None if score is None else round(score, 6), score_probs=[round(q, 6) for q in probs],
                          drop=None if score is not None else "score_unparsed")


def curate_likelihood(pairs: Iterable[Pair], model: ChatModel, cfg: BacktranslateConfig) -> Iterator[Pair]:
    """The likelihood score: the curator's mean log-probability per token (nats) of the response
    as its own reply to the instruction, asked as a plain user turn in its chat template; one
    forward pass per batch, nothing generated or parsed. It measures how far the pair is from what
    the curator, an instruction-following model, would answer to that instruction (perplexity
    filtering, scored by the seed model); ``keep_fraction`` keeps the most likely share. The scale
    is nats, not 1..5, so ``scores`` stays empty and ``keep_score`` does not apply.

    ``curation_scoring: pmi`` subtracts the same mean for the response as the reply to an empty user
    turn (a second forward pass): the pointwise mutual information of instruction and response per
    token, high where the instruction predicts its response. Likelihood alone ranks repetitive text
    first, which the empty turn predicts just as well (figures: bench/README "outcomes")."""
    for batch in _batches(pairs, cfg.batch_size):
        answers = [p.response for p in batch]
        rows = model.answer_logprobs([[{"role": "user", "content": p.instruction}] for p in batch], answers)
        priors = (model.answer_logprobs([[{"role": "user", "content": ""}] for _ in batch], answers)
                  if cfg.curation_scoring == "pmi" else [None] * len(batch))
        for pair, logps, prior in zip(batch, rows, priors, strict=True):
            score = sum(logps) / len(logps) - (sum(prior) / len(prior) if prior else 0.0) if logps else None
            yield replace(pair, score=None if score is None else round(score, 6),
                          drop=None if score is not None else "score_unparsed")


def keep_threshold(scores: Iterable[float], cfg: BacktranslateConfig) -> float:
    """The score a pair needs to be kept: ``keep_score``, or with ``keep_fraction`` the score of the
    pair at that rank among ``scores`` (best first), so that fraction is kept (more where scores tie)."""
    if cfg.keep_fraction is None:
        return cfg.keep_score
    ranked = sorted(scores, reverse=True)
    if not ranked:
        return cfg.keep_score  # nothing to keep either way
    return ranked[max(1, round(cfg.keep_fraction * len(ranked))) - 1]


def select(pairs: Iterable[Pair], keep_score: float) -> Iterator[Pair]:
    for pair in pairs:
        yield replace(pair, drop=None if pair.score is not None and pair.score >= keep_score else "score_below_keep")
