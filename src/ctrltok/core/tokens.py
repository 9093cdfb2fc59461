"""Control tokens as data, and the one function that performs vocabulary surgery.

Each control token is declared once, with its purpose, how its embedding row starts, and its roles:

* ``supervised``: the model is trained to predict it (it stands in the labels);
* ``stop``: generation ends when it is produced (it goes into ``generation_config.eos_token_id``);
* ``blocked``: it must never be generated (it goes into ``generation_config.suppress_tokens``).

Presets bundle the tokens of each recipe (``eot``, ``oasst``, ``conditional``, ``epe``)::

    tokens = resolve_tokens(["epe"])
    surgery = add_tokens(model, tokenizer, tokens, init="describe", pad_to_multiple_of=128)
    surgery.ids["<assistant>"]        # 49152 on SmolLM2, as seed 000 says
    len(surgery.tokenizer)            # 49280 == embedding rows, filler tokens included

Filler tokens pad the vocabulary to a multiple (GPU-friendly matrix shapes, and seed 000's
49,280); they exist in the tokenizer so ``len(tokenizer)`` equals the embedding rows, and they are
suppressed at generation so they can never be produced.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tokenizers import AddedToken

from ctrltok.core.config import TokensConfig
from ctrltok.core.records import resource_path

FILLER_FORMAT = "<|ctrltok_filler_{}|>"
DEFAULT_INIT = TokensConfig.init  # the recipe default is the library default
INIT_STRATEGIES = ("mvn", "mean", "mean_noise", "describe", "copy:<token>")
MEAN_NOISE_STD = 0.01  # the PHF conditional-training code initialised new rows as mean + 0.01 noise


@dataclass(frozen=True)
class ControlToken:
    text: str
    purpose: str
    supervised: bool = True
    stop: bool = False
    blocked: bool = False
    init: str | None = None  # None: the surgery's default strategy
    description: str = ""  # what `describe` init embeds; defaults to the purpose
    reuse: bool = False  # use the tokenizer's own token of that spelling when it has one


def _charter_path(path: str | Path | None = None) -> Path:
    """A charter file: the shipped one when ``path`` is None, a ``ctrltok:<file>`` resource, or a path."""
    if path is None:
        return resource_path("charter.jsonl")
    if str(path).startswith("ctrltok:"):
        return resource_path(str(path).split(":", 1)[1])
    return Path(path)


@dataclass(frozen=True)
class CharterItem:
    id: str
    token: str
    title: str
    text: str


def load_charter(path: str | Path | None = None) -> list[CharterItem]:
    """The EPE charter: one JSON line per item (`id`, `token`, `title`, `text`), in token-id order."""
    path = _charter_path(path)
    items: list[CharterItem] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                item = CharterItem(str(rec["id"]), rec.get("token") or f"<charter_{rec['id']}>", rec.get("title", ""), rec["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: a charter line needs `id` and `text` ({exc})") from exc
            if item.id in seen:
                raise ValueError(f"{path}:{lineno}: charter id {item.id!r} appears twice")
            seen.add(item.id)
            items.append(item)
    return items


# The epe preset's fixed token; its charter tokens come from the charter the run loads.
EPE_ASSISTANT = ControlToken("<assistant>", "opens an assistant turn (template `epe`) and an inserted reflection; "
                             "the constitution head reads the hidden state here",
                             description="assistant reflection")


def _preset_epe(charter: str | Path | Sequence[CharterItem] | None) -> list[ControlToken]:
    out = [EPE_ASSISTANT]
    items = charter if isinstance(charter, (list, tuple)) else load_charter(charter)
    for item in items:
        out.append(ControlToken(item.token, f"charter item {item.id}: {item.title}", supervised=False, blocked=True,
                                init="describe", description=f"{item.title}. {item.text}"))
    return out


PRESETS: dict[str, list[ControlToken]] = {
    # seed 004 (LIMA): a fresh end-of-turn token, distinct from the pretrained EOS.
    "eot": [ControlToken("<EOT>", "closes every utterance and halts generation", stop=True,
                         description="end of turn")],
    # seed 002 (Open-Assistant): role tokens open turns, <|endoftext|> closes each.
    "oasst": [
        ControlToken("<|prompter|>", "opens a user (prompter) turn", supervised=False, description="user"),
        ControlToken("<|assistant|>", "opens an assistant turn", supervised=False, description="assistant"),
        ControlToken("<|endoftext|>", "closes each turn", stop=True, reuse=True, description="end of text"),
    ],
    # seed 001 (Korbak et al. 2023): sentence prefixes by a scorer's verdict; predicted in training
    # as in the PHF code, never emitted at generation.
    "conditional": [
        ControlToken("<|aligned|>", "prefixes a segment the scorer judged acceptable", blocked=True,
                     description="aligned"),
        ControlToken("<|misaligned|>", "prefixes a segment the scorer judged unacceptable", blocked=True,
                     description="misaligned"),
    ],
}


def resolve_tokens(presets: list[str], custom: list | None = None,
                   charter: str | Path | Sequence[CharterItem] | None = None) -> list[ControlToken]:
    """The tokens of the named presets plus custom ones, in order, without duplicates.

    ``charter``: the EPE charter as loaded items (a run loads it once), or its path."""
    out: list[ControlToken] = []
    for name in presets:
        if name == "epe":
            out.extend(_preset_epe(charter))
        elif name in PRESETS:
            out.extend(PRESETS[name])
        else:
            raise ValueError(f"unknown token preset {name!r}; expected one of {sorted([*PRESETS, 'epe'])}")
    for c in custom or []:
        if isinstance(c, ControlToken):
            out.append(c)
            continue
        role = getattr(c, "role", "supervised")
        out.append(ControlToken(c.token, c.purpose, supervised=role in ("supervised", "stop"), stop=role == "stop",
                                blocked=role == "blocked", init=c.init, description=c.description or c.purpose))
    seen: dict[str, ControlToken] = {}
    for tok in out:
        if tok.text in seen and seen[tok.text] != tok:
            raise ValueError(f"token {tok.text!r} is declared twice with different roles")
        seen.setdefault(tok.text, tok)
    return list(seen.values())


@dataclass
class Surgery:
    model: object
    tokenizer: object
    tokens: list[ControlToken]
    ids: dict[str, int]
    new_ids: list[int]  # rows this surgery created for control tokens (reused tokens excluded)
    filler_ids: list[int] = field(default_factory=list)

    @property
    def stop_ids(self) -> list[int]:
        return [self.ids[t.text] for t in self.tokens if t.stop]

    @property
    def blocked_ids(self) -> list[int]:
        return [self.ids[t.text] for t in self.tokens if t.blocked]

    def manifest(self) -> dict:
        """What `ctrltok.json` records beside a checkpoint."""
        return {
            "tokens": [{**asdict(t), "id": self.ids[t.text]} for t in self.tokens],
            "filler_ids": [min(self.filler_ids), max(self.filler_ids)] if self.filler_ids else [],
            "vocab_rows": len(self.tokenizer),
        }


def embedding_rows(model) -> int:
    return model.get_input_embeddings().weight.shape[0]


def is_tied(model) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def check_sizes(model, tokenizer, where: str = "") -> None:
    rows, n = embedding_rows(model), len(tokenizer)
    if rows != n:
        raise ValueError(
            f"{where}tokenizer has {n:,} tokens but the model's embedding has {rows:,} rows. "
            + ("Token ids past the last row would index out of range: use the tokenizer saved with this model."
               if n > rows else
               "Ids between them have no token; pass the tokenizer that belongs to this model, or pad the "
               "tokenizer with filler tokens (add_tokens(..., pad_to_multiple_of=N)).")
        )


def _init_rows(weight: torch.Tensor, new: list[int], strategies: list[str], old_rows: int, tokenizer,
               descriptions: list[str], gen: torch.Generator) -> None:
    old = weight[:old_rows].detach().float()
    mean = old.mean(0)
    mvn = None
    for row, strategy, desc in zip(new, strategies, descriptions):
        if strategy == "mean":
            value = mean
        elif strategy == "mean_noise":
            value = mean + MEAN_NOISE_STD * torch.randn(mean.shape, generator=gen)
        elif strategy == "mvn":
            # transformers' `mean_resizing`: sample from N(mean, 1e-9 * covariance of the old rows).
            if mvn is None:
                centered = old - mean
                cov = centered.T @ centered / old_rows
                mvn = torch.linalg.cholesky(1e-9 * cov + 1e-12 * torch.eye(cov.shape[0]))
            value = mean + mvn @ torch.randn(mean.shape, generator=gen)
        elif strategy == "describe":
            ids = [i for i in tokenizer(desc, add_special_tokens=False).input_ids if i < old_rows]
            value = old[ids].mean(0) if ids else mean
        elif strategy.startswith("copy:"):
            src = tokenizer.convert_tokens_to_ids(strategy[5:])
            if src is None or src == tokenizer.unk_token_id and strategy[5:] != tokenizer.unk_token:
                raise ValueError(f"init {strategy!r}: the tokenizer has no token {strategy[5:]!r}")
            value = weight[src].detach().float()
        else:
            raise ValueError(f"unknown init strategy {strategy!r}; expected one of {list(INIT_STRATEGIES)}")
        weight.data[row] = value.to(weight.dtype)


def add_tokens_to_tokenizer(tokenizer, tokens: list[ControlToken], pad_to_multiple_of: int | None = None,
                            ) -> tuple[dict[str, int], list[int], list[int]]:
    """The tokenizer half of :func:`add_tokens` (what ``ctrltok prepare`` needs to encode without
    loading the model's weights): ``(ids of every token, new ids, filler ids)``."""
    old_rows = len(tokenizer)
    ids: dict[str, int] = {}
    new_tokens: list[ControlToken] = []
    vocab = tokenizer.get_vocab()
    for tok in tokens:
        if tok.text in vocab and tok.reuse:
            tokenizer.add_tokens([AddedToken(tok.text, special=True, normalized=False)], special_tokens=True)
            ids[tok.text] = vocab[tok.text]
        elif tok.text in vocab:
            raise ValueError(
                f"token {tok.text!r} already exists in the tokenizer (id {vocab[tok.text]}); a control token "
                "must be new, or declared with reuse=True to take over the existing one"
            )
        else:
            new_tokens.append(tok)
    if new_tokens:
        tokenizer.add_tokens([AddedToken(t.text, special=True, normalized=False) for t in new_tokens],
                             special_tokens=True)
    for tok in new_tokens:
        ids[tok.text] = tokenizer.convert_tokens_to_ids(tok.text)
    new_ids = [ids[t.text] for t in new_tokens]
    assert new_ids == list(range(old_rows, old_rows + len(new_ids))), "new tokens did not get consecutive rows"
    filler_ids: list[int] = []
    if pad_to_multiple_of:
        n = len(tokenizer)
        target = -(-n // pad_to_multiple_of) * pad_to_multiple_of
        fillers = [FILLER_FORMAT.format(i) for i in range(target - n)]
        if fillers:
            tokenizer.add_tokens([AddedToken(f, special=True, normalized=False) for f in fillers], special_tokens=True)
            filler_ids = list(range(n, target))
    return ids, new_ids, filler_ids


def add_tokens(model, tokenizer, tokens: list[ControlToken], init: str = DEFAULT_INIT,
               pad_to_multiple_of: int | None = None, seed: int = 0) -> Surgery:
    """Add control tokens to a tokenizer and model, initialise their rows, pad with fillers.

    Returns a :class:`Surgery` with the model and tokenizer (changed in place) and the explicit id
    of every token. Refuses a tokenizer/model size mismatch before changing anything.
    """
    check_sizes(model, tokenizer)
    old_rows = len(tokenizer)
    ids, new_ids, filler_ids = add_tokens_to_tokenizer(tokenizer, tokens, pad_to_multiple_of)
    new_tokens = [t for t in tokens if ids.get(t.text) in new_ids]
    tied = is_tied(model)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    gen = torch.Generator().manual_seed(seed)
    strategies = [t.init or init for t in new_tokens] + ["mean"] * len(filler_ids)
    descriptions = [t.description or t.purpose for t in new_tokens] + [""] * len(filler_ids)
    rows = new_ids + filler_ids
    with torch.no_grad():
        _init_rows(model.get_input_embeddings().weight, rows, strategies, old_rows, tokenizer, descriptions, gen)
        if not tied and model.get_output_embeddings() is not None:
            _init_rows(model.get_output_embeddings().weight, rows, strategies, old_rows, tokenizer, descriptions, gen)
    if tied:
        assert is_tied(model), "resizing untied the embeddings"
    check_sizes(model, tokenizer)
    surgery = Surgery(model, tokenizer, list(tokens), ids, new_ids, filler_ids)
    apply_generation_config(model, surgery)
    return surgery


def apply_generation_config(model, surgery: Surgery, end_of_turn_id: int | None = None) -> None:
    """Stop at the stop tokens (and the template's end of turn, ``Template.end_of_turn_id``); never
    emit blocked or filler tokens."""
    gc = model.generation_config
    eos = gc.eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    stops = list(surgery.stop_ids)
    if end_of_turn_id is not None:
        stops.insert(0, end_of_turn_id)
    for i in stops:
        if i not in eos:
            eos.append(i)
    gc.eos_token_id = eos or None
    suppressed = sorted(set(list(gc.suppress_tokens or []) + surgery.blocked_ids + surgery.filler_ids))
    gc.suppress_tokens = suppressed or None
    if gc.pad_token_id is None and surgery.tokenizer.pad_token_id is not None:
        gc.pad_token_id = surgery.tokenizer.pad_token_id


def padding_id(tokenizer) -> int:
    """The id that fills padded positions of training and evaluation batches: the tokenizer's pad
    token, else its end of sequence, else 0. Every padded position is masked out of attention and
    loss, so any id serves; a real token's id keeps the batch printable."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad or 0)
