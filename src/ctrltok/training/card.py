"""The model card (``README.md``) and the loss-curve PNG written beside a saved checkpoint.

``train.save_final`` calls both after the model, tokenizer and ``ctrltok.json`` manifest are on
disk::

    plot_curves(out / "metrics.jsonl", out / "loss_curves.png")
    write_card(out, manifest)              # -> out / "README.md"

The card follows the layout of the seed model cards (seed 000 above all): YAML front matter, a
title, Details, the tokens added with their ids, the named chat templates and how to select one
(the trained one is the default), where control tokens in user text stay text and where they
cannot, the data, the recipe, the hyper-parameters, the LoRA adapter and how to load it (beside
the merged model, or alone under ``save.merged: false``), evaluation results and notes for users. Its
text lives in the package template ``templates/model_card.md.jinja``; this module only gathers
facts into a plain context dict (:func:`card_context`) from the manifest and from the files in the
checkpoint (``config.json``, ``generation_config.json``, ``tokenizer.json``, the safetensors
header, the saved chat templates). Every fact is optional: a key missing from the manifest or a
file missing from the folder drops the line that needed it, never the card.

The front matter is ``huggingface_hub``'s :class:`~huggingface_hub.ModelCardData` (``base_model``,
``datasets``, ``license``, ``language``, ``tags``, the held-out results as ``model-index``), so the
Hub reads it as it reads any card. Nothing of the training machine reaches the card: absolute and
home paths in the recipe's values are cut to their file names (:func:`scrub`), the recipe is named by
its file name, and data sources by hub id, ``ctrltok:`` name or file name.

The curves live in :mod:`ctrltok.training.curves` (imported here, where ``save_final`` finds them).

A run of four or more tokens that differ only in their digits and share their roles (EPE's 35
``<charter_X.Y>`` tokens) is shown as one row with its id range, as is the filler padding.
"""

from __future__ import annotations

import json
import re
import struct
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import (
    EvalResult,
    ModelCardData,
    metadata_load,
    try_to_load_from_cache,
)
from jinja2 import Environment, StrictUndefined

from ctrltok.core.cache import ALIASES
from ctrltok.core.models import (
    ADAPTER,
    ADAPTER_CONFIG,
    adapter_only,
    adapter_rows,
)
from ctrltok.core.templates import (
    DEFAULT,
    default_template_name,
    saved_templates,
    trained_source,
)
from ctrltok.training.curves import plot_curves, read_metrics

__all__ = ["card_context", "plot_curves", "read_metrics", "render_card", "token_rows", "write_card"]

CARD = "README.md"
CARD_TEMPLATE = "model_card.md.jinja"
GROUP_MIN = 4  # runs at least this long collapse into one table row
# The embedded default is a converted copy of this hub model (see models.py), and its card's facts.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_META = {"license": "apache-2.0", "language": ["en"]}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TEMPLATE_DOC = re.compile(r"\{#-?\s*ctrltok template:\s*[\w-]+\.\s*(.*?)\s*-?#\}", re.S)


# -- reading what is on disk ---------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


_ABS_PATH = re.compile(r"(?<![\w:/.~])(?:~|[A-Za-z]:)?[/\\](?:[^/\\\s,;'\"?&=]+[/\\])*([^/\\\s,;'\"?&=]+)")


def scrub(value: Any) -> Any:
    """``value`` with every absolute or home path (``/home/u/data/x.jsonl``, ``~/x``) cut to its file
    name, inside strings, lists and mappings: nothing of the machine that trained reaches the card."""
    if isinstance(value, str):
        return _ABS_PATH.sub(lambda m: m.group(1), value)
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v) for v in value]
    return value


def _shapes(path: Path) -> dict[str, list[int]] | None:
    """Tensor name -> shape of a safetensors file, from its header only (None when unreadable)."""
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
    except (OSError, ValueError, struct.error):
        return None
    return {name: [int(d) for d in info.get("shape", [])] for name, info in header.items()
            if name != "__metadata__" and isinstance(info, dict)}


