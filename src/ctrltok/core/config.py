"""Typed recipe configuration.

A recipe is a YAML file holding values only. It is parsed into the dataclasses below; a key that
no dataclass declares is an error naming the key and the file, and so is a value of the wrong
type. ``--set dotted.key=value`` overrides are applied to the YAML mapping before validation, so
they are checked the same way::

    recipe = load_recipe("recipes/eot-cpu.yaml", ["train.max_steps=20", "lora.enabled=true"])

Sections: ``model``, ``tokens``, ``data``, ``train``, ``lora``, ``save``, ``decoding``, ``epe``,
``conditional``, ``backtranslate``. Each recipe file starts with a comment saying how to run it.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ctrltok.core.schema import ConfigError, apply_overrides, build, range_problem


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"  # alias of the embedded default, a local path, or a hub name
    dtype: str = "float32"  # float32 | bfloat16 | float16 (bf16 on GPUs; this CPU has no native bf16)
    attn: str = "auto"  # auto (per-document SDPA for packed training on CPU, flash varlen / FlexAttention on CUDA) | sdpa | eager | flex_attention | ctrltok_varlen
    init: str = "pretrained"  # pretrained | scratch (the architecture from the model's config, fresh weights)
    config: dict[str, Any] = field(default_factory=dict)  # overrides of the model's config (e.g. n_layer: 12)
    liger: bool = False  # liger-kernel's RMSNorm, RoPE and SwiGLU kernels (optional package; core.loss.apply_liger)

    def check(self, source: str = "<recipe>", lora: bool = False) -> None:
        """What can be checked without the model's config (whose attributes ``core.models`` checks)."""
        for key in self.config:
            if not isinstance(key, str) or not key.isidentifier() or key.startswith("_"):
                raise ConfigError(f"{source}: model.config key {key!r} is not a config attribute name")
        if self.init == "scratch" and lora:
            raise ConfigError(f"{source}: model.init = scratch with lora.enabled: LoRA adapts pretrained weights; "
                              "a model from scratch trains every parameter (set lora.enabled: false)")


@dataclass
class CustomToken:
    token: str
    purpose: str = ""
    init: str | None = None  # falls back to tokens.init
    role: str = "supervised"  # supervised | stop | blocked | marker
    description: str = ""


@dataclass
class TokensConfig:
    presets: list[str] = field(default_factory=list)  # eot | oasst | conditional | epe
    custom: list[CustomToken] = field(default_factory=list)
    # mvn | mean | mean_noise | describe | copy:<token>; describe by default: the fastest measured
    # without a token to copy (bench/README "init_study"); a token without a description gets the mean
    init: str = "describe"
    pad_to_multiple_of: int | None = 64
    charter: str | None = None  # path to a charter JSONL replacing the shipped one (epe)


HUB_OPTIONS = ("config", "split", "revision", "data_files")  # what a hub source may say besides its name
OASST_PATHS = ("best", "all")


@dataclass
class SourceConfig:
    """One source of ``data.train`` / ``data.eval``: a list item, or the whole value as a mapping.

    Exactly one of ``path`` (a file, folder, ``ctrltok:<resource>`` or ``hf:NAME[:CONFIG]`` spec) or
    ``hf`` (a Hugging Face dataset name, or a builder such as ``json`` / ``parquet`` with
    ``data_files``), which is streamed with ``config``, ``split`` (default ``train``), ``revision``
    and ``data_files``. ``weight``: the rate at which this source is read in a mixture
    (:func:`ctrltok.core.records.read_records`). Read by :mod:`ctrltok.core.records`.
    """

    path: str | None = None
    hf: str | None = None
    config: str | None = None
    split: str | None = None
    revision: str | None = None
    data_files: str | list[str] | dict[str, Any] | None = None
    weight: float = 1.0

    @property
    def label(self) -> str:
        """How records of this source are named: the path, or ``hf:NAME[:CONFIG][SPLIT]``."""
        if self.path is not None:
            return self.path
        return f"hf:{self.hf}" + (f":{self.config}" if self.config else "") + f"[{self.split or 'train'}]"


