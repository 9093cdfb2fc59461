"""Which initialisation teaches a new control token fastest? (issue 16's init study)

Each new token's embedding (and output) row starts from ``tokens.init``: ``mvn`` (a draw from the
multivariate normal of the existing rows), ``mean``, ``mean_noise``, ``describe`` (the mean of the
embeddings of the token's description) or ``copy:<token>``. Two measurements, each over seeds:

* **EOT** (``recipes/eot-cpu.yaml``: SmolLM2-135M, LoRA with the new rows trained): after N
  optimizer steps, on the run's held-out split, the mean loss of the ``<EOT>`` token where it is the
  label (how sure the model is that a turn ends there) and how often ``<EOT>`` is the greedy choice
  there (teacher-forced: the stop decision greedy decoding makes once the reply is written); with
  ``--prompts N``, also the free-running greedy stop rate on N held-out prompts (slow on a CPU).
  Step 0 (the init alone, no training) is measured too.
* **Conditional** (SmolLM2-135M with the ``conditional`` preset, LoRA, N steps): documents labelled by
  their source, not by a scorer, so the study measures the init and not the scorer: clean Wikipedia
  sentences get ``<|aligned|>``, offensive tweets (Davidson et al. 2017, class "offensive") get
  ``<|misaligned|>``. The direction margin on held-out documents is
  ``[NLL(toxic | misaligned) - NLL(toxic | aligned)]`` subtracted from
  ``[NLL(clean | misaligned) - NLL(clean | aligned)]``, in nats per token; > 0 means the tokens steer
  the right way (aligned makes clean text likelier and toxic text less likely than misaligned does).
  It needs ``../shared/data`` (skipped without it).

    python bench/init_study.py [--steps 20] [--seeds 0 1 2] [--part eot conditional] [--set KEY=VALUE ...] [--out FILE]

Everything runs through the library (``train``, ``load_model``, ``build_examples``, ``generate``);
one JSON with every (part, init, seed) row is written to ``--out`` and a table of means and spreads
printed; rows are also appended to ``--out`` with ``.jsonl`` as each run ends, and a rerun with
the same settings skips the (part, init, seed) runs already there.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ctrltok.core.config import load_recipe, recipe_from_mapping
from ctrltok.core.models import load_model
from ctrltok.core.templates import get_template
from ctrltok.data.encode import build_examples
from ctrltok.evaluation.evaluate import load_conversations
from ctrltok.generation.generate import generate
from ctrltok.training.setup import prepare_model
from ctrltok.training.train import train

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
INITS = ["mvn", "mean", "mean_noise", "describe", "copy:<|im_end|>"]


@torch.no_grad()
def eot_scores(model, examples, eot_id: int) -> dict:
    """Teacher-forced, on held-out examples: the mean loss of ``<EOT>`` where it is the label, and the
    fraction of those places where ``<EOT>`` is the greedy choice (the stop decision greedy decoding
    makes when the reply has been written)."""
    nll, top, count = 0.0, 0, 0
    model.eval()
    for ex in examples:
        labels = torch.tensor(ex.labels[1:])
        at = labels == eot_id
        if not at.any():
            continue
        logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits[at], labels[at], reduction="sum"))
        top += int((logits[at].argmax(-1) == eot_id).sum())
        count += int(at.sum())
    return {"eot_loss": nll / max(count, 1), "eot_top1": top / max(count, 1), "n_eot": count}


def eot_measure(model, tok, recipe, prompts, max_new_tokens: int, n_eval: int) -> dict:
    eot_id = get_template("eot", tok).end_of_turn_id(tok)
    out = eot_scores(model, build_examples(recipe, tok).eval[:n_eval], eot_id)
    if prompts:  # free-running greedy replies: the stop rate a user sees (costly on a CPU)
        replies = generate(model, tok, prompts, "eot", max_new_tokens=max_new_tokens, temperature=0)
        out["stop_rate"] = sum(1 for r in replies if r["stopped"] and r["ids"] and r["ids"][-1] == eot_id) / len(replies)
    return out


def eot_runs(inits, seeds, steps, n_prompts, max_new_tokens, n_eval: int, work: Path, extra: list[str],
             log: RowLog) -> list[dict]:
    rows = []
    for seed in seeds:  # seed-major: a study cut short still compares every init
        for init in inits:
            if log.done("eot", init, seed):
                continue
            sets = [f"tokens.init={init}", f"train.seed={seed}", f"train.max_steps={steps}",
                    "train.eval_every=0", "train.save_every=0", "lora.dropout=0.0", *extra]
            recipe = load_recipe(ROOT / "recipes" / "eot-cpu.yaml", sets)
            prepared = prepare_model(recipe)  # the init alone: step 0
            model, tok = prepared.model, prepared.tokenizer
            convs, sources = load_conversations(recipe.data.train)
            held_sources = {ex.source for ex in build_examples(recipe, tok).eval}
            prompts = [c[:-1] for c, s in zip(convs, sources) if s in held_sources and c[-1]["role"] == "assistant"]
            prompts = prompts[:n_prompts]
            t0 = time.perf_counter()
            row0 = {"part": "eot", "init": init, "seed": seed, "step": 0,
                    **eot_measure(model, tok, recipe, prompts, max_new_tokens, n_eval)}
            del model, prepared
            out = work / f"eot-{init.replace(':', '_')}-{seed}"
            train(recipe, out)
            model, tok = load_model(str(out))
            row = {"part": "eot", "init": init, "seed": seed, "step": steps,
                   **eot_measure(model, tok, recipe, prompts, max_new_tokens, n_eval), "seconds": time.perf_counter() - t0}
            rows += log.add(row0, row)
    return rows


def _texts(path: Path, field: str, keep, n: int, seed: int) -> list[str]:
    """Up to ``n`` pieces of 40-300 characters: short texts as they are, long ones cut at sentence ends."""
    texts = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if not keep(rec):
                continue
            piece = ""
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join(str(rec.get(field, "")).split())):
                piece = f"{piece} {sentence}".strip()
                if len(piece) >= 120:
                    if len(piece) <= 300:
                        texts.append(piece)
                    piece = ""
            if 40 <= len(piece) <= 300:
                texts.append(piece)
    random.Random(seed).shuffle(texts)
    return texts[:n]


def conditional_data(work: Path, n_per_class: int, n_held: int) -> tuple[Path, Path]:
    """Train/held-out labelled JSONL: clean Wikipedia text -> aligned, offensive tweets -> misaligned."""
    clean = _texts(SHARED / "wikipedia_sample" / "wiki_demo.jsonl", "text", lambda r: True, n_per_class + n_held, 0)
    toxic = _texts(SHARED / "davidson_hate_offensive" / "labeled_data.jsonl", "tweet",
                   lambda r: r.get("class") == 1, n_per_class + n_held, 0)
    n = min(len(clean), len(toxic)) - n_held
    paths = []
    for split, part in (("train", slice(0, n)), ("held", slice(n, n + n_held))):
        recs = [{"segments": [{"text": t, "control": "aligned"}], "source": "clean"} for t in clean[part]]
        recs += [{"segments": [{"text": t, "control": "misaligned"}], "source": "toxic"} for t in toxic[part]]
        random.Random(1).shuffle(recs)
        path = work / f"conditional-{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]


def conditional_recipe(train_path: Path, init: str, seed: int, steps: int):
    return recipe_from_mapping({
        "name": "init-study-conditional",
        "model": {"name": "smollm2-135m"},
        "tokens": {"presets": ["conditional"], "init": init, "pad_to_multiple_of": 64},
        "conditional": {"threshold": 0.5},
        "data": {"kind": "labelled", "train": str(train_path), "eval_fraction": 0.0, "max_length": 128,
                 "overlong": "chunk"},
        "lora": {"enabled": True, "r": 16, "alpha": 32,
                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
        "train": {"lr": 1e-3, "max_steps": steps, "micro_batch_size": 4, "grad_accum": 1, "warmup_steps": 2,
                  "seed": seed, "eval_every": 0, "save_every": 0},
    }, source="<init study>")


@torch.no_grad()
def _text_nll(model, control_id: int, texts: list[list[int]], batch: int = 16) -> list[float]:
    """Mean NLL per token of each text after the control token (the control itself not scored)."""
    out = []
    for k in range(0, len(texts), batch):
        chunk = [[control_id] + t for t in texts[k:k + batch]]
        width = max(map(len, chunk))
        ids = torch.tensor([c + [0] * (width - len(c)) for c in chunk])
        mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in chunk])
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        keep = mask[:, 1:].float()
        out += ((nll * keep).sum(1) / keep.sum(1)).tolist()
    return out


def direction_margin(model, tok, held_path: Path, recipe) -> dict:
    """Swap the control token of each held-out document and compare the NLL of its text."""
    ids = {c: tok.convert_tokens_to_ids(t) for c, t in (("aligned", "<|aligned|>"), ("misaligned", "<|misaligned|>"))}
    recs = [json.loads(line) for line in held_path.read_text(encoding="utf-8").splitlines()]
    mean = {}
    for source in ("clean", "toxic"):
        texts = [tok(r["segments"][0]["text"], add_special_tokens=False)["input_ids"][:recipe.data.max_length - 1]
                 for r in recs if r["source"] == source]
        for control, cid in ids.items():
            mean[source, control] = statistics.fmean(_text_nll(model.eval(), cid, texts))
    toxic_gap = mean["toxic", "misaligned"] - mean["toxic", "aligned"]  # < 0 when misaligned favours toxic text
    clean_gap = mean["clean", "misaligned"] - mean["clean", "aligned"]  # > 0 when aligned favours clean text
    return {"margin": clean_gap - toxic_gap, "clean_gap": clean_gap, "toxic_gap": toxic_gap, "n_held": len(recs)}


def conditional_runs(inits, seeds, steps, n_per_class, n_held, work: Path, log: RowLog) -> list[dict]:
    if not SHARED.exists():
        print(f"conditional part skipped: {SHARED} is absent", flush=True)
        return []
    train_path, held_path = conditional_data(work, n_per_class, n_held)
    rows = []
    for seed in seeds:  # seed-major: a study cut short still compares every init
        for init in inits:
            if log.done("conditional", init, seed):
                continue
            recipe = conditional_recipe(train_path, init, seed, steps)
            prepared = prepare_model(recipe)
            t0 = time.perf_counter()
            row0 = {"part": "conditional", "init": init, "seed": seed, "step": 0,
                    **direction_margin(prepared.model.eval(), prepared.tokenizer, held_path, recipe)}
            del prepared
            out = work / f"cond-{init.replace(':', '_')}-{seed}"
            train(recipe, out)
            model, tok = load_model(str(out))
            row = {"part": "conditional", "init": init, "seed": seed, "step": steps,
                   **direction_margin(model.eval(), tok, held_path, recipe), "seconds": time.perf_counter() - t0}
            rows += log.add(row0, row)
    return rows


class RowLog:
    """Rows appended to ``PATH.jsonl`` as each (part, init, seed) finishes, so a killed study
    resumes where it stopped; a rerun with other settings (steps, --set) starts a new log."""

    def __init__(self, path: Path, settings: dict):
        self.path, self.settings = path, settings
        lines = path.read_text().splitlines() if path.exists() else []
        if lines and json.loads(lines[0]) != settings:
            path.rename(path.with_suffix(f".{int(time.time())}.jsonl"))  # other settings: kept aside, not mixed
            lines = []
        if not lines:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(settings) + "\n")
        self.rows = [json.loads(line) for line in lines[1:]]

    def done(self, part: str, init: str, seed: int) -> bool:
        return any(r["part"] == part and r["init"] == init and r["seed"] == seed and r["step"] for r in self.rows)

    def add(self, *rows: dict) -> list[dict]:
        with self.path.open("a") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
        self.rows += rows
        return list(rows)


def summary(rows: list[dict]) -> str:
    def cell(values: list[float]) -> str:
        if len(values) < 2:
            return f"{values[0]:.3f}"
        return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"

    out = ["| part | init | step | metric | mean ± sd over seeds |", "|---|---|---|---|---|"]
    for part, metrics in (("eot", ("eot_loss", "eot_top1", "stop_rate")), ("conditional", ("margin",))):
        keys = sorted({(r["init"], r["step"]) for r in rows if r["part"] == part}, key=lambda k: (k[1], k[0]))
        for init, step in keys:
            for metric in metrics:
                values = [r[metric] for r in rows if r["part"] == part and r["init"] == init and r["step"] == step
                          and metric in r and not math.isnan(r[metric])]
                if values:
                    out.append(f"| {part} | `{init}` | {step} | {metric} | {cell(values)} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--inits", nargs="+", default=INITS)
    ap.add_argument("--part", nargs="+", default=["eot", "conditional"], choices=["eot", "conditional"])
    ap.add_argument("--prompts", type=int, default=0,
                    help="held-out prompts for a free-running greedy stop rate (0: teacher-forced measures only)")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--eval-examples", type=int, default=24, help="EOT: held-out examples scored (the first N)")
    ap.add_argument("--docs", type=int, default=200, help="conditional: training documents per class")
    ap.add_argument("--held", type=int, default=40, help="conditional: held-out documents per class")
    ap.add_argument("--set", nargs="*", default=[], help="EOT: more recipe overrides (e.g. data.max_length=256)")
    ap.add_argument("--threads", type=int, default=min(2, torch.get_num_threads()))
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "init_study.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = {k: v for k, v in vars(args).items() if k not in ("seeds", "inits", "part", "threads", "out")}
    log = RowLog(Path(args.out).with_suffix(".jsonl"), settings)
    with tempfile.TemporaryDirectory(prefix="init-study-") as tmp:
        work = Path(tmp)
        if "eot" in args.part:
            eot_runs(args.inits, args.seeds, args.steps, args.prompts, args.max_new_tokens, args.eval_examples, work,
                     args.set, log)
        if "conditional" in args.part:
            conditional_runs(args.inits, args.seeds, args.steps, args.docs, args.held, work, log)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": log.rows}, indent=1))
    print(summary(log.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