def count_parameters(out_dir: Path) -> int | None:
    """Parameters stored in the checkpoint's safetensors files, read from their headers only."""
    total, found = 0, False
    for path in sorted(Path(out_dir).glob("*.safetensors")):
        for shape in (_shapes(path) or {}).values():
            numel = 1
            for d in shape:
                numel *= d
            total += numel
            found = True
    return total if found else None


def adapter_embedding(out_dir: Path) -> int | None:
    """The rows of the resized embedding the run's LoRA adapter carries (:func:`adapter_rows`); None
    when it holds none (the run added no rows), or there is no readable adapter (the line is dropped)."""
    try:
        return adapter_rows(Path(out_dir) / ADAPTER)
    except (OSError, ValueError):
        return None


def _human(n: int | None) -> str | None:
    if n is None:
        return None
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}".replace(".0" + unit, unit)
    return str(n)


def _template_use(name: str, source: str) -> str:
    m = _TEMPLATE_DOC.search(source or "")
    if m:
        return m.group(1)
    if name == "model":
        return "the base model's own chat template"
    return "custom template"


def _token_names(out_dir: Path, manifest: dict) -> dict[int, str]:
    names: dict[int, str] = {}
    for tok in _as_list(_read_json(Path(out_dir) / "tokenizer.json").get("added_tokens")):
        if isinstance(tok, dict) and "id" in tok and "content" in tok:
            names[int(tok["id"])] = tok["content"]
    for tok in _tokens(manifest):
        if tok.get("id") is not None:
            names[int(tok["id"])] = tok.get("text", "?")
    return names


# -- the tokens table ----------------------------------------------------------------------
def _tokens(manifest: dict) -> list[dict]:
    return [t for t in _as_list(manifest.get("tokens")) if isinstance(t, dict) and "text" in t]


def _roles(tok: dict) -> str:
    roles = [r for r in ("supervised", "stop", "blocked") if tok.get(r)]
    return ", ".join(roles) if roles else "marker (input only)"


def _family(text: str) -> str:
    return re.sub(r"\d+(?:\.\d+)*", "#", text)


def token_rows(manifest: dict, default_init: str | None = None) -> list[dict]:
    """Rows of the tokens table: one per token, runs of same-shaped tokens and the fillers collapsed."""
    rows: list[dict] = []
    toks = _tokens(manifest)
    i = 0
    while i < len(toks):
        tok = toks[i]
        j = i + 1
        fam = _family(tok["text"])
        if fam != tok["text"]:
            while (j < len(toks) and _family(toks[j]["text"]) == fam and _roles(toks[j]) == _roles(tok)
                   and toks[j].get("id") is not None and tok.get("id") is not None
                   and toks[j]["id"] == toks[j - 1]["id"] + 1):
                j += 1
        run = toks[i:j]
        if len(run) >= GROUP_MIN:
            first, last = run[0], run[-1]
            rows.append({
                "token": f"{first['text']} … {last['text']}",
                "id": f"{first['id']}–{last['id']}",
                "purpose": f"{len(run)} tokens, e.g. {first.get('purpose', '')}",
                "roles": _roles(first),
                "init": first.get("init") or default_init or "",
                "count": len(run),
            })
        else:
            run = [tok]
            j = i + 1
            purpose = tok.get("purpose", "")
            if tok.get("reuse"):
                purpose += " (the tokenizer's existing token, reused)"
            rows.append({"token": tok["text"], "id": str(tok.get("id", "?")), "purpose": purpose,
                         "roles": _roles(tok), "init": "existing row" if tok.get("reuse") else
                         (tok.get("init") or default_init or ""), "count": 1})
        i = j
    fillers = _as_list(manifest.get("filler_ids"))
    if len(fillers) == 2:
        n = int(fillers[1]) - int(fillers[0]) + 1
        rows.append({"token": "<|ctrltok_filler_0|> …", "id": f"{fillers[0]}–{fillers[1]}",
                     "purpose": f"{n} filler tokens padding the vocabulary to {manifest.get('vocab_rows', '?')} rows",
                     "roles": "blocked", "init": "mean", "count": n})
    return rows