def _hub_spec(spec: str, where: str) -> dict[str, Any]:
    """``hf:NAME[:CONFIG][?split=S&revision=R&data_files=F1,F2]`` -> the hub fields it names."""
    body, _, query = spec[len("hf:"):].partition("?")
    name, _, config = body.partition(":")
    if not name:
        raise ConfigError(f"{where}: {spec!r} names no dataset; expected hf:NAME[:CONFIG][?split=...]")
    out: dict[str, Any] = {"hf": name, "config": config or None}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if key not in HUB_OPTIONS[1:] or not eq:
            raise ConfigError(f"{where}: {spec!r}: unknown hub option {item!r}; expected key=value with key one of "
                              f"{list(HUB_OPTIONS[1:])}")
        out[key] = value.split(",") if key == "data_files" and "," in value else value
    return out


def source_config(value: Any, where: str) -> SourceConfig:
    """One ``data.train`` entry (a string or a mapping) -> a checked :class:`SourceConfig`."""
    if isinstance(value, SourceConfig):
        return value
    if isinstance(value, str):
        return SourceConfig(**_hub_spec(value, where)) if value.startswith("hf:") else SourceConfig(path=value)
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a path or a mapping with `path` or `hf`, found {value!r}")
    src = build(SourceConfig, value, where)
    if src.path is not None and src.path.startswith("hf:"):
        spec = _hub_spec(src.path, f"{where}.path")
        for key, val in spec.items():
            mine = getattr(src, key)
            if mine is not None and val is not None and mine != val:
                raise ConfigError(f"{where}.{key} = {mine!r} contradicts path {src.path!r}")
            setattr(src, key, mine if mine is not None else val)
        src.path = None
    if (src.path is None) == (src.hf is None):
        raise ConfigError(f"{where}: give exactly one of `path` (file, folder, ctrltok:NAME, hf:NAME) or `hf` "
                          f"(a Hugging Face dataset name); found {value!r}")
    if src.path is not None:
        extra = [k for k in HUB_OPTIONS if getattr(src, k) is not None]
        if extra:
            raise ConfigError(f"{where}: {extra[0]} is for hub sources (`hf: NAME`), not for path {src.path!r}")
    if not src.weight > 0:
        raise ConfigError(f"{where}.weight = {src.weight}; expected > 0")
    return src


@dataclass
class DataConfig:
    """``train`` and ``eval``: a path string (file, folder, ``ctrltok:<resource>``, ``hf:NAME[:CONFIG]``),
    a mapping (one :class:`SourceConfig`) or a list of strings and mappings (several sources, mixed by
    the seed and their weights); :meth:`sources` gives the checked list."""

    kind: str = "chat"  # chat | text | labelled | epe
    # The default serves recipes built in code (`Recipe()`); a recipe file or mapping must name its
    # data (recipe_from_mapping refuses one without data.train), so none trains on the shipped set unasked.
    train: str | list[str | dict[str, Any]] | dict[str, Any] = "ctrltok:instructions"
    eval: str | list[str | dict[str, Any]] | dict[str, Any] | None = None
    eval_fraction: float = 0.1  # held out from train when `eval` is not given
    template: str = "default"
    loss_on: str = "assistant"  # assistant | all | last
    max_length: int = 512
    overlong: str = "auto"  # auto (chunk for text and labelled, truncate otherwise) | chunk | truncate | split | error
    packing: bool = True
    on_error: str = "raise"  # raise | skip (counted, with reasons)
    text_field: str = "text"
    limit: int | None = None  # use only the first N records
    workers: int = 1  # processes that encode records when the data is prepared (ctrltok prepare, train)
    oasst_paths: str = "best"  # OASST message trees: best (the best-ranked thread) | all (every thread)

    def __post_init__(self) -> None:
        if self.overlong == "auto":  # resolved here so every reader (and the run's manifest) sees the rule used
            self.overlong = "chunk" if self.kind in ("text", "labelled") else "truncate"
        self.sources("train")
        if self.eval is not None:
            self.sources("eval")
        if self.oasst_paths not in OASST_PATHS:
            raise ConfigError(f"data.oasst_paths = {self.oasst_paths!r}; expected one of {list(OASST_PATHS)}")

    @property
    def packed(self) -> bool:
        """Rows may hold several documents (packing, or ``overlong: chunk``: documents end to end),
        so batches carry document ids; else one document per row, padded."""
        return self.packing or self.overlong == "chunk"

    def sources(self, which: str = "train") -> list[SourceConfig]:
        """``data.train`` (or ``data.eval``) as a checked list of sources."""
        value = getattr(self, which)
        if isinstance(value, list):
            if not value:
                raise ConfigError(f"data.{which}: an empty list names no data")
            return [source_config(v, f"data.{which}[{i}]") for i, v in enumerate(value)]
        return [source_config(value, f"data.{which}")]


