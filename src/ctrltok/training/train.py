"""The one training loop: setup -> loop -> eval -> save, on accelerate.

``ctrltok train RECIPE.yaml --out DIR`` calls :func:`train`. Every recipe (SFT with new tokens,
conditional pretraining, EPE with reflections and a head) runs through this same loop; features are
flags of the recipe, not copies of the loop.

What it guarantees:

* Loss = sum of token cross-entropies / number of supervised targets in the *whole optimizer step*
  (all micro-batches of all processes), so 1 micro-batch x 8 accumulation == 8 x 1 and 2 processes
  == 1 process with the same global batch (tested).
* Logits are computed only where a target exists (the LM head runs on the selected hidden states).
* Packed rows get an explicit document mask (``attention.build_mask``), never transformers'
  inference from positions. The forward and loss are :mod:`ctrltok.core.loss`'s, the same that
  every held-out loss uses.
* Under LoRA the new tokens' embedding rows (and an untied output head's) are trained through
  PEFT's ``trainable_token_indices``; a configuration that would leave them frozen is refused.
* One gradient synchronisation per optimizer step: ``accelerator.accumulate`` keeps DDP's
  all-reduce off every micro-batch but the last (counted in tests) and tells DeepSpeed where a step
  ends.
* Checkpoints (sharded model and optimizer, scheduler, RNG, the loader's position) are atomic;
  rerunning the same command resumes from the newest one and ends with the same weights as an
  uninterrupted run. The data order is a pure function of the seed and the step, so nothing is
  replayed or skipped.
* The final model in ``DIR`` is gathered once and written by the main process as a plain Hugging
  Face checkpoint (LoRA merged), with its tokenizer, named templates, generation config, model card,
  loss curves and metrics. Under LoRA the adapter goes to ``DIR/adapter`` too (``save.adapter``);
  ``save.merged: false`` keeps the adapter alone (``core.models.load_adapter_run`` reads it back).
* Every metrics line (train steps, held-out losses) also goes to ``train.report_to``'s trackers
  through accelerate (TensorBoard, W&B, trackio, ...), with the recipe's values as the run's config;
  a tracker whose package is missing is refused before the model loads.

Engines: DDP (default), FSDP2 (``train.strategy: fsdp2``) and DeepSpeed ZeRO-2/3
(``train.strategy: deepspeed`` with ``train.deepspeed``), or whichever the ``accelerate launch
--config_file`` of ``recipes/accelerate/`` names; :mod:`ctrltok.training.engines` holds what
differs between them. Multi-process: ``accelerate launch --config_file CONFIG -m ctrltok train
RECIPE.yaml``, or ``torchrun --nproc_per_node N -m ctrltok train RECIPE.yaml`` (on CPU ``accelerate
launch --cpu --num_processes 2`` starts one process without mpirun; :mod:`ctrltok.training.launch`
starts the rest). Every process computes the same global row order and takes its own share of
each step.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from transformers import get_scheduler

from ctrltok.core.attention import TRAINING_ONLY, loading_attention, training_attention
from ctrltok.core.config import ConfigError, Recipe
from ctrltok.core.heads import ConstitutionHead, save_head
from ctrltok.core.loss import LossModel, apply_liger, heldout_loss, run_batch
from ctrltok.core.models import ADAPTER
from ctrltok.core.packing import Batch
from ctrltok.core.tokens import apply_generation_config, padding_id
from ctrltok.data.encode import to_batch
from ctrltok.data.loader import RowSource, prepared_rows, rank_rows
from ctrltok.data.prepare import prepared_for
from ctrltok.data.store import PreparedData
from ctrltok.training import checkpoint as ckpt
from ctrltok.training import engines
from ctrltok.training.card import plot_curves, write_card
from ctrltok.training.checkpoint import RunManifest
from ctrltok.training.compiling import uncompile_blocks
from ctrltok.training.publish import publish
from ctrltok.training.runs import check_run, check_steps, run_identity
from ctrltok.training.setup import (
    Prepared,
    apply_lora,
    compile_for_training,
    prepare_model,
)


# -- data order --------------------------------------------------------------------------------
def make_optimizer(groups, **kwargs) -> torch.optim.AdamW:
    """AdamW, fused where torch has the kernel (CPU and CUDA since torch 2.4: one pass over each
    tensor instead of several, the same update up to float rounding; transformers' Trainer
    defaults to it too), else the default implementation."""
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # a device or dtype the fused kernel does not cover
        return torch.optim.AdamW(groups, **kwargs)


def accumulate(loss_model, accelerator, batches: list[Batch], impl: str, device, n_targets: float,
               n_head: float) -> tuple[float, float, int, int]:
    """Forward + backward every micro-batch of one optimizer step (gradients sum; sync on the last).

    Each micro-batch's loss is its CE sum divided by the step's total target count, so the
    accumulated gradient is the per-target mean over the whole step however it is split.
    ``accelerator.accumulate``, counting this step's micro-batches, runs all but the last under
    DDP's ``no_sync`` and marks the last as DeepSpeed's step boundary. accelerate's ``backward`` (and
    DeepSpeed's engine) divide each loss by that count, made for per-micro-batch means; ours is
    already this micro-batch's share of the step's mean, so it is multiplied back.
    Returns (CE sum, head BCE sum, input tokens, supervised targets).
    """
    ce_step = head_step = 0.0
    n_in = n_sup = 0
    accelerator.gradient_accumulation_steps = len(batches)
    accelerator.step = 0  # accelerate's micro-batch counter: sync on the step's last micro-batch
    for batch in batches:
        with accelerator.accumulate(loss_model):
            with accelerator.autocast():
                loss, ce_sum, head_sum = run_batch(loss_model, batch, impl, device, n_targets, n_head)
            accelerator.backward(loss * len(batches))
        ce_step += float(ce_sum)
        head_step += float(head_sum)
        n_in += int((batch.doc_ids >= 0).sum())
        n_sup += batch.n_targets
    return ce_step, head_step, n_in, n_sup


def evaluate_loss(loss_model, rows: RowSource, recipe: Recipe, pad_id: int, impl: str, device) -> dict:
    """Mean CE per supervised target (and head BCE) over every held-out row, by
    :func:`core.loss.heldout_loss`, a micro-batch at a time (memory flat in the eval set's size).

    Called with :func:`engines.eval_module`'s module: the unwrapped one on the main process, or the
    sharded one on every rank (FSDP2, ZeRO-3), all running the same batches.
    """
    batches = (to_batch(r, pad_id, recipe.data.packed) for r in rows.all_rows(recipe.train.micro_batch_size))
    out = heldout_loss(loss_model, batches, impl, device)
    out.pop("ce_sum", None)
    return out


def _data(accelerator, recipe: Recipe, prepared: Prepared) -> tuple[PreparedData, RowSource, RowSource]:
    """The run's data, prepared (or read from ``data.train`` when it names a prepared folder), and
    its row plans. The main process prepares first; then each node's first process (a node without
    the shared filesystem prepares its own copy); the others open what is there."""
    with accelerator.main_process_first(), accelerator.local_main_process_first():
        data = prepared_for(recipe, prepared.tokenizer, prepared.charter, workers=recipe.data.workers)
        rows = prepared_rows(data, "train", recipe.data)
        eval_rows = prepared_rows(data, "eval", recipe.data)
    return data, rows, eval_rows


def total_steps(recipe: Recipe, n_rows: int, per_step: int) -> int:
    """``train.max_steps``, else the token budget ``train.num_tokens`` (in row capacity: a step
    holds ``per_step * max_length`` token slots), else ``train.epochs`` over the rows."""
    t = recipe.train
    if t.max_steps:
        return t.max_steps
    if t.num_tokens:
        return max(1, math.ceil(t.num_tokens / (per_step * recipe.data.max_length)))
    return max(1, math.ceil(t.epochs * n_rows / per_step))


# -- the loop ----------------------------------------------------------------------------------
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "comet_ml": "comet_ml",
                    "mlflow": "mlflow", "aim": "aim", "clearml": "clearml", "dvclive": "dvclive"}


def check_trackers(recipe: Recipe) -> None:
    """``train.report_to``: every tracker named must be one accelerate knows, with its package installed."""
    for name in recipe.train.report_to:
        if name not in TRACKER_PACKAGES:
            raise ConfigError(f"{recipe.source}: train.report_to: {name!r} is not a tracker accelerate knows; "
                              f"expected some of {sorted(TRACKER_PACKAGES)}")
        if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            raise ConfigError(f"{recipe.source}: train.report_to: {name!r} needs the `{TRACKER_PACKAGES[name]}` "
                              f"package (pip install {TRACKER_PACKAGES[name]}), or remove it from train.report_to")


def _track(accelerator, recipe: Recipe, values: dict, step: int) -> None:
    """The numbers of a metrics line to ``train.report_to``'s trackers (main process; the step as their x axis)."""
    if recipe.train.report_to:
        accelerator.log({k: v for k, v in values.items() if k != "step" and isinstance(v, (int, float))
                         and not isinstance(v, bool)}, step=step)