# -- the context ---------------------------------------------------------------------------
def base_model_id(name: str | None) -> str | None:
    """A hub id for the front matter's ``base_model``, or None for a local path."""
    if not name:
        return None
    if str(name).lower() in ALIASES:
        return EMBEDDED_HUB_ID
    if _HUB_ID.match(str(name)) and not Path(str(name)).exists():
        return str(name)
    return None


_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "webdataset", "imagefolder", "audiofolder"}


def _source_names(value: Any) -> list[str]:
    """The sources of a ``data.train`` / ``data.eval`` value (a string, a mapping, or a list of both)
    as strings: ``hf:NAME`` for hub datasets, the path or ``ctrltok:`` name otherwise."""
    out: list[str] = []
    for item in _as_list(value):
        if isinstance(item, dict):
            if item.get("hf"):
                out.append(f"hf:{item['hf']}")
            elif item.get("path"):
                out.append(str(item["path"]))
        elif item is not None:
            out.append(str(item))
    return out


def hub_datasets(data: dict) -> list[str]:
    """Hub dataset ids among a recipe's data sources (``hf:NAME[:CONFIG][?...]`` or ``{hf: NAME}``),
    for the front matter's ``datasets``; local files and shipped data are not hub datasets."""
    found: list[str] = []
    for src in _source_names(data.get("train")) + _source_names(data.get("eval")):
        if not src.startswith("hf:"):
            continue
        name = src[3:].split("?")[0]
        name = name.split(":")[0]
        if name and name not in _BUILDERS and name not in found:
            found.append(name)
    return found


def base_model_meta(name: str | None) -> dict:
    """The base model's ``license`` and ``language``, read from its card when one is at hand (the
    embedded model's facts, a local folder's README.md, a hub model's README.md in the local cache);
    nothing is downloaded."""
    if not name:
        return {}
    if str(name).lower() in ALIASES:
        return dict(EMBEDDED_META)
    readme: str | Path | None = Path(str(name)) / "README.md"
    if not Path(readme).is_file():
        readme = None
        if _HUB_ID.match(str(name)):
            try:
                cached = try_to_load_from_cache(str(name), "README.md")
            except (ValueError, OSError):
                cached = None
            readme = cached if isinstance(cached, str) else None
    if readme is None:
        return {}
    try:
        meta = metadata_load(readme) or {}
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return {k: meta[k] for k in ("license", "language") if meta.get(k)}


_METRIC_NAMES = {"loss": "held-out loss (cross-entropy per supervised token)",
                 "eot_stop_rate": "end-of-turn stop rate"}


def eval_results(manifest: dict, data: dict) -> list[EvalResult]:
    """The run's final held-out numbers as model-index entries: the ``eval_*`` values of the summary
    and, for a before/after evaluation, the ``after`` (else last) column; numbers only."""
    summary = manifest.get("summary") if isinstance(manifest.get("summary"), dict) else {}
    evaluation = manifest.get("evaluation") if isinstance(manifest.get("evaluation"), dict) else {}
    nested = [v for v in evaluation.values() if isinstance(v, dict)]
    final = evaluation.get("after") if isinstance(evaluation.get("after"), dict) else (nested[-1] if nested else {})
    values: dict[str, float] = {}
    for source in (summary, {k: v for k, v in evaluation.items() if not isinstance(v, dict)}, final):
        for key, value in source.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and (
                    key.startswith("eval_") or source is not summary) and not key.endswith("_targets"):
                values[key.removeprefix("eval_")] = float(value)
    if not values:
        return []
    sources = scrub(_source_names(data.get("eval")) or _source_names(data.get("train")))
    hub = hub_datasets({"train": sources}) if len(sources) == 1 else []  # one hub dataset: its id is the type
    named = hub[0] if hub else (", ".join(sources) or "training data")
    dataset_name = named if data.get("eval") else f"held-out split of {named}"
    return [EvalResult(task_type="text-generation", dataset_type=hub[0] if hub else "held-out",
                       dataset_name=dataset_name, dataset_split=None if data.get("eval") else "held-out",
                       metric_type=key, metric_value=value, metric_name=_METRIC_NAMES.get(key, key))
            for key, value in values.items()]


