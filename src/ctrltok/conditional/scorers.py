"""Scorers: text -> a badness score in [0, 1] (higher = worse), behind one interface.

Conditional training (Korbak et al. 2023) labels every sentence by a scorer's verdict, so the
scorer is part of the data's provenance: the PHF code trained and evaluated with different
Detoxify checkpoints and nothing in the data said so. Here every scorer carries a ``name``, a
``version`` and its ``settings``, and :meth:`Scorer.provenance` is written beside every labelled
file.

Scorers by name (:func:`get_scorer`):

* ``profanity`` (default): ``alt-profanity-check``, a TF-IDF vectoriser + calibrated linear SVM
  shipped inside the wheel (no download). We call its model's ``predict_proba`` directly, which
  gives the same numbers as ``profanity_check.predict_prob`` without its per-row Python loop.
* ``detoxify`` / ``detoxify:original|unbiased|multilingual``: Detoxify's ``toxicity`` output,
  the seed's scorer. Only when the ``detoxify`` package and a local checkpoint exist: ctrltok
  never downloads weights; the error says how to provide them.
* ``package.module:function``: any callable ``list[str] -> list[float]``.

Usage::

    scorer = get_scorer("profanity")
    scorer.score(["a sentence", "another"])   # -> [0.03, 0.01]
    scorer.provenance()                       # -> {"name": ..., "version": ..., "settings": ...}
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DEFAULT_SCORER = "profanity"


class ScorerError(ValueError):
    """A scorer could not be built, or returned something that is not one score per text."""


def _pkg_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _sha256_short(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


class Scorer:
    """One scorer. Subclasses implement :meth:`_score`; :meth:`score` validates its output.

    ``default_threshold`` is the threshold used when the caller gives neither a threshold nor a
    target misaligned fraction (``None``: the scorer has no meaningful default and the caller
    must choose).
    """

    name: str = "scorer"
    version: str = "unknown"
    default_threshold: float | None = None

    def __init__(self) -> None:
        self.settings: dict[str, Any] = {}

    def _score(self, texts: list[str]) -> Sequence[Any]:
        raise NotImplementedError

    def score(self, texts: list[str], sources: Sequence[str] | None = None) -> list[float]:
        """Scores for ``texts``, one float in [0, 1] each; higher = worse.

        ``sources`` (one label per text, e.g. ``"docs.jsonl:12 segment 3"``) is only used to name
        the offending record when the scorer returns an invalid value.
        """
        if not texts:
            return []
        try:
            raw = self._score(list(texts))
        except Exception as e:  # a crashing user scorer is reported like an invalid one
            where = f" (first: {sources[0]})" if sources else ""
            raise ScorerError(f"scorer {self.name!r} failed on a batch of {len(texts)} texts{where}: "
                              f"{type(e).__name__}: {e}") from e
        return validate_scores(raw, len(texts), self.name, sources)

    def provenance(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "settings": dict(self.settings)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, version={self.version!r})"


def validate_scores(raw: Any, n: int, scorer: str, sources: Sequence[str] | None = None) -> list[float]:
    """Turn a scorer's raw output into ``n`` finite floats in [0, 1], or raise naming the record."""
    try:
        values = list(raw)
    except TypeError:
        raise ScorerError(
            f"scorer {scorer!r} returned {type(raw).__name__}, expected a list of {n} floats"
        ) from None
    if len(values) != n:
        raise ScorerError(
            f"scorer {scorer!r} returned {len(values)} scores for {n} texts; it must return exactly "
            "one score per text, in order"
        )
    out: list[float] = []
    for i, v in enumerate(values):
        where = sources[i] if sources is not None else f"text {i}"
        # bool is an int subclass; a scorer returning True/False is almost certainly a bug.
        if isinstance(v, bool) or not _is_number(v):
            raise ScorerError(f"scorer {scorer!r} returned {v!r} ({type(v).__name__}) for {where}; expected a float")
        f = float(v)
        if math.isnan(f) or math.isinf(f):
            raise ScorerError(f"scorer {scorer!r} returned {f} for {where}; expected a finite float in [0, 1]")
        if not 0.0 <= f <= 1.0:
            raise ScorerError(f"scorer {scorer!r} returned {f} for {where}; expected a float in [0, 1]")
        out.append(f)
    return out


def _is_number(v: Any) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    # numpy scalars and 0-d arrays convert; strings like "0.5" also would, but a string score is a bug.
    return not isinstance(v, (str, bytes))


class ProfanityScorer(Scorer):
    """``alt-profanity-check``: P(offensive) from a TF-IDF + calibrated LinearSVC model."""

    name = "profanity"
    # The classifier's own decision boundary: ``profanity_check.predict`` says 1 above it.
    default_threshold = 0.5

    def __init__(self) -> None:
        super().__init__()
        try:
            import profanity_check.profanity_check as pc
        except ImportError as e:  # pragma: no cover - it is a dependency
            raise ScorerError(
                "scorer 'profanity' needs the 'alt-profanity-check' package: pip install alt-profanity-check"
            ) from e
        self._vectorizer = pc.vectorizer
        self._model = pc.model
        data = Path(pc.__file__).parent / "data"
        self.version = f"alt-profanity-check {_pkg_version('alt-profanity-check')}"
        self.settings = {
            "model": "TfidfVectorizer + CalibratedClassifierCV(LinearSVC)",
            "output": "predict_proba[:, 1] (P(offensive))",
            "model_sha256": _sha256_short([data / "vectorizer.joblib", data / "model.joblib"]),
            "scikit_learn": _pkg_version("scikit-learn"),
        }

    def _score(self, texts: list[str]) -> Sequence[Any]:
        return self._model.predict_proba(self._vectorizer.transform(texts))[:, 1].tolist()