@dataclass
class TrainConfig:
    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    scheduler: str = "cosine"  # linear | cosine | cosine_with_restarts | polynomial | constant | constant_with_warmup | inverse_sqrt
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    num_tokens: int | None = None  # a token budget: train for ceil(num_tokens / tokens per step) steps
    micro_batch_size: int = 1  # packed rows (or padded examples) per forward
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    precision: str = "fp32"  # fp32 | bf16 | fp16
    seed: int = 42
    eval_every: int = 0  # optimizer steps; 0 = only at the end
    save_every: int = 0  # optimizer steps; 0 = only at the end
    log_every: int = 1
    report_to: list[str] = field(default_factory=list)  # tensorboard | wandb
    strategy: str = "ddp"  # ddp | fsdp2 | deepspeed (ctrltok.training.engines); an accelerate launch config can also pick it
    deepspeed: str | None = None  # a DeepSpeed JSON (recipes/deepspeed/zero2.json), read with strategy deepspeed
    save_total_limit: int | None = 2  # checkpoints kept (the newest); null keeps every one
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the decoder layers' MLPs and norms (ctrltok.training.compiling)
    new_token_lr: float | None = None  # LoRA only: a separate learning rate for the new token rows
    push_to_hub: str | None = None  # a Hub repo (owner/name): the saved model is uploaded after training (ctrltok push)


@dataclass
class SaveConfig:
    """What the model folder holds after training (``training.train``)."""
    merged: bool = True  # the full model (under LoRA: the adapter merged in), loadable with plain transformers
    adapter: bool = True  # under LoRA: DIR/adapter (PEFT's files, with the new token rows) beside or instead of it


@dataclass
class DecodingConfig:
    """How the trained model is served: written to the saved ``generation_config.json`` and used by
    ``ctrltok generate``, ``chat`` and ``eval`` unless a flag overrides it. ``do_sample: false`` is
    greedy (the sampling values are then ignored)."""
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    repetition_penalty: float = 1.0  # > 1 penalises tokens already generated (Keskar et al. 2019)
    no_repeat_ngram_size: int = 0  # 0 = off
    max_new_tokens: int = 256


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class EpeConfig:
    sidecar: str | None = None
    reflection_column: str = "reflection_3p"
    reflection_weight: float = 1.0
    context_weight: float = 1.0
    head_weight: float = 1.0  # weight of the constitution head's BCE in the total loss
    eval_sidecar: str | None = None


@dataclass
class ConditionalConfig:
    threshold: float | None = 0.00056
    misaligned_fraction: float | None = None
    drop_token_fraction: float = 0.01
    scorer: str = "profanity"
    supervise_control: bool = True


CURATION_SCORES = (1, 2, 3, 4, 5)  # the curator's scale (backtranslate.keep_score lies in it)
SCORE_AGGREGATES = ("median", "mean")  # backtranslate.score_aggregate
CURATION_SCORINGS = ("generated", "expected", "likelihood", "pmi")  # backtranslate.curation_scoring
PARAGRAPH_BREAKS = ("blank_line", "line")  # backtranslate.paragraphs
LIKELIHOOD_SCORINGS = ("likelihood", "pmi")  # scored in nats per token, not 1..5: kept by keep_fraction