def card_metadata(title: str, tags: list[str], base_name: str | None, data: dict, manifest: dict) -> ModelCardData:
    """The card's front matter, through ``huggingface_hub``'s :class:`ModelCardData`."""
    meta = base_model_meta(base_name)
    results = eval_results(manifest, data)
    return ModelCardData(library_name="transformers", pipeline_tag="text-generation", tags=tags,
                         base_model=base_model_id(base_name), datasets=hub_datasets(data) or None,
                         license=meta.get("license"), language=meta.get("language"),
                         model_name=title, eval_results=results or None)


def _flat(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    if isinstance(d, dict):
        for k, v in d.items():
            out.extend(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)])
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value) if value else "none"
    if value is None:
        return "none"
    return str(value)


def _evaluation(manifest: dict) -> dict:
    """{"columns": [...], "rows": [[metric, value per column], ...]} from summary + evaluation."""
    summary = manifest.get("summary") if isinstance(manifest.get("summary"), dict) else {}
    final = {k: v for k, v in summary.items() if k.startswith("eval_") and not isinstance(v, (dict, list))}
    evaluation = manifest.get("evaluation") if isinstance(manifest.get("evaluation"), dict) else {}
    nested = {k: v for k, v in evaluation.items() if isinstance(v, dict)}
    if nested:  # {"before": {...}, "after": {...}}: one column per run
        columns = list(nested)
        metrics = []
        for run in nested.values():
            metrics += [k for k, v in run.items() if not isinstance(v, (dict, list)) and k not in metrics]
        rows = [[m, *[_fmt(nested[c].get(m, "")) if m in nested[c] else "" for c in columns]] for m in metrics]
        flat_rest = {k: v for k, v in evaluation.items() if not isinstance(v, (dict, list))}
        rows += [[k, _fmt(v), *[""] * (len(columns) - 1)] for k, v in flat_rest.items()]
        final_rows = [[k, _fmt(v)] for k, v in final.items()]
        return {"columns": columns, "rows": rows, "final": final_rows}
    values = {**final, **{k: v for k, v in evaluation.items() if not isinstance(v, list)}}
    return {"columns": ["value"], "rows": [[k, _fmt(v)] for k, v in values.items()], "final": []}