def _flat(values: dict, prefix: str = "") -> dict:
    """Nested recipe values as flat scalar keys (what trackers' hyperparameter tables take)."""
    out: dict = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, f"{name}."))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out[name] = "" if value is None else value
        else:
            out[name] = str(value)
    return out


def _log(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines past the checkpoint so nothing is logged twice (a line cut by
    the kill is dropped too), through a temp file so a second kill leaves the old or the new log."""
    if not path.exists():
        return

    def kept(line: str) -> bool:
        try:
            return json.loads(line).get("step", 0) <= step
        except ValueError:
            return False

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in path.read_text().splitlines() if line and kept(line)))
    os.replace(tmp, path)


def is_complete(out_dir: Path) -> bool:
    return RunManifest.read(out_dir).complete


def _optimizer(loss_model: torch.nn.Module, recipe: Recipe, total_steps: int):
    """AdamW with no decay on norms and biases (and ``train.new_token_lr`` for PEFT's new-row delta),
    and the recipe's scheduler."""
    t = recipe.train
    if t.new_token_lr is not None and not recipe.lora.enabled:
        raise ConfigError(f"{recipe.source}: train.new_token_lr needs lora.enabled (under full fine-tuning the "
                          "new rows live inside the embedding matrix and train at train.lr)")
    decay, no_decay, new_rows = [], [], []
    for n, p in loss_model.named_parameters():
        if not p.requires_grad:
            continue
        if t.new_token_lr is not None and "trainable_tokens" in n:
            new_rows.append(p)  # PEFT's delta for the new token rows
        else:
            (no_decay if p.ndim < 2 or "norm" in n else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if new_rows:
        groups.append({"params": new_rows, "weight_decay": 0.0, "lr": t.new_token_lr})
    optimizer = make_optimizer(groups, lr=t.lr, betas=tuple(t.betas))
    warmup = t.warmup_steps or int(round(t.warmup_ratio * total_steps))
    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    return optimizer, scheduler


def _loss_model(prepared: Prepared, recipe: Recipe, impl: str, compile: bool = True) -> tuple[LossModel, str]:
    """The trainable module: attention for training, gradient checkpointing, LoRA, compile, the
    constitution head for EPE. Returns it and what compile did."""
    model = prepared.model
    if impl != model.config._attn_implementation:
        model.set_attn_implementation(impl)  # for training forwards only; save_final restores a standard one
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if recipe.model.liger:  # Liger's fused norm / RoPE / SwiGLU kernels (optional package); our loss stays ours
        apply_liger(model)
    if recipe.lora.enabled:
        model = apply_lora(model, recipe, prepared.surgery)
    compiled = compile_for_training(model, recipe) if recipe.train.compile and compile else "off"
    head = None
    if recipe.data.kind == "epe":
        head = ConstitutionHead(model.config.hidden_size, len(prepared.charter))
    loss_model = LossModel(model, head, recipe.epe.head_weight if recipe.epe else 1.0)
    return loss_model.train(), compiled


def train(recipe: Recipe, out_dir: str | Path, progress: bool = True, resume_with_changes: bool = False) -> Path:
    """Train per `recipe` and save the final model in `out_dir` (checkpoints below it). Resumes.

    Read top to bottom: setup (model, data, engine, optimizer, resume) -> the step loop -> final eval
    and save. The loop stays in one function on purpose: it is the one place a reader checks what a
    step does (the house rule is one readable loop, not a chain of small hooks).
    """
    out_dir = Path(out_dir)
    identity = run_identity(recipe)  # the recipe's values and the inputs' fingerprints
    status = check_run(out_dir, recipe, identity, resume_with_changes)  # refuses a folder of another run
    if status == "done":
        return out_dir
    check_trackers(recipe)  # a missing tracker package is an error now, not a warning after setup
    engine = engines.make_engine(recipe, out_dir)  # DDP, FSDP2 or DeepSpeed: the recipe's or the launcher's
    accelerator = engine.accelerator
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    torch.manual_seed(recipe.train.seed)
    random.seed(recipe.train.seed)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.clean_partial(out_dir)
        if status == "resume" and is_complete(out_dir):  # a finished run continued (--resume-with-changes)
            RunManifest.read(out_dir).write(out_dir, complete=False)
    accelerator.wait_for_everyone()
    if recipe.train.save_every:
        engines.check_shared_output(accelerator, out_dir)

    # setup
    with engines.whole_model(engine):  # ZeRO-3 partitions the model at prepare, not while it loads
        prepared = prepare_model(recipe)
        tokenizer = prepared.tokenizer
        data, rows, eval_rows = _data(accelerator, recipe, prepared)
        pack_stats = rows.plan.stats
        packed = recipe.data.packed
        pad_id = padding_id(tokenizer)
        impl = training_attention(recipe.model.attn, accelerator.device)
        loss_model, compiled = _loss_model(prepared, recipe, impl)
    trainable = sum(p.numel() for p in loss_model.parameters() if p.requires_grad)

    t = recipe.train
    per_process = t.micro_batch_size * t.grad_accum
    per_step = per_process * world
    steps = total_steps(recipe, len(rows), per_step)
    check_steps(out_dir, steps)  # a budget that ends before the newest checkpoint is refused
    loss_model = engines.shard(engine, loss_model)  # FSDP2: per decoder layer, then the root; before the optimizer
    optimizer, scheduler = _optimizer(loss_model, recipe, steps)
    loss_model, optimizer = engines.prepare(engine, loss_model, optimizer)  # DDP / DeepSpeed through accelerate
    device = accelerator.device
    deepspeed = engine.strategy == "deepspeed"

    def held_out() -> dict | None:
        """The held-out losses on the main process (None elsewhere); every rank calls it."""
        module = engines.eval_module(engine, loss_model)
        out = evaluate_loss(module, eval_rows, recipe, pad_id, impl, device) if module is not None else None
        return out if main else None

    start = sup_since_log = 0  # sup_since_log: supervised targets (all ranks) since the last logged line
    metrics_path = out_dir / "metrics.jsonl"
    # The loader's position is the step: what a checkpoint must also match is the data and the plan.
    position = {"data": data.manifest["data_key"], "tokenizer": data.manifest["tokenizer"], "plan": rows.key,
                "rows": len(rows), "per_step": per_step}
    last = [str(ckpt.latest_checkpoint(out_dir) or "") if main else None]
    broadcast_object_list(last)  # the main process's choice: every rank resumes from the same step
    if last[0]:
        state = ckpt.load_checkpoint(Path(last[0]), accelerator, loss_model, optimizer, scheduler, deepspeed)
        start = state["step"]
        sup_since_log = state.get("supervised_since_log", 0)  # a checkpoint between log lines: the curves' sums stay whole
        saved = state.get("loader")
        if saved is not None and saved != position:
            raise ConfigError(f"{last[0]}: this checkpoint read other data or rows ({saved}); this run's are {position}. "
                              "Resume with the same data and row settings, or train into a new --out")
        if main:
            _truncate_metrics(metrics_path, start)
    elif main:  # a run killed before its first checkpoint starts over: its old lines would repeat steps
        metrics_path.unlink(missing_ok=True)
    skips = data.manifest.get("skips", {})
    first_eval = held_out() if start == 0 and len(eval_rows) else None
    if main:
        summary = {"event": "setup", "step": start, "rows": len(rows), "eval_rows": len(eval_rows),
                   "records": data.manifest["inputs"], "skips": skips, "pack": pack_stats,
                   "prepared": data.path.name,  # the prepared folder's name (its keys), no machine path
                   "total_steps": steps, "processes": world, "attention": impl,
                   "compile": compiled, "strategy": engine.name,
                   "new_ids": prepared.surgery.new_ids, "trainable_params": trainable}
        if start == 0:
            _log(metrics_path, summary)
    if recipe.train.report_to:  # accelerate's trackers (TensorBoard, W&B, trackio...): the run's values as config
        accelerator.init_trackers(recipe.name, config=_flat(asdict(recipe)))
    if main:
        if start == 0:
            if first_eval:
                _log(metrics_path, {"step": 0, **first_eval})
                _track(accelerator, recipe, first_eval, 0)
        if skips:
            print(f"skipped records: {skips} (first places: {data.manifest.get('skip_places')})")

    # the loop
    progress = progress and os.environ.get("CTRLTOK_PROGRESS", "1") != "0"
    bar = _progress(progress and main, steps, start, recipe.name)
    tokens_in = tokens_sup = 0
    t0 = time.perf_counter()
    for step in range(start, steps):
        mine = rank_rows(rows, step, per_step, rank, per_process, t.seed)  # this rank's share only
        micro = [mine[i:i + t.micro_batch_size] for i in range(0, len(mine), t.micro_batch_size)]
        batches = [to_batch(m, pad_id, packed) for m in micro]
        # The step's targets over all ranks, for the per-target mean: one small all-reduce (and one
        # after the step for the logged loss: the whole step's mean, whatever the number of processes).
        counts = torch.tensor([sum(ex.n_supervised for r in mine for ex in r),
                               sum(len(ex.head_positions) for r in mine for ex in r)], dtype=torch.float64,
                              device=accelerator.device)
        n_step, n_head = (int(c) for c in (accelerator.reduce(counts, "sum") if world > 1 else counts))
        # Every engine averages gradients over processes; scale back so the loss is a per-target mean overall.
        n_targets, n_head_div = max(n_step, 1) / world, max(n_head, 1) / world
        ce_step, head_step, n_in, n_sup = accumulate(loss_model, accelerator, batches, impl, device, n_targets,
                                                     n_head_div)
        tokens_in += n_in
        tokens_sup += n_sup
        sums = torch.tensor([ce_step, head_step], dtype=torch.float64, device=accelerator.device)
        ce_step, head_step = (float(c) for c in (accelerator.reduce(sums, "sum") if world > 1 else sums))
        grad_norm = engines.grad_norm(engine, loss_model, t.max_grad_norm)  # DeepSpeed clipped in its own step
        optimizer.step()  # a no-op under DeepSpeed, whose engine stepped at the boundary
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        elapsed = time.perf_counter() - t0
        sup_since_log += n_step
        record = {"step": done, "loss": ce_step / max(n_step, 1), "lr": scheduler.get_last_lr()[0],
                  "supervised_tokens": sup_since_log,
                  "tokens_per_s": tokens_in * world / elapsed, "supervised_tokens_per_s": tokens_sup * world / elapsed}
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        if n_head:
            record["head_bce"] = head_step / max(n_head, 1)
        if done % max(t.log_every, 1) == 0 or done == steps:
            sup_since_log = 0
            if main:
                _log(metrics_path, record)
                _track(accelerator, recipe, record, done)
        if bar is not None:
            bar[0].update(bar[1], completed=done, loss=record["loss"], tps=record["supervised_tokens_per_s"])
        if t.eval_every and done % t.eval_every == 0 and len(eval_rows) and done < steps:
            result = held_out()
            if main:
                _log(metrics_path, {"step": done, **result})
                _track(accelerator, recipe, result, done)
        # Also at the last step: a finished run continued (--resume-with-changes, more steps) resumes
        # from where it ended, not from an older checkpoint.
        if t.save_every and (done % t.save_every == 0 or done == steps):
            ckpt.save_checkpoint(out_dir, done, accelerator, loss_model, optimizer, scheduler,
                                 {"recipe": recipe.name, "loader": position, "strategy": engine.name,
                                  "run": identity.to_dict(), "supervised_since_log": sup_since_log},
                                 keep=t.save_total_limit, deepspeed=deepspeed)
        if os.environ.get("CTRLTOK_FAULT_KILL_AFTER_STEP") == str(done):
            # Fault injection for the resume test: a real SIGKILL, no cleanup, at a known step.
            os.kill(os.getpid(), 9)
    if bar is not None:
        bar[0].stop()

    # final eval and save: the model gathered once (sharded engines: every rank takes part), written by the main process
    accelerator.wait_for_everyone()
    final_eval = (held_out() or {}) if len(eval_rows) else {}
    model = engines.gathered(engine, loss_model, lambda: _loss_model(prepare_model(recipe), recipe, impl, compile=False)[0])
    if main:
        if final_eval:
            _log(metrics_path, {"step": steps, **final_eval})
            _track(accelerator, recipe, final_eval, steps)
        save_final(out_dir, model, prepared, recipe,
                   {"pack": pack_stats, "skips": skips, "records": data.manifest["inputs"],
                    "documents": data.manifest["splits"], "steps": steps, "processes": world, "attention": impl,
                    "compile": compiled, "strategy": engine.name, **final_eval}, run=identity.to_dict())
        if recipe.train.push_to_hub:
            publish(out_dir, recipe.train.push_to_hub)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out_dir


def _progress(enabled: bool, total: int, start: int, name: str):
    if not enabled:
        return None
    prog = Progress(TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:.0f} sup tok/s"),
                    TimeRemainingColumn())
    prog.start()
    task = prog.add_task("train", total=total, completed=start, loss=float("nan"), tps=0.0)
    return prog, task


def save_adapter(model, folder: Path, recipe: Recipe, resized: bool) -> None:
    """The LoRA adapter in ``folder`` (PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``):
    the LoRA factors, the new tokens' trained rows and, when the run added rows, the resized embedding
    (which PEFT's "auto" would decide by looking the base up on disk or on the Hub); its base is the
    recipe's ``model.name`` (an alias, a hub id, or a local folder's absolute path), what
    :func:`ctrltok.core.models.load_adapter_run` loads."""
    local = Path(recipe.model.name).expanduser()
    model.peft_config["default"].base_model_name_or_path = str(local.resolve()) if local.exists() else recipe.model.name
    model.save_pretrained(folder, safe_serialization=True, save_embedding_layers=resized)
    # PEFT's blank card template names the base by its local path; the run's card (DIR/README.md) covers the adapter.
    (folder / "README.md").unlink(missing_ok=True)


def save_final(out_dir: Path, loss_model: LossModel, prepared: Prepared, recipe: Recipe, summary: dict,
               run: dict | None = None) -> None:
    """The deliverable in out_dir, as ``recipe.save`` says: the merged model (a plain HF checkpoint)
    and, under LoRA, the adapter in ``DIR/adapter``; tokenizer, card, curves, the manifest last."""
    out_dir = Path(out_dir)
    model = loss_model.model
    uncompile_blocks(model)  # the saved model and any later use in this process run eager
    surgery, tokenizer = prepared.surgery, prepared.tokenizer
    if hasattr(model, "merge_and_unload"):
        if recipe.save.adapter:  # to share, or to serve as one of several adapters over the base with these tokens
            # The surgery's rows (new tokens, fillers) are the only ones a run adds; with none the base's
            # embedding stands and is not saved (load_adapter_run then leaves it as it is). Fillers carried
            # by a ctrltok checkpoint being trained on also count: the embedding is saved though unchanged.
            save_adapter(model, out_dir / ADAPTER, recipe, resized=bool(surgery.new_ids or surgery.filler_ids))
        model = model.merge_and_unload() if recipe.save.merged else model.get_base_model()
    if model.config._attn_implementation in TRAINING_ONLY:  # a training path (no KV cache): reload-equivalent sdpa
        model.set_attn_implementation(loading_attention(model.config._attn_implementation))
    surgery.model = model
    apply_generation_config(model, surgery, prepared.end_of_turn_id)
    if recipe.save.merged:
        model.save_pretrained(out_dir, safe_serialization=True)
    else:  # the adapter alone: the stops, blocked ids and decoding beside the tokenizer, no weights (no config.json)
        model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if loss_model.head is not None:
        save_head(loss_model.head, out_dir, [c.id for c in prepared.charter])
    manifest = RunManifest.for_run(surgery.manifest(), recipe, prepared.template.end_of_turn, summary, run)
    manifest.write(out_dir, complete=False)  # the model is on disk; card and curves follow
    plot_curves(out_dir / "metrics.jsonl", out_dir / "loss_curves.png")
    write_card(out_dir, manifest.values)
    manifest.write(out_dir, complete=True)
