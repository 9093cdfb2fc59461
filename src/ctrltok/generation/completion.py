"""One LLM interface for every pipeline stage: ``complete(prompts, sampling) -> texts``.

Stages that ask a model for text (backtranslation's augment, rewrite and curate steps, evaluation
generations) never call ``model.generate`` themselves; they take a :class:`Backend`, so tests inject
a :class:`FakeBackend` and GPU users get vLLM without the stages changing.

* :class:`TransformersBackend` - batched ``generate`` on CPU or GPU. Prompts are sorted by length
  (less padding per batch), left-padded (so every row's next token sits in the last column and the
  KV cache is shared by the whole batch), generated, stripped of the prompt and put back in input
  order. The model's ``generation_config`` is the base (its eos ids, ``suppress_tokens``,
  ``bad_words_ids`` stay in force); :class:`Sampling` overrides only what it names.
* :class:`VLLMBackend` - the same contract on vLLM, when it is installed (optional dependency).
* :class:`FakeBackend` - a deterministic function of the prompt, for tests.

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

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

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

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"Sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"Sampling.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"Sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.n < 1:
            raise ValueError(f"Sampling.n must be >= 1, got {self.n}")
        if isinstance(self.stop, str):  # a bare string would otherwise become a list of characters
            self.stop = [self.stop]
        if any(not s for s in self.stop):
            raise ValueError("Sampling.stop holds an empty string, which would stop before the first token")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One generated continuation with the facts evaluation needs (why it ended, its tokens)."""

    text: str
    token_ids: list[int]  # generated ids, up to and including the stop token or the stop string's last token
    finish_reason: str  # one of FINISH_REASONS


@runtime_checkable
class Backend(Protocol):
    def complete(self, prompts: list[Prompt], sampling: Sampling) -> list[str]: ...


def encode_prompts(tokenizer: "PreTrainedTokenizerBase", prompts: Sequence[Prompt]) -> list[list[int]]:
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


def _eos_ids(generation_config: Any, tokenizer: "PreTrainedTokenizerBase") -> set[int]:
    eos = generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