def card_context(out_dir: Path, manifest: dict) -> dict:
    """Every fact the card template prints, gathered from the manifest and the checkpoint's files.

    Long on purpose: it is one flat gathering of the template's variables, read beside
    ``model_card.md.jinja``; split into helpers, a reader would chase each field across functions.
    """
    out_dir = Path(out_dir)
    manifest = manifest if isinstance(manifest, dict) else {}
    values = manifest.get("recipe_values") if isinstance(manifest.get("recipe_values"), dict) else {}
    model_v = values.get("model") if isinstance(values.get("model"), dict) else {}
    tokens_v = values.get("tokens") if isinstance(values.get("tokens"), dict) else {}
    data_v = values.get("data") if isinstance(values.get("data"), dict) else {}
    train_v = values.get("train") if isinstance(values.get("train"), dict) else {}
    lora_v = values.get("lora") if isinstance(values.get("lora"), dict) else {}
    summary = manifest.get("summary") if isinstance(manifest.get("summary"), dict) else {}
    config = _read_json(out_dir / "config.json")
    gen = _read_json(out_dir / "generation_config.json")
    names = _token_names(out_dir, manifest)
    toks = _tokens(manifest)

    vocab_rows = manifest.get("vocab_rows") or config.get("vocab_size")
    new_ids = [int(t["id"]) for t in toks if not t.get("reuse") and t.get("id") is not None]
    fillers = [int(x) for x in _as_list(manifest.get("filler_ids"))]
    firsts = new_ids + fillers[:1]
    base_vocab = min(firsts) if firsts else None
    precision = config.get("dtype") or config.get("torch_dtype") or model_v.get("dtype")
    architecture = (_as_list(config.get("architectures")) or [None])[0]
    tied = config.get("tie_word_embeddings")
    params = count_parameters(out_dir)

    eos = [int(i) for i in _as_list(gen.get("eos_token_id"))]
    suppressed = [int(i) for i in _as_list(gen.get("suppress_tokens"))]
    if not gen:  # no generation_config.json: say what the manifest implies
        eos = [int(t["id"]) for t in toks if t.get("stop") and t.get("id") is not None]
        suppressed = [int(t["id"]) for t in toks if t.get("blocked") and t.get("id") is not None]
        if len(fillers) == 2:
            suppressed += list(range(fillers[0], fillers[1] + 1))
    filler_range = None
    if len(fillers) == 2 and fillers[0] in set(suppressed) and fillers[1] in set(suppressed):
        filler_range = {"first": fillers[0], "last": fillers[1], "n": fillers[1] - fillers[0] + 1}
    blocked = [{"name": names.get(i, str(i)), "id": i} for i in suppressed
               if not (len(fillers) == 2 and fillers[0] <= i <= fillers[1])]

    templates = saved_templates(out_dir)
    trained = manifest.get("template")
    source = trained_source(trained, templates)
    if trained and trained not in templates and source not in templates.values():
        templates[trained] = source or ""
    default_name = default_template_name(templates)
    template_rows = [{"name": n, "trained": n == trained or bool(source and s == source),
                      "use": (f"the default: what `apply_chat_template(messages)` renders when no template is named "
                              f"(the same text as `{default_name}`)" if n == DEFAULT and default_name != DEFAULT
                              else _template_use(n, s))}
                     for n, s in templates.items()]

    pack = summary.get("pack") if isinstance(summary.get("pack"), dict) else {}
    if pack and "fill" not in pack and pack.get("tokens") is not None and pack.get("padding") is not None:
        total = pack["tokens"] + pack["padding"]
        pack = {**pack, "fill": pack["tokens"] / total if total else 0.0}
    skips = summary.get("skips") if isinstance(summary.get("skips"), dict) else {}

    hyper = [(k, _fmt(scrub(v))) for k, v in train_v.items() if k not in ("report_to",) and v not in (None, [], "")]
    processes = summary.get("processes")
    if train_v.get("micro_batch_size") and train_v.get("grad_accum"):
        eff = int(train_v["micro_batch_size"]) * int(train_v["grad_accum"]) * int(processes or 1)
        hyper.append(("effective batch (rows per optimizer step)", str(eff)))
    if summary.get("steps") is not None:
        hyper.append(("optimizer steps run", str(summary["steps"])))
    if processes is not None:
        hyper.append(("processes", str(processes)))
    lora = [(k, _fmt(v)) for k, v in lora_v.items() if k != "enabled"] if lora_v.get("enabled") else []

    base_name = model_v.get("name")
    tags = ["ctrltok", "control-tokens"]
    for tag in (manifest.get("recipe"), *_as_list(tokens_v.get("presets")),
                (architecture or "").replace("ForCausalLM", "").lower() or None, precision):
        if tag and str(tag) not in tags:
            tags.append(str(tag))
    title = Path(out_dir).resolve().name
    data = {k: _fmt(scrub(data_v[k])) for k in ("kind", "eval_fraction", "template", "loss_on", "max_length",
                                                "packing", "overlong", "on_error", "limit") if data_v.get(k) is not None}
    for k in ("train", "eval"):  # sources by name: a hub id, `ctrltok:NAME`, a local file's name
        if _source_names(data_v.get(k)):
            data[k] = ", ".join(scrub(_source_names(data_v.get(k))))
    data = {k: data[k] for k in ("kind", "train", "eval", "eval_fraction", "template", "loss_on", "max_length",
                                 "packing", "overlong", "on_error", "limit") if k in data}
    source = values.get("source")
    recipe_values = {k: v for k, v in values.items() if k != "source"}
    control = [t["text"] for t in toks if not t.get("reuse")]
    example = manifest.get("end_of_turn") if manifest.get("end_of_turn") in control else (control or [None])[0]
    return {
        "front_matter": card_metadata(title, tags, base_name, data_v, manifest).to_yaml(),
        "title": title,
        "tags": tags,
        "base_model": base_model_id(base_name),
        "base_name": scrub(base_name),
        "recipe": manifest.get("recipe"),
        "recipe_file": Path(str(source).replace("\\", "/")).name if source else None,
        "recipe_yaml": yaml.safe_dump(scrub(json.loads(json.dumps(recipe_values, default=str))), sort_keys=False,
                                      allow_unicode=True).strip() if recipe_values else None,
        "default_template": default_name,
        "default_is_trained": any(r["trained"] for r in template_rows if r["name"] == DEFAULT),
        "control_example": example,
        "control_example_id": next((int(t["id"]) for t in toks if t["text"] == example and t.get("id") is not None),
                                   None),
        "architecture": architecture,
        "parameters": _human(params),
        "precision": precision,
        "vocab_rows": vocab_rows,
        "base_vocab": base_vocab,
        "n_new": len(new_ids),
        "tied": tied,
        "token_rows": token_rows(manifest, tokens_v.get("init")),
        "pad_to_multiple_of": tokens_v.get("pad_to_multiple_of"),
        "templates": template_rows,
        "trained_template": trained,
        "end_of_turn": manifest.get("end_of_turn"),
        "data": data,
        "records": summary.get("records"),
        "skips": skips,
        "pack": {k: _fmt(v) for k, v in pack.items()},
        "hyper": hyper,
        "lora": lora,
        "evaluation": _evaluation(manifest),
        "stops": [{"name": names.get(i, str(i)), "id": i} for i in eos],
        "blocked": blocked,
        "filler_range": filler_range,
        "curves": (out_dir / "loss_curves.png").exists(),
        "metrics": (out_dir / "metrics.jsonl").exists(),
        "head": (out_dir / "head.safetensors").exists() or any(out_dir.glob("*head*.safetensors")),
        "merged": not adapter_only(out_dir),  # save.merged: false leaves the adapter alone
        "adapter": (out_dir / ADAPTER / ADAPTER_CONFIG).is_file(),
        "adapter_embedding": adapter_embedding(out_dir),
    }