@dataclass
class BacktranslateConfig:
    """Humpback (Li et al. 2023) with self-rewriting (seed 003); read by :mod:`ctrltok.backtranslate`.
    :meth:`check` holds the cross-field rules; :func:`validate` runs it for every recipe."""

    # segment: unlabelled documents -> candidate responses
    corpus: str = "python:pydoc_topics"  # python:pydoc_topics | .jsonl/.parquet | folder of .txt | datasets name
    corpus_field: str = "text"  # the text column of a JSONL/Parquet/datasets corpus
    gold: str = "ctrltok:instructions"  # gold (instruction, response) pairs, chat or instruction/response records
    max_documents: int = 40
    max_candidates: int | None = None  # stop segmenting after this many kept candidates
    max_per_document: int | None = None  # keep at most this many candidates from one document
    min_chars: int = 200
    max_chars: int = 1500
    # blank_line: paragraphs end at a blank line (Markdown, pydoc). line: every line is a paragraph, as
    # in C4, CCNet and Dolma web text, and one over max_chars (an article per line) is cut at sentence ends
    paragraphs: str = "blank_line"
    # augment: the backward model M_yx writes instructions
    backward_system: str = "ctrltok:backtranslate_backward_system.txt"  # file or ctrltok:<resource>
    backward_steps: int | None = None  # optimizer steps for the backward model (None: train.max_steps)
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    min_instruction_chars: int = 8
    max_instruction_chars: int = 400
    # the seed model M0 that rewrites and curates: "model" = model.name as is (already instruction
    # tuned), "train" = fine-tune model.name on the gold pairs first (the paper's M0), else a name/path
    seed_model: str = "model"
    seed_steps: int | None = None
    # rewrite (seed 003: by the seed model itself, before curation)
    rewrite: bool = True
    rewrite_prompt: str = "ctrltok:backtranslate_rewrite.txt"
    rewrite_max_new_tokens: int = 384
    rewrite_temperature: float = 0.0
    # curate + select
    curation_prompt: str = "ctrltok:curation_prompt.txt"
    curation_samples: int = 1
    curation_max_new_tokens: int = 192
    curation_temperature: float = 0.0  # set > 0 when curation_samples > 1, or the samples agree
    # A prefill such as "Score:" for small curators that will not follow the answer format: the
    # reply is started for them and the first line they write must complete "Score: N".
    curation_answer_prefix: str = ""
    score_aggregate: str = "median"  # median | mean over the samples that parsed
    # "generated": the curator writes its score (parsed strictly, curation_samples times);
    # "expected": sum of k * p(k) over the score digits 1..5 read after curation_answer_prefix in one
    # forward pass: no parse failures and a graded score where a small curator's greedy answer is
    # nearly always the same digit; "likelihood": the curator's mean log-probability per token of the
    # response as its reply to the instruction (no prompt, nothing parsed; needs keep_fraction); "pmi":
    # that minus the same for the response as a reply to an empty turn, i.e. how much the instruction
    # helps predict its response (repetitive or boilerplate text is likely with or without it)
    curation_scoring: str = "generated"
    keep_score: float = 4  # pairs scoring at least this are kept (any value in 1..5: expected scores are not whole)
    # instead: keep the best-scored fraction of the curated pairs (the threshold is the score at that
    # rank; ties with it are kept too), whatever scale a small curator's scores take
    keep_fraction: float | None = None
    # finetune + iterate
    iterations: int = 1
    finetune_steps: int | None = None  # None: train.max_steps
    gold_tag: str = "Answer in the style of an AI Assistant."  # system prompt marking gold pairs
    generated_tag: str = "Answer with knowledge from web search."  # system prompt marking generated pairs
    # the ablation: also fine-tune ``baseline-1`` on the gold pairs and as many pairs as iteration 1
    # selected, drawn at random (train.seed) from the pairs before curation
    baseline: bool = False
    batch_size: int = 8  # prompts per backend call
    report_samples: int = 3  # kept and dropped pairs shown side by side in the report

    def check(self, source: str = "<recipe>") -> None:
        """Cross-field checks; the error names the key as ``backtranslate.KEY``."""
        def bad(key: str, msg: str) -> ConfigError:
            return ConfigError(f"{source}: backtranslate.{key} {msg}")

        if self.score_aggregate not in SCORE_AGGREGATES:
            raise bad("score_aggregate", f"= {self.score_aggregate!r}; expected one of {list(SCORE_AGGREGATES)}")
        if not min(CURATION_SCORES) <= self.keep_score <= max(CURATION_SCORES):
            raise bad("keep_score", f"= {self.keep_score}; expected 1..5")
        if self.paragraphs not in PARAGRAPH_BREAKS:
            raise bad("paragraphs", f"= {self.paragraphs!r}; expected one of {list(PARAGRAPH_BREAKS)}")
        if self.curation_scoring not in CURATION_SCORINGS:
            raise bad("curation_scoring", f"= {self.curation_scoring!r}; expected one of {list(CURATION_SCORINGS)}")
        if self.curation_scoring == "expected" and not self.curation_answer_prefix.strip():
            raise bad("curation_answer_prefix", "is empty with curation_scoring: expected, which reads the score "
                      "digit right after it: set it to the answer's start, e.g. \"Score:\"")
        if self.curation_scoring in LIKELIHOOD_SCORINGS and self.keep_fraction is None:
            raise bad("keep_fraction", f"is unset with curation_scoring: {self.curation_scoring}, whose scores are "
                      "nats per token, not 1..5: set the share to keep, e.g. 0.5")
        if self.curation_scoring in ("expected", *LIKELIHOOD_SCORINGS) and self.curation_samples != 1:
            raise bad("curation_samples", f"= {self.curation_samples} with curation_scoring: {self.curation_scoring}, "
                      "which reads the curator's probabilities once: set 1")
        for key in ("curation_samples", "iterations", "batch_size", "max_new_tokens", "rewrite_max_new_tokens",
                    "curation_max_new_tokens"):
            if getattr(self, key) < 1:
                raise bad(key, f"= {getattr(self, key)}; expected >= 1")
        if self.min_chars > self.max_chars:
            raise bad("min_chars", f"= {self.min_chars} exceeds max_chars = {self.max_chars}")
        if self.curation_samples > 1 and self.curation_temperature == 0:
            raise bad("curation_temperature", "= 0 with curation_samples > 1: greedy samples are identical; "
                      "set a temperature (e.g. 0.7) or curation_samples: 1")