_DETOXIFY_FILES = {"original": "toxic_original", "unbiased": "toxic_debiased", "multilingual": "multilingual_debiased"}


class DetoxifyScorer(Scorer):
    """Detoxify's ``toxicity`` head (the seed's scorer), from a local checkpoint only.

    The checkpoint is ``checkpoint=`` or ``$CTRLTOK_DETOXIFY_CHECKPOINT``, else the file torch.hub
    would have cached (``$TORCH_HOME/hub/checkpoints/toxic_original-*.ckpt``). The underlying
    Hugging Face model config/tokenizer (e.g. ``bert-base-uncased``) must be in the local HF cache
    or given as ``hf_config=DIR``.
    """

    name = "detoxify"
    default_threshold = 0.00056  # seed 001 (Korbak et al. 2023), on Detoxify 'original' scores

    def __init__(self, model_type: str = "original", checkpoint: str | None = None,
                 hf_config: str | None = None, device: str = "cpu", batch_size: int = 64) -> None:
        super().__init__()
        if model_type not in _DETOXIFY_FILES:
            raise ScorerError(f"detoxify model type {model_type!r} unknown; expected one of {sorted(_DETOXIFY_FILES)}")
        try:
            from detoxify import Detoxify
        except ImportError:
            raise ScorerError(
                "scorer 'detoxify' needs the 'detoxify' package, which is not installed: "
                "pip install detoxify (or ctrltok[detoxify]), then provide its checkpoint locally"
            ) from None
        ckpt = checkpoint or os.environ.get("CTRLTOK_DETOXIFY_CHECKPOINT") or _cached_detoxify(model_type)
        if ckpt is None or not Path(ckpt).is_file():
            raise ScorerError(
                f"scorer 'detoxify' ({model_type}): no local checkpoint"
                + (f" at {ckpt}" if ckpt else "")
                + ". ctrltok never downloads weights. Download "
                f"{_DETOXIFY_FILES[model_type]}-*.ckpt from the Detoxify releases "
                "(https://github.com/unitaryai/detoxify/releases) on a machine with network, then set "
                "CTRLTOK_DETOXIFY_CHECKPOINT=/path/to/file.ckpt or pass checkpoint=PATH"
            )
        try:
            self._model = Detoxify(model_type, checkpoint=str(ckpt), device=device,
                                   huggingface_config_path=hf_config)
        except Exception as e:
            raise ScorerError(
                f"scorer 'detoxify' could not load {ckpt}: {e}. If the base model config/tokenizer is "
                "missing from the Hugging Face cache, pass hf_config=DIR with a local copy"
            ) from e
        self.batch_size = batch_size
        self.version = f"detoxify {_pkg_version('detoxify')}"
        self.settings = {"model_type": model_type, "checkpoint": Path(ckpt).name, "output": "toxicity",
                         "checkpoint_sha256": _sha256_short([Path(ckpt)])}

    def _score(self, texts: list[str]) -> Sequence[Any]:
        out: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            out.extend(self._model.predict(texts[i:i + self.batch_size])["toxicity"])
        return out


def _cached_detoxify(model_type: str) -> str | None:
    hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"
    if not hub.is_dir():
        return None
    found = sorted(hub.glob(f"{_DETOXIFY_FILES[model_type]}-*.ckpt"))
    return str(found[0]) if found else None


class CallableScorer(Scorer):
    """A user function ``list[str] -> list[float]`` named ``module:function``."""

    default_threshold = None

    def __init__(self, spec: str, fn: Callable[[list[str]], Sequence[float]] | None = None) -> None:
        super().__init__()
        self.name = spec
        if fn is None:
            fn = _import_callable(spec)
        self._fn = fn
        module = inspect.getmodule(fn)
        root = (module.__name__.split(".")[0] if module else spec.split(":")[0].split(".")[0])
        mod_version = getattr(module, "__version__", None) or _pkg_version(root)
        self.version = f"{root} {mod_version}"
        self.settings = {"callable": spec}
        src = inspect.getsourcefile(fn) if module else None
        if src and Path(src).is_file():
            # The source hash makes an edited-but-unversioned scorer visible in the provenance.
            self.settings["source_sha256"] = _sha256_short([Path(src)])

    def _score(self, texts: list[str]) -> Sequence[Any]:
        return self._fn(texts)


def _import_callable(spec: str) -> Callable[[list[str]], Sequence[float]]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ScorerError(f"scorer {spec!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ScorerError(f"scorer {spec!r}: cannot import module {module_name!r}: {e}") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ScorerError(f"scorer {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ScorerError(f"scorer {spec!r}: {attr!r} is not callable")
    return obj


SCORERS: dict[str, Callable[..., Scorer]] = {
    "profanity": ProfanityScorer,
    "detoxify": DetoxifyScorer,
}


def get_scorer(name: str | Scorer = DEFAULT_SCORER, **settings: Any) -> Scorer:
    """Build a scorer by name: ``profanity``, ``detoxify[:TYPE]`` or ``module:function``.

    A :class:`Scorer` instance is returned as is. ``settings`` go to the scorer's constructor
    (e.g. ``checkpoint=`` for Detoxify).
    """
    if isinstance(name, Scorer):
        return name
    if not isinstance(name, str) or not name:
        raise ScorerError(f"scorer name must be a non-empty string, got {name!r}")
    if name in SCORERS:
        return SCORERS[name](**settings)
    if name.startswith("detoxify:"):
        return DetoxifyScorer(model_type=name.split(":", 1)[1], **settings)
    if ":" in name:
        return CallableScorer(name)
    raise ScorerError(
        f"unknown scorer {name!r}; expected one of {sorted(SCORERS)}, 'detoxify:TYPE' or 'package.module:function'"
    )