# -- rendering -----------------------------------------------------------------------------
def _code(value: Any) -> str:
    """Inline code (outside tables)."""
    return "`" + str(value).replace("`", "'") + "`"


def _tcode(value: Any) -> str:
    """Inline code that is safe inside a Markdown table cell (pipes escaped)."""
    return _code(value).replace("|", "\\|")


_TOKENISH = re.compile(r"(?<!`)(<\|[^|<>\s`]+\|>|<[A-Za-z_][\w.]*>)(?!`)")


def _cell(value: Any) -> str:
    """Prose for a table cell: token spellings as code (Markdown would swallow ``<assistant>`` as
    HTML), pipes escaped, one line."""
    text = _TOKENISH.sub(lambda m: "`" + m.group(1) + "`", str(value).replace("\n", " "))
    return text.replace("|", "\\|")


def _prose(value: Any) -> str:
    """Like :func:`_cell` outside tables: token spellings as code, pipes left alone."""
    return _TOKENISH.sub(lambda m: "`" + m.group(1) + "`", str(value))


def _yaml_str(value: Any) -> str:
    return json.dumps(str(value))  # a JSON string is a valid YAML scalar


def render_card(out_dir: Path, manifest: dict) -> str:
    """The card's Markdown text for the checkpoint in ``out_dir``."""
    env = Environment(undefined=StrictUndefined, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
                      autoescape=False)
    env.filters.update(code=_code, tcode=_tcode, cell=_cell, prose=_prose, yaml=_yaml_str)
    source = (resources.files("ctrltok") / "templates" / CARD_TEMPLATE).read_text(encoding="utf-8")
    text = env.from_string(source).render(**card_context(out_dir, manifest))
    return re.sub(r"\n{3,}", "\n\n", text)


def write_card(out_dir: Path, manifest: dict) -> Path:
    """Write ``out_dir/README.md`` from the manifest (the ``ctrltok.json`` dict) and the saved files."""
    path = Path(out_dir) / CARD
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(render_card(out_dir, manifest), encoding="utf-8")
    tmp.replace(path)
    return path