@dataclass
class Recipe:
    name: str = "recipe"
    model: ModelConfig = field(default_factory=ModelConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    save: SaveConfig = field(default_factory=SaveConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    epe: EpeConfig | None = None
    conditional: ConditionalConfig | None = None
    backtranslate: BacktranslateConfig | None = None
    source: str = ""  # the file it came from (set by load_recipe)


def recipe_from_mapping(mapping: dict, source: str = "<recipe>", overrides: list[str] | None = None) -> Recipe:
    mapping = apply_overrides(dict(mapping or {}), overrides or [])
    name = Path(source).stem if source and not source.startswith("<") else "recipe"
    mapping.setdefault("name", name)
    try:
        recipe = build(Recipe, mapping, where=source)
    except ConfigError:
        raise
    recipe.source = source
    validate(recipe)
    _require_train(mapping, source)  # after the checks of what is there, which name a more precise key
    return recipe


def _require_train(mapping: dict, source: str) -> None:
    """A recipe names its training data: ``data.train`` has no silent default (a backtranslation
    recipe, whose pipeline makes the training data, needs none)."""
    data = mapping.get("data") or {}  # a mapping: build() has refused anything else
    if mapping.get("backtranslate") is None and data.get("train") is None:
        raise ConfigError(f"{source}: data.train is missing; name the training data in the recipe's data section "
                          "(a .jsonl/.json/.parquet file, a folder of them, hf:NAME for a hub dataset, or "
                          "ctrltok:instructions for the shipped set), or pass --set data.train=PATH")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such recipe file")
    try:
        mapping = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc
    if not mapping:  # an empty file (or comments only) would silently train on every default
        raise ConfigError(f"{path}: the recipe is empty; write at least its data section (data.train, "
                          "data.template) and model.name, as the recipes under recipes/ do")
    if not isinstance(mapping, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections, found {type(mapping).__name__}")
    return recipe_from_mapping(mapping, str(path), overrides)


_CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.attn": ("auto", "sdpa", "eager", "flex_attention", "ctrltok_varlen"),
    "data.kind": ("chat", "text", "labelled", "epe"),
    "data.loss_on": ("assistant", "all", "last"),
    "data.overlong": ("chunk", "truncate", "split", "error"),
    "model.init": ("pretrained", "scratch"),
    "data.on_error": ("raise", "skip"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.strategy": ("ddp", "fsdp2", "deepspeed"),
    # transformers.get_scheduler's names that need nothing ctrltok does not pass (no metric, no extra args)
    "train.scheduler": ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                        "inverse_sqrt"),
}
CUSTOM_ROLES = ("supervised", "stop", "blocked", "marker")  # tokens.custom[i].role
INITS = ("mvn", "mean", "mean_noise", "describe")  # tokens.init (also copy:<token>), as core.tokens reads them
ALL_LINEAR = "all-linear"  # lora.target_modules: every linear layer but the output head (PEFT's shorthand)

# Numeric ranges, by dotted key: ">0", ">=N", or an interval "[a,b]" / "[a,b)" / "(a,b)". A value of
# None (an optional field left out) and a section that is absent are not checked.
_RANGES = {
    "tokens.pad_to_multiple_of": "[1,4096]",
    "data.max_length": ">=8",
    "data.eval_fraction": "[0,1)",
    "data.limit": ">=1",
    "data.workers": ">=1",
    "train.lr": ">0",
    "train.weight_decay": ">=0",
    "train.warmup_steps": ">=0",
    "train.warmup_ratio": "[0,1]",
    "train.epochs": ">0",
    "train.max_steps": ">=1",
    "train.num_tokens": ">=1",
    "train.micro_batch_size": ">=1",
    "train.grad_accum": ">=1",
    "train.max_grad_norm": ">=0",
    "train.seed": ">=0",
    "train.eval_every": ">=0",
    "train.save_every": ">=0",
    "train.log_every": ">=1",
    "train.save_total_limit": ">=1",
    "train.new_token_lr": ">0",
    "decoding.temperature": ">0",
    "decoding.top_p": "(0,1]",
    "decoding.top_k": ">=1",
    "decoding.repetition_penalty": ">0",
    "decoding.no_repeat_ngram_size": ">=0",
    "decoding.max_new_tokens": ">=1",
    "lora.r": ">=1",
    "lora.alpha": ">0",
    "lora.dropout": "[0,1)",
    "epe.reflection_weight": ">=0",
    "epe.context_weight": ">=0",
    "epe.head_weight": ">=0",
    "conditional.threshold": "[0,1]",
    "conditional.misaligned_fraction": "(0,1)",
    "conditional.drop_token_fraction": "[0,1]",
    "backtranslate.max_documents": ">=1",
    "backtranslate.max_candidates": ">=1",
    "backtranslate.max_per_document": ">=1",
    "backtranslate.min_chars": ">=0",
    "backtranslate.temperature": ">=0",
    "backtranslate.top_p": "(0,1]",
    "backtranslate.rewrite_temperature": ">=0",
    "backtranslate.curation_temperature": ">=0",
    "backtranslate.backward_steps": ">=1",
    "backtranslate.seed_steps": ">=1",
    "backtranslate.finetune_steps": ">=1",
    "backtranslate.report_samples": ">=0",
    "backtranslate.keep_fraction": "(0,1]",
}
_MISSING = object()


def validate(recipe: Recipe) -> None:
    """Cross-field checks that a type alone cannot express; resolves ``data.overlong: auto``.

    Every error is one line naming the recipe file and the dotted key, what was found and what is
    expected: choices (``_CHOICES``), numeric ranges (``_RANGES``), custom tokens, LoRA modules."""
    src = recipe.source
    if recipe.data.overlong == "auto":  # recorded resolved, so a run's manifest says what it did
        recipe.data.overlong = "chunk" if recipe.data.kind in ("text", "labelled") else "truncate"
    for dotted, choices in _CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(recipe, section), key)
        if value not in choices:
            raise ConfigError(f"{src}: {dotted} = {value!r}; expected one of {list(choices)}")
    for dotted, rule in _RANGES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(recipe, section, None), key, _MISSING)
        if value is None or value is _MISSING or isinstance(value, bool):
            continue
        problem = range_problem(value, rule)
        if problem:
            optional = type(None) in typing.get_args(typing.get_type_hints(type(getattr(recipe, section)))[key])
            hint = " (or null)" if optional else ""
            raise ConfigError(f"{src}: {dotted} = {value!r}; {problem}{hint}")
    recipe.model.check(src, recipe.lora.enabled)
    _check_tokens(recipe.tokens, src)
    _check_lora(recipe.lora, src)
    _check_engine(recipe.train, src)
    if not (recipe.save.merged or (recipe.save.adapter and recipe.lora.enabled)):
        raise ConfigError(f"{src}: save.merged = false" + (" and save.adapter = false" if recipe.lora.enabled else
                          " without lora.enabled (the adapter exists only under LoRA)") + ": nothing would be saved")
    if not recipe.save.merged and recipe.model.config:  # the adapter alone is loaded onto model.name again
        raise ConfigError(f"{src}: save.merged = false with model.config overrides: the adapter's base "
                          "could not be rebuilt from model.name when the folder is loaded; set save.merged: true "
                          "(or drop the overrides)")
    betas = recipe.train.betas
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ConfigError(f"{src}: train.betas = {betas!r}; expected two numbers in [0,1), e.g. [0.9, 0.999]")
    if recipe.data.kind == "epe" and (recipe.epe is None or not recipe.epe.sidecar):
        raise ConfigError(f"{src}: data.kind = epe needs epe.sidecar (the annotation file)")
    if recipe.conditional and recipe.conditional.threshold is None and recipe.conditional.misaligned_fraction is None:
        raise ConfigError(f"{src}: conditional needs threshold or misaligned_fraction")
    if recipe.backtranslate is not None:
        recipe.backtranslate.check(src)


