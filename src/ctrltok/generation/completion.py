"""One LLM interface for every pipeline stage: ``complete(prompts, sampling) -> texts``.

Stages that ask a model for text (backtranslation's augment, rewrite and curate steps, EPE
annotation) take a :class:`Backend`, so tests inject a :class:`FakeBackend` and GPU users get vLLM
without the stages changing. Generation with transformers is one function,
:func:`ctrltok.generation.generate.generate_batch` (the only ``model.generate`` call in ctrltok):
this backend, ``ctrltok generate`` / ``chat``, held-out evaluation and the conditional evaluation
all go through it.

* :class:`TransformersBackend` - :func:`~ctrltok.generation.generate.generate_batch` on CPU or GPU:
  prompts sorted by length (less padding per batch), left-padded (so every row's next token sits
  in the last column and the KV cache is shared by the whole batch), generated, stripped of the
  prompt and put back in input order. The model's ``generation_config`` is the base (its eos ids,
  ``suppress_tokens``, ``bad_words_ids`` stay in force); :class:`Sampling` overrides only what it
  names.
* :class:`VLLMBackend` - the same contract on vLLM, when it is installed (optional dependency).
* :class:`FakeBackend` - a deterministic function of the prompt, for tests.

The two model backends also give ``next_token_logprobs(prompts, token_ids)``: how likely each of a
few tokens is as the next one (backtranslation's expected curation score reads the score digits'
probabilities instead of parsing a generated one), and ``continuation_logprobs(prompts,
continuations)``: the log-probability of each token of a given continuation (its likelihood
curation score).

A prompt is either token ids or a rendered string. Ids are used as they are: that is how stages
pass prompts whose text came from outside (documents, model outputs), encoded by the injection-safe
:func:`ctrltok.core.chat.render_prompt`, so a corpus line that spells ``<|im_end|>`` stays text. A string
is encoded without adding BOS/EOS again, and special-token text in it *is* read as the control token
it spells (the template's own markup): use strings only for text you wrote yourself.

Left padding, for two prompts of 3 and 5 tokens (``.`` = pad, masked out; positions come from the
mask, so the short prompt's first real token still has position 0)::

    row 0   .  .  a  b  c | g g g      attention_mask 0 0 1 1 1 | 1 1 1
    row 1   d  e  f  g  h | g g g      attention_mask 1 1 1 1 1 | 1 1 1

The invariant that proves it right: greedy batched output == greedy one-prompt-at-a-time output.

    >>> backend = TransformersBackend(model, tokenizer)                        # doctest: +SKIP
    >>> backend.complete(["<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n"],
    ...                  Sampling(max_new_tokens=32))                           # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import torch
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ctrltok.core.config import DecodingConfig
from ctrltok.core.decoding import decoding_kwargs, served_decoding
from ctrltok.core.models import load_model, resolve_model
from ctrltok.generation.generate import eos_ids, generate_batch

FINISH_REASONS = ("stop_token", "stop_string", "length")
Prompt = str | Sequence[int]  # rendered text, or token ids used verbatim (see the module docstring)


@dataclass
class Sampling:
    """How to generate. ``temperature == 0`` is greedy; results are flattened prompt-major
    (``n`` samples of prompt 0, then of prompt 1, ...)."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    n: int = 1  # samples per prompt
    seed: int = 0
    stop: list[str] = field(default_factory=list)  # stop strings; the text is cut before the first one
    # None: the model's generation_config (for a ctrltok checkpoint, its recipe's decoding section)
    top_k: int | None = None  # 0 = no top-k filtering
    repetition_penalty: float | None = None  # 1 = none
    no_repeat_ngram_size: int | None = None  # 0 = off

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"Sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"Sampling.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"Sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.n < 1:
            raise ValueError(f"Sampling.n must be >= 1, got {self.n}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"Sampling.top_k must be >= 0 (0 = no top-k), got {self.top_k}")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise ValueError(f"Sampling.repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.no_repeat_ngram_size is not None and self.no_repeat_ngram_size < 0:
            raise ValueError(f"Sampling.no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")
        if isinstance(self.stop, str):  # a bare string would otherwise become a list of characters
            self.stop = [self.stop]
        if any(not s for s in self.stop):
            raise ValueError("Sampling.stop holds an empty string, which would stop before the first token")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_decoding(cls, decoding: DecodingConfig, n: int = 1, seed: int = 0,
                      stop: Sequence[str] = ()) -> Sampling:
        """A recipe's decoding (``ctrltok.core.config.DecodingConfig``) as a request, every value explicit."""
        kw = decoding_kwargs(decoding)
        return cls(max_new_tokens=kw["max_new_tokens"], temperature=kw["temperature"], top_p=kw["top_p"], n=n,
                   seed=seed, stop=list(stop), top_k=kw["top_k"], repetition_penalty=kw["repetition_penalty"],
                   no_repeat_ngram_size=kw["no_repeat_ngram_size"])

    def served(self, config: Any) -> Sampling:
        """This request with each ``None`` field (top-k, repetition penalty, no-repeat n-gram size)
        taken from a ``GenerationConfig``, as transformers would: for a backend that does not
        read the model's generation_config itself (vLLM)."""
        model = served_decoding(config)
        return replace(
            self, top_k=(model.top_k or 0) if self.top_k is None else self.top_k,
            repetition_penalty=model.repetition_penalty if self.repetition_penalty is None else self.repetition_penalty,
            no_repeat_ngram_size=(model.no_repeat_ngram_size if self.no_repeat_ngram_size is None
                                  else self.no_repeat_ngram_size))


@dataclass
class Completion:
    """One generated continuation with the facts evaluation needs (why it ended, its tokens)."""

    text: str
    token_ids: list[int]  # generated ids, up to and including the stop token or the stop string's last token
    finish_reason: str  # one of FINISH_REASONS


@runtime_checkable
class Backend(Protocol):
    def complete(self, prompts: list[Prompt], sampling: Sampling) -> list[str]: ...


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Token ids of each prompt: id lists as given, strings encoded with their markup read as
    control tokens and no BOS/EOS added. Empty prompts are refused (nothing to continue)."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of prompts, not one string")
    texts = [i for i, p in enumerate(prompts) if isinstance(p, str)]
    encoded: list[list[int]] = [[] for _ in prompts]
    if texts:
        ids = tokenizer([prompts[i] for i in texts], add_special_tokens=False, split_special_tokens=False)["input_ids"]
        for i, row in zip(texts, ids):
            encoded[i] = list(row)
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            try:
                encoded[i] = [int(t) for t in p]
            except (TypeError, ValueError) as exc:
                raise TypeError(f"prompt {i} is neither a string nor a sequence of token ids") from exc
        if not encoded[i]:
            raise ValueError(f"prompt {i} encodes to no tokens; a rendered prompt must not be empty")
    return encoded


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to (excluding) the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class TransformersBackend:
    """Batched generation with a Hugging Face causal LM, through
    :func:`ctrltok.generation.generate.generate_batch`.

    ``batch_size`` counts sequences per ``generate`` call, samples included: with ``n`` samples per
    prompt a batch holds ``max(1, batch_size // n)`` prompts. Sampling is seeded: the same prompts,
    ``Sampling`` and ``batch_size`` give the same texts (the global torch RNG is left untouched).
    Decoded texts skip special tokens unless ``skip_special_tokens=False``; the stop token itself
    is never part of the text. With ``share_prefix`` (default) the prompts' common prefix is
    encoded once per batch and its KV cache shared by all rows. ``stop_ids`` replace the model's
    eos ids as the stop tokens (evaluation adds a template's end of turn); ``suppress_ids`` are
    never generated, beside the model's ``suppress_tokens``.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 32,
                 skip_special_tokens: bool = True, share_prefix: bool = True,
                 stop_ids: Sequence[int] | None = None, suppress_ids: Sequence[int] = ()) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.skip_special_tokens = skip_special_tokens
        self.share_prefix = share_prefix
        self.stop_ids = None if stop_ids is None else [int(i) for i in stop_ids]
        self.suppress_ids = [int(i) for i in suppress_ids]

    def complete(self, prompts: list[Prompt], sampling: Sampling) -> list[str]:
        return [c.text for c in self.generate(prompts, sampling)]

    def generate(self, prompts: list[Prompt], sampling: Sampling) -> list[Completion]:
        """Like :meth:`complete`, with token ids and the finish reason of each completion."""
        encoded = encode_prompts(self.tokenizer, prompts)
        if not encoded:
            return []
        eos = self.stop_ids if self.stop_ids is not None else eos_ids(self.model.generation_config, self.tokenizer)
        outs = generate_batch(self.model, encoded, max_new_tokens=sampling.max_new_tokens,
                              temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                              repetition_penalty=sampling.repetition_penalty,
                              no_repeat_ngram_size=sampling.no_repeat_ngram_size, n=sampling.n,
                              seed=sampling.seed, batch_size=self.batch_size, stop_ids=eos,
                              suppress_ids=self.suppress_ids, pad_id=self.tokenizer.pad_token_id,
                              stop_strings=sampling.stop, decode=self._decode, share_prefix=self.share_prefix)
        return [self._finish(ids, set(eos), sampling.stop) for ids in outs]

    def _hidden_batches(self, sequences: list[list[int]]) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
        """The decoder's last hidden states for ``sequences`` in batches of ``batch_size``: the row
        indices, the hidden states and the attention mask of each. Rows are right-padded, so each
        real token sees only the tokens before it (in a causal model none sees the padding after
        it), and sorted by length for less padding per batch."""
        device = self.model.device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            ids = torch.full((len(rows), max(len(sequences[i]) for i in rows)), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, i in enumerate(rows):
                ids[r, :len(sequences[i])] = torch.tensor(sequences[i])
                mask[r, :len(sequences[i])] = 1
            hidden = self.model.get_decoder()(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            yield rows, hidden, mask.to(device)

    def _logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        """Log-softmax of the output layer on the given positions only (never ``[B, T, V]``), with a
        final logit soft cap (Gemma 2) applied as the model's own forward applies it."""
        logits = self.model.get_output_embeddings()(hidden).float()
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return torch.log_softmax(logits, dim=-1)

    @torch.no_grad()
    def next_token_logprobs(self, prompts: list[Prompt], token_ids: Sequence[int]) -> list[list[float]]:
        """For each prompt, the log-probability of each of ``token_ids`` as the next token: one
        forward pass per batch of ``batch_size`` prompts, each row read at its own last token."""
        encoded = encode_prompts(self.tokenizer, prompts)
        wanted = torch.tensor([int(t) for t in token_ids], device=self.model.device)
        out: list[list[float]] = [[] for _ in encoded]
        for rows, hidden, mask in self._hidden_batches(encoded):
            last = hidden[torch.arange(len(rows), device=hidden.device), mask.sum(1) - 1]
            chosen = self._logprobs(last)[:, wanted].cpu()
            for r, i in enumerate(rows):
                out[i] = chosen[r].tolist()
        return out

    @torch.no_grad()
    def continuation_logprobs(self, prompts: list[Prompt], continuations: list[list[int]]) -> list[list[float]]:
        """For each prompt, the log-probability of each token of its continuation (ids) following it,
        batched as :meth:`next_token_logprobs`; the output layer runs on the continuation's positions."""
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        encoded = encode_prompts(self.tokenizer, prompts)
        if any(c and not p for p, c in zip(encoded, continuations)):
            raise ValueError("continuation_logprobs needs a non-empty prompt to condition on")
        full = [p + [int(t) for t in c] for p, c in zip(encoded, continuations)]
        out: list[list[float]] = [[] for _ in full]
        for rows, hidden, _ in self._hidden_batches(full):
            for r, i in enumerate(rows):
                n, first = len(continuations[i]), len(encoded[i])
                if n:  # position t predicts token t + 1
                    target = torch.tensor(full[i][first:], device=hidden.device)
                    logps = self._logprobs(hidden[r, first - 1:first - 1 + n])
                    out[i] = logps.gather(1, target[:, None])[:, 0].cpu().tolist()
        return out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _finish(self, ids: list[int], eos: set[int], stop: Sequence[str]) -> Completion:
        """``ids`` end at a stop token, at the token that completed a stop string, or at the limit."""
        if ids and ids[-1] in eos:
            text, hit = cut_at_stop(self._decode(ids[:-1]), stop)
            return Completion(text, ids, "stop_string" if hit else "stop_token")
        text, hit = cut_at_stop(self._decode(ids), stop)
        return Completion(text, ids, "stop_string" if hit else "length")