class _StopStrings:
    """Stopping criterion: a row is done once its *generated* text contains a stop string.

    transformers' own ``stop_strings`` also matches across the prompt/generation boundary; stages
    want "the answer contains the stop string", so only generated tokens are decoded. It also
    records, per row, how many tokens had been generated when it fired.
    """

    def __init__(self, tokenizer: "PreTrainedTokenizerBase", stop: Sequence[str], prompt_len: int,
                 skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.prompt_len = prompt_len
        self.skip = skip_special_tokens
        self.fired_at: dict[int, int] = {}

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        generated = input_ids[:, self.prompt_len:].tolist()
        for row, ids in enumerate(generated):
            if row in self.fired_at:
                done[row] = True
                continue
            text = self.tokenizer.decode(ids, skip_special_tokens=self.skip)
            if any(s in text for s in self.stop):
                self.fired_at[row] = len(ids)
                done[row] = True
        return done


class TransformersBackend:
    """Batched generation with a Hugging Face causal LM.

    ``batch_size`` counts sequences per ``generate`` call, samples included: with ``n`` samples per
    prompt a batch holds ``max(1, batch_size // n)`` prompts. Sampling is seeded: the same prompts,
    ``Sampling`` and ``batch_size`` give the same texts (the global torch RNG is left untouched).
    Decoded texts skip special tokens unless ``skip_special_tokens=False``; the stop token itself
    is never part of the text. With ``share_prefix`` (default) the prompts' common prefix is
    encoded once per batch and its KV cache shared by all rows.
    """

    min_shared_prefix = 4  # tokens; below this the extra forward call costs more than it saves

    def __init__(self, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", batch_size: int = 32,
                 skip_special_tokens: bool = True, share_prefix: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.skip_special_tokens = skip_special_tokens
        self.share_prefix = share_prefix

    def complete(self, prompts: list[Prompt], sampling: Sampling) -> list[str]:
        return [c.text for c in self.generate(prompts, sampling)]

    def generation_config(self, sampling: Sampling) -> Any:
        """The model's generation_config with ``sampling`` applied on top."""
        config = copy.deepcopy(self.model.generation_config)
        config.max_new_tokens = sampling.max_new_tokens
        config.max_length = None  # max_new_tokens is the only length limit
        config.do_sample = not sampling.greedy
        if sampling.greedy:
            # Sampling knobs are meaningless for greedy decoding and transformers warns about them.
            config.temperature = config.top_p = config.top_k = None
            config.num_return_sequences = 1  # greedy samples are identical: generate once, repeat
        else:
            config.temperature = sampling.temperature
            config.top_p = sampling.top_p
            config.num_return_sequences = sampling.n
        if config.pad_token_id is None:
            config.pad_token_id = self._pad_id(config)
        config.return_dict_in_generate = False
        return config

    def _pad_id(self, config: Any) -> int:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            eos = sorted(_eos_ids(config, self.tokenizer))
            if not eos:
                raise ValueError("the tokenizer has no pad token and the model no eos token: set tokenizer.pad_token")
            pad = eos[0]
        return int(pad)

    def generate(self, prompts: list[Prompt], sampling: Sampling) -> list["Completion"]:
        """Like :meth:`complete`, with token ids and the finish reason of each completion."""
        encoded = encode_prompts(self.tokenizer, prompts)
        if not encoded:
            return []
        config = self.generation_config(sampling)
        eos = _eos_ids(config, self.tokenizer)
        # Longest first: similar lengths share a batch (little padding) and memory peaks early.
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        per_batch = max(1, self.batch_size // sampling.n) if not sampling.greedy else self.batch_size
        results: list[list[Completion]] = [[] for _ in prompts]
        with torch.random.fork_rng(devices=self._rng_devices()), torch.inference_mode():
            torch.manual_seed(sampling.seed)
            for start in range(0, len(order), per_batch):
                chunk = order[start:start + per_batch]
                outs = self._generate_batch([encoded[i] for i in chunk], config, sampling, eos)
                per_prompt = 1 if sampling.greedy else sampling.n
                for j, i in enumerate(chunk):
                    got = outs[j * per_prompt:(j + 1) * per_prompt]
                    results[i] = [copy.copy(got[0]) for _ in range(sampling.n)] if sampling.greedy else got
        return [c for group in results for c in group]

    def _rng_devices(self) -> list[Any]:
        device = getattr(self.model, "device", torch.device("cpu"))
        return [device] if device.type == "cuda" else []

    def _generate_batch(self, batch: list[list[int]], config: Any, sampling: Sampling,
                        eos: set[int]) -> list[Completion]:
        from transformers import StoppingCriteriaList

        pad = int(config.pad_token_id)
        device = self.model.device
        cache, shared = self._shared_prefix_cache(batch, config, device)
        width = shared + max(len(ids) - shared for ids in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            # [shared prefix | left padding | rest of the prompt]; with shared == 0 plain left padding.
            input_ids[row, :shared] = torch.tensor(ids[:shared], dtype=torch.long)
            attention_mask[row, :shared] = 1
            input_ids[row, width - len(ids) + shared:] = torch.tensor(ids[shared:], dtype=torch.long)
            attention_mask[row, width - len(ids) + shared:] = 1
        device = self.model.device
        criteria = StoppingCriteriaList()
        stopper = None
        if sampling.stop:
            stopper = _StopStrings(self.tokenizer, sampling.stop, width, self.skip_special_tokens)
            criteria.append(stopper)
        extra = {"past_key_values": cache} if cache is not None else {}
        out = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=config,
            stopping_criteria=criteria,
            **extra,
        )
        completions = []
        for row, generated in enumerate(out[:, width:].tolist()):
            completions.append(self._finish(generated, eos, stopper.fired_at.get(row) if stopper else None, sampling))
        return completions

    def _shared_prefix_cache(self, batch: list[list[int]], config: Any, device: Any) -> tuple[Any, int]:
        """KV cache of the prompts' common prefix (the chat template's system turn), computed once.

        Rendered prompts usually start with the same template header; encoding it once and repeating
        its cache for every row saves that share of the prefill. Positions still come from the
        attention mask, so the padding that now sits between the prefix and the rest is invisible.
        Returns ``(None, 0)`` when there is nothing worth sharing.
        """
        if not self.share_prefix or len(batch) < 2:
            return None, 0
        shared = 0
        for column in zip(*batch):
            if any(t != column[0] for t in column):
                break
            shared += 1
        shared = min(shared, min(len(ids) for ids in batch) - 1)  # each row keeps a token to feed
        if shared < self.min_shared_prefix:
            return None, 0
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        prefix = torch.tensor([batch[0][:shared]], dtype=torch.long, device=device)
        self.model(input_ids=prefix, past_key_values=cache, use_cache=True, logits_to_keep=1)
        # generate() expands inputs for num_return_sequences but not a given cache: do it here.
        cache.batch_repeat_interleave(len(batch) * (config.num_return_sequences or 1))
        return cache, shared

    def _finish(self, generated: list[int], eos: set[int], fired_at: int | None, sampling: Sampling) -> Completion:
        end = next((k for k, t in enumerate(generated) if t in eos), None)
        if fired_at is not None and (end is None or fired_at <= end):
            ids = generated[:fired_at]
            text, _ = cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens), sampling.stop)
            return Completion(text, ids, "stop_string")
        if end is not None:
            text = self.tokenizer.decode(generated[:end], skip_special_tokens=self.skip_special_tokens)
            text, hit = cut_at_stop(text, sampling.stop)
            return Completion(text, generated[:end + 1], "stop_string" if hit else "stop_token")
        return Completion(self.tokenizer.decode(generated, skip_special_tokens=self.skip_special_tokens),
                          generated, "length")


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
        from transformers import AutoTokenizer, GenerationConfig

        from ctrltok.core.models import resolve_model

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
        params = self._vllm.SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            seed=sampling.seed,
            stop=list(sampling.stop) or None,
            stop_token_ids=sorted(_eos_ids(self.gen_config, self.tokenizer)) or None,
            logit_bias={int(t): -100.0 for t in suppress} or None,
        )
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in encoded], params)
        return [o.text for request in outputs for o in request.outputs]


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
    from ctrltok.core.models import load_model

    model, tokenizer = load_model(name_or_model, dtype=dtype, attn=attn)
    return TransformersBackend(model, tokenizer, batch_size=batch_size)