def _check_engine(t: TrainConfig, src: str) -> None:
    """``train.strategy`` with ``train.deepspeed`` and the precision (ctrltok.training.engines)."""
    if t.deepspeed and t.strategy != "deepspeed":
        raise ConfigError(f"{src}: train.deepspeed names a DeepSpeed config but train.strategy = {t.strategy!r}; "
                          "set train.strategy: deepspeed (or drop train.deepspeed)")
    if t.strategy == "fsdp2" and t.precision == "fp16":
        raise ConfigError(f"{src}: train.strategy = fsdp2 with train.precision = fp16 needs a sharded gradient scaler, "
                          "which ctrltok does not run; use bf16 (or fp32)")


def _check_tokens(tokens: TokensConfig, src: str) -> None:
    def init_ok(value: str | None) -> bool:
        return value is None or value in INITS or (value.startswith("copy:") and len(value) > len("copy:"))

    if not init_ok(tokens.init):
        raise ConfigError(f"{src}: tokens.init = {tokens.init!r}; expected one of {list(INITS)} or copy:<token>")
    for i, c in enumerate(tokens.custom):
        where = f"{src}: tokens.custom[{i}]"
        if not c.token.strip():
            raise ConfigError(f"{where}.token is empty; expected the token's spelling, e.g. '<|mine|>'")
        if c.role not in CUSTOM_ROLES:
            raise ConfigError(f"{where}.role = {c.role!r}; expected one of {list(CUSTOM_ROLES)}")
        if not init_ok(c.init):
            raise ConfigError(f"{where}.init = {c.init!r}; expected one of {list(INITS)} or copy:<token>")


def _check_lora(lora: LoraConfig, src: str) -> None:
    modules = lora.target_modules
    if not modules or not all(isinstance(m, str) and m.strip() for m in modules):
        raise ConfigError(f"{src}: lora.target_modules = {modules!r}; expected module names (q_proj, v_proj, ...) "
                          f"or {ALL_LINEAR}")
    if ALL_LINEAR in modules and len(modules) > 1:
        raise ConfigError(f"{src}: lora.target_modules = {modules!r}; {ALL_LINEAR} already means every linear "
                          "layer: give it alone or list module names")