class VLLMBackend:
    """The :class:`Backend` contract on vLLM (GPU). Needs ``pip install vllm``; not used in tests here.

    Prompts are tokenised by the model's Hugging Face tokenizer exactly as in
    :class:`TransformersBackend` (:func:`encode_prompts`) and passed as token ids, so vLLM neither
    prepends a second BOS nor reads markup into id prompts. The model's eos ids stop generation and its ``suppress_tokens`` get a
    -100 logit bias.
    """

    def __init__(self, model: str | os.PathLike, dtype: str = "auto", **llm_kwargs: Any) -> None:
        try:
            import vllm
        except ImportError as exc:
            raise ImportError("VLLMBackend needs vLLM: pip install 'ctrltok[vllm]' (GPU only)") from exc
        where = str(resolve_model(model))
        self._vllm = vllm
        self.llm = vllm.LLM(model=where, dtype=dtype, **llm_kwargs)
        self.tokenizer = AutoTokenizer.from_pretrained(where)
        try:
            self.gen_config = GenerationConfig.from_pretrained(where)
        except OSError:
            self.gen_config = GenerationConfig()

    def complete(self, prompts: list[Prompt], sampling: Sampling) -> list[str]:
        encoded = encode_prompts(self.tokenizer, prompts)
        if not encoded:
            return []
        suppress = list(self.gen_config.suppress_tokens or [])
        # None means the model's generation_config value, as on TransformersBackend; these
        # SamplingParams are built field by field, so each is resolved here first.
        sampling = sampling.served(self.gen_config)
        if sampling.no_repeat_ngram_size:
            raise ValueError(f"VLLMBackend: vLLM has no no_repeat_ngram_size (got {sampling.no_repeat_ngram_size}, "
                             "from the request or the model's generation_config); use the transformers backend "
                             "or set it to 0")
        params = self._vllm.SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k or -1,  # vLLM: -1 = no top-k
            repetition_penalty=sampling.repetition_penalty,
            max_tokens=sampling.max_new_tokens,
            seed=sampling.seed,
            stop=list(sampling.stop) or None,
            stop_token_ids=sorted(eos_ids(self.gen_config, self.tokenizer)) or None,
            logit_bias={int(t): -100.0 for t in suppress} or None,
        )
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in encoded], params)
        return [o.text for request in outputs for o in request.outputs]

    def next_token_logprobs(self, prompts: list[Prompt], token_ids: Sequence[int]) -> list[list[float]]:
        """:meth:`TransformersBackend.next_token_logprobs` on vLLM: each prompt extended by each
        candidate token, read back as that token's prompt log-probability (``prompt_logprobs=0``
        returns the log-probability of every prompt token; the shared prefix is cached)."""
        encoded = encode_prompts(self.tokenizer, prompts)
        params = self._vllm.SamplingParams(max_tokens=1, prompt_logprobs=0)
        wanted = [int(t) for t in token_ids]
        outputs = self.llm.generate([{"prompt_token_ids": ids + [t]} for ids in encoded for t in wanted], params)
        flat = [request.prompt_logprobs[-1][t].logprob for request, t in zip(outputs, wanted * len(encoded))]
        return [flat[i * len(wanted):(i + 1) * len(wanted)] for i in range(len(encoded))]

    def continuation_logprobs(self, prompts: list[Prompt], continuations: list[list[int]]) -> list[list[float]]:
        """:meth:`TransformersBackend.continuation_logprobs` on vLLM: the prompt log-probabilities of
        the continuation's tokens in ``prompt + continuation``."""
        encoded = encode_prompts(self.tokenizer, prompts)
        params = self._vllm.SamplingParams(max_tokens=1, prompt_logprobs=0)
        full = [p + [int(t) for t in c] for p, c in zip(encoded, continuations, strict=True)]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in full], params)
        return [[request.prompt_logprobs[len(p) + k][t].logprob for k, t in enumerate(c)]
                for request, p, c in zip(outputs, encoded, continuations)]


class FakeBackend:
    """Maps each prompt (as given: text or ids) through ``fn`` (``n`` copies each), honouring stop
    strings; records calls.

    ``calls`` lists every prompt it was asked for, so resume tests can check nothing was asked twice.
    """

    def __init__(self, fn: Callable[[str], str]) -> None:
        self.fn = fn
        self.calls: list[str] = []

    def complete(self, prompts: list[Prompt], sampling: Sampling) -> list[str]:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of prompts, not one string")
        out = []
        for prompt in prompts:
            self.calls.append(prompt)
            text, _ = cut_at_stop(self.fn(prompt), sampling.stop)
            out.extend([text] * sampling.n)
        return out


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def make_backend(name_or_model: Any, kind: str = "auto", batch_size: int = 32, dtype: str = "float32",
                 attn: str = "sdpa") -> Backend:
    """A backend for a model name or path, or for an already loaded ``(model, tokenizer)`` pair.

    ``kind``: ``auto`` (vLLM for a name when it is installed and a GPU is present, else
    transformers), ``transformers`` or ``vllm``.
    """
    if kind not in ("auto", "transformers", "vllm"):
        raise ValueError(f"backend kind {kind!r} is not one of auto, transformers, vllm")
    if isinstance(name_or_model, tuple):
        if len(name_or_model) != 2:
            raise TypeError("make_backend takes a name, a path, or a (model, tokenizer) pair")
        if kind == "vllm":
            raise ValueError("the vllm backend loads its own model: pass a name or path, not a loaded model")
        model, tokenizer = name_or_model
        return TransformersBackend(model, tokenizer, batch_size=batch_size)
    if not isinstance(name_or_model, (str, os.PathLike)):
        raise TypeError(f"make_backend takes a name, a path, or a (model, tokenizer) pair, not {type(name_or_model).__name__}")
    if kind == "vllm" or (kind == "auto" and vllm_available()):
        return VLLMBackend(name_or_model, dtype="auto" if dtype == "float32" else dtype)
    model, tokenizer = load_model(name_or_model, dtype=dtype, attn=attn)
    return TransformersBackend(model, tokenizer, batch_size=batch_size)
