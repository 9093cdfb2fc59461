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
  inference from positions.
* Under LoRA the new tokens' embedding rows (and an untied output head's) are trained through
  PEFT's ``trainable_token_indices``; a configuration that would leave them frozen is refused.
* Checkpoints are atomic; rerunning the same command resumes from the newest one and ends with
  the same weights as an uninterrupted run. The data order is a pure function of the seed and the
  step, so nothing is replayed or skipped.
* The final model in ``DIR`` is a plain Hugging Face checkpoint (LoRA merged), with its tokenizer,
  named templates, generation config, model card, loss curves and metrics.

Multi-process: on GPUs ``accelerate launch --num_processes N -m ctrltok train RECIPE.yaml`` (a
DeepSpeed or FSDP config comes from ``accelerate launch --config_file``, see the recipes); on CPU
``accelerate launch --cpu --num_processes 2 -m ctrltok train RECIPE.yaml`` (accelerate starts one
process without mpirun; :mod:`ctrltok.training.launch` starts the rest) or ``torchrun --nproc_per_node 2 -m
ctrltok train RECIPE.yaml``. Either way the same Accelerator drives DDP, and every process
computes the same global row order and takes its own share of each step.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from transformers import get_scheduler

from ctrltok.core.attention import (
    VARLEN,
    build_mask,
    loading_attention,
    training_attention,
)
from ctrltok.core.config import Recipe
from ctrltok.core.example import IGNORE, Example
from ctrltok.core.packing import Batch, collate, pack, pad_batch
from ctrltok.core.templates import get_template, install_templates
from ctrltok.core.tokens import (
    Surgery,
    add_tokens,
    apply_generation_config,
    check_sizes,
    is_tied,
    resolve_tokens,
)
from ctrltok.training import checkpoint as ckpt
from ctrltok.training.compiling import (
    compile_blocks,
    compile_unavailable,
    uncompile_blocks,
)
from ctrltok.training.data import build_examples

MANIFEST = "ctrltok.json"


# -- setup -------------------------------------------------------------------------------------
def prepare_model(recipe: Recipe):
    """Load the base model, add the recipe's control tokens, install templates. -> (model, tok, surgery)."""
    from ctrltok.core.models import load_model

    model, tokenizer = load_model(recipe.model.name, dtype=recipe.model.dtype, attn=recipe.model.attn)
    tokens = resolve_tokens(recipe.tokens.presets, recipe.tokens.custom, recipe.tokens.charter)
    template = get_template(recipe.data.template, tokenizer)
    for preset in template.presets:
        if preset not in recipe.tokens.presets:
            tokens += [t for t in resolve_tokens([preset], charter=recipe.tokens.charter) if t not in tokens]
    vocab = tokenizer.get_vocab()
    have = [t for t in tokens if t.text in vocab and not t.reuse]
    if have and len(have) == len([t for t in tokens if not t.reuse]):
        # A ctrltok checkpoint already carries these tokens: nothing to add, keep its rows.
        surgery = Surgery(model, tokenizer, tokens, {t.text: vocab[t.text] for t in tokens}, [],
                          filler_ids=_filler_ids(tokenizer))
        apply_generation_config(model, surgery, template.end_of_turn)
    else:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        surgery = add_tokens(model, tokenizer, tokens, init=recipe.tokens.init,
                             pad_to_multiple_of=recipe.tokens.pad_to_multiple_of, seed=recipe.train.seed)
        apply_generation_config(model, surgery, template.end_of_turn)
    install_templates(tokenizer)
    check_sizes(model, tokenizer)
    return model, tokenizer, surgery


def _filler_ids(tokenizer) -> list[int]:
    from ctrltok.core.tokens import FILLER_FORMAT

    prefix = FILLER_FORMAT.split("{")[0]
    return sorted(i for t, i in tokenizer.get_vocab().items() if t.startswith(prefix))


def apply_lora(model, recipe: Recipe, surgery: Surgery):
    """Wrap in PEFT LoRA with the new rows trainable (embedding and an untied head)."""
    from peft import LoraConfig, get_peft_model

    new = sorted(set(surgery.new_ids) | {i for t, i in surgery.ids.items()})
    trainable = None
    if new:
        trainable = {"embed_tokens": new} if is_tied(model) else {"embed_tokens": new, "lm_head": new}
    cfg = LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                     target_modules=recipe.lora.target_modules, trainable_token_indices=trainable)
    with warnings.catch_warnings():  # PEFT 0.21 reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        peft_model = get_peft_model(model, cfg)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    if new and not any("trainable_tokens" in n and "embed_tokens" in n for n in names):
        raise RuntimeError("LoRA would leave the new token rows frozen (no trainable_tokens adapter on embed_tokens); "
                           "the new tokens would never learn their meaning")
    return peft_model


def compile_for_training(model, recipe: Recipe) -> str:
    """``train.compile``: compile the decoder layers' MLPs and norms, or say why not (training goes
    on uncompiled, with a warning: a missing C++ compiler should not cost the user the run)."""
    reason = compile_unavailable()
    if reason is not None:
        warnings.warn(f"{recipe.source}: train.compile is on but torch.compile does not work here ({reason}); "
                      "training uncompiled", RuntimeWarning, stacklevel=2)
        return f"off ({reason})"
    return f"{compile_blocks(model)} modules (MLPs and norms of the decoder layers)"


class LossModel(torch.nn.Module):
    """Body + LM head on supervised positions only (+ optional constitution head): one forward for DDP."""

    def __init__(self, model, head: torch.nn.Module | None = None, head_weight: float = 1.0):
        super().__init__()
        self.model = model
        self.head = head
        self.head_weight = head_weight

    def _core(self):
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    def forward(self, input_ids, position_ids, attention_mask, targets, weights=None, head_index=None,
                head_targets=None, n_targets: float = 1.0, n_head: float = 1.0):
        core = self._core()
        hidden = core.get_decoder()(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                    use_cache=False).last_hidden_state
        sel = targets != IGNORE
        logits = core.get_output_embeddings()(hidden[sel]).float()
        ce = F.cross_entropy(logits, targets[sel], reduction="none")
        if weights is not None:
            ce = ce * weights[sel]
        ce_sum = ce.sum()
        loss = ce_sum / n_targets
        head_sum = torch.zeros((), device=hidden.device)
        if self.head is not None and head_index is not None and head_index.numel():
            h = hidden[head_index[:, 0], head_index[:, 1]]
            logits_h = self.head(h.float())
            head_sum = F.binary_cross_entropy_with_logits(logits_h, head_targets, reduction="sum") / head_targets.shape[1]
            loss = loss + self.head_weight * head_sum / n_head
        elif self.head is not None:
            loss = loss + 0.0 * sum(p.sum() for p in self.head.parameters())  # keep DDP's graph complete
        return loss, ce_sum.detach(), head_sum.detach()


# -- data order --------------------------------------------------------------------------------
def make_rows(examples: list[Example], recipe: Recipe) -> tuple[list[list[Example]], dict]:
    d = recipe.data
    if d.packing:
        result = pack(examples, d.max_length, d.overlong)
        return result.rows, asdict(result.stats)
    rows, stats = [], {"examples": len(examples), "truncated_examples": 0, "truncated_tokens": 0}
    for ex in examples:
        if len(ex) > d.max_length:
            if d.overlong == "error":
                raise ValueError(f"{ex.source}: {len(ex)} tokens > data.max_length = {d.max_length}")
            stats["truncated_examples"] += 1
            stats["truncated_tokens"] += len(ex) - d.max_length
            from ctrltok.core.packing import slice_example

            ex = slice_example(ex, 0, d.max_length)
        rows.append([ex])
    stats["rows"] = len(rows)
    return rows, stats


def row_order(n_rows: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n_rows))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def step_rows(rows: list, step: int, per_step: int, seed: int) -> list:
    """The rows of optimizer step `step` (0-based): a pure function of the seed and the step."""
    out = []
    for g in range(step * per_step, (step + 1) * per_step):
        epoch, i = divmod(g, len(rows))
        out.append(rows[row_order(len(rows), seed, epoch)[i]])
    return out


def to_batch(rows: list[list[Example]], pad_id: int, packed: bool) -> Batch:
    if packed:
        return collate(rows, pad_id)
    return pad_batch([r[0] for r in rows], pad_id)


def make_optimizer(groups, **kwargs) -> torch.optim.AdamW:
    """AdamW, fused where torch has the kernel (CPU and CUDA since torch 2.4: one pass over each
    tensor instead of several; 4x faster steps on SmolLM2-135M here, the same update up to float
    rounding; transformers' Trainer defaults to it too), else the default implementation."""
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # a device or dtype the fused kernel does not cover
        return torch.optim.AdamW(groups, **kwargs)


def run_batch(loss_model, batch: Batch, impl: str, device, n_targets: float, n_head: float):
    batch = batch.to(device)
    dtype = next(loss_model.parameters()).dtype
    mask = build_mask(batch, impl, dtype=dtype)
    return loss_model(batch.input_ids, batch.position_ids, mask, batch.targets, batch.weights,
                      batch.head_index, batch.head_targets, n_targets, n_head)


def accumulate(loss_model, accelerator, batches: list[Batch], impl: str, device, n_targets: float,
               n_head: float) -> tuple[float, float, int, int]:
    """Forward + backward every micro-batch of one optimizer step (gradients sum; sync on the last).

    Each micro-batch's loss is its CE sum divided by the step's total target count, so the
    accumulated gradient is the per-target mean over the whole step however it is split.
    Returns (CE sum, head BCE sum, input tokens, supervised targets).
    """
    ce_step = head_step = 0.0
    n_in = n_sup = 0
    for k, batch in enumerate(batches):
        ctx = accelerator.no_sync(loss_model) if k < len(batches) - 1 else _null()
        with ctx:
            with accelerator.autocast():
                loss, ce_sum, head_sum = run_batch(loss_model, batch, impl, device, n_targets, n_head)
            accelerator.backward(loss)
        ce_step += float(ce_sum)
        head_step += float(head_sum)
        n_in += int((batch.doc_ids >= 0).sum())
        n_sup += batch.n_targets
    return ce_step, head_step, n_in, n_sup


@torch.no_grad()
def evaluate_loss(loss_model, rows: list[list[Example]], recipe: Recipe, pad_id: int, impl: str, device) -> dict:
    """Mean CE per supervised target (and head BCE) over the eval rows.

    Called on the main process only, with the *unwrapped* module: a DDP forward on one rank alone
    would wait forever for the others at its buffer broadcast.
    """
    was = loss_model.training
    loss_model.eval()
    ce_total, n_total, head_total, n_head = 0.0, 0, 0.0, 0
    mb = recipe.train.micro_batch_size
    for i in range(0, len(rows), mb):
        batch = to_batch(rows[i:i + mb], pad_id, recipe.data.packing)
        _, ce_sum, head_sum = run_batch(loss_model, batch, impl, device, 1.0, 1.0)
        ce_total += float(ce_sum)
        n_total += batch.n_targets
        head_total += float(head_sum)
        n_head += int(batch.head_index.shape[0])
    loss_model.train(was)
    out = {"eval_loss": ce_total / max(n_total, 1), "eval_targets": n_total}
    if n_head:
        out["eval_head_bce"] = head_total / n_head
    return out


# -- the loop ----------------------------------------------------------------------------------
def _log(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines past the checkpoint so nothing is logged twice."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


def is_complete(out_dir: Path) -> bool:
    m = Path(out_dir) / MANIFEST
    return m.exists() and json.loads(m.read_text()).get("complete", False)


def train(recipe: Recipe, out_dir: str | Path, progress: bool = True) -> Path:
    """Train per `recipe` and save the final model in `out_dir` (checkpoints below it). Resumes."""
    out_dir = Path(out_dir)
    if is_complete(out_dir):
        return out_dir
    precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[recipe.train.precision]
    accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available(),
                              log_with=recipe.train.report_to or None, project_dir=str(out_dir))
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    torch.manual_seed(recipe.train.seed)
    random.seed(recipe.train.seed)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.clean_partial(out_dir)

    # setup
    model, tokenizer, surgery = prepare_model(recipe)
    encoded = build_examples(recipe, tokenizer)
    rows, pack_stats = make_rows(encoded.train, recipe)
    eval_rows, _ = make_rows(encoded.eval, recipe) if encoded.eval else ([], {})
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    impl = training_attention(recipe.model.attn, accelerator.device)
    if impl != model.config._attn_implementation:
        model.set_attn_implementation(impl)  # for training forwards only; save_final restores a standard one
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if recipe.lora.enabled:
        model = apply_lora(model, recipe, surgery)
    compiled = compile_for_training(model, recipe) if recipe.train.compile else "off"
    head = None
    if recipe.data.kind == "epe":
        from ctrltok.core.heads import ConstitutionHead
        from ctrltok.core.tokens import load_charter

        head = ConstitutionHead(model.config.hidden_size, len(load_charter(recipe.tokens.charter)))
    loss_model = LossModel(model, head, recipe.epe.head_weight if recipe.epe else 1.0)
    loss_model.train()

    t = recipe.train
    per_process = t.micro_batch_size * t.grad_accum
    per_step = per_process * world
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * len(rows) / per_step))
    warmup = t.warmup_steps or int(round(t.warmup_ratio * total_steps))
    decay, no_decay, new_rows = [], [], []
    if t.new_token_lr is not None and not recipe.lora.enabled:
        from ctrltok.core.config import ConfigError

        raise ConfigError(f"{recipe.source}: train.new_token_lr needs lora.enabled (under full fine-tuning the "
                          "new rows live inside the embedding matrix and train at train.lr)")
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
    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    loss_model, optimizer = accelerator.prepare(loss_model, optimizer)
    device = accelerator.device

    start = 0
    metrics_path = out_dir / "metrics.jsonl"
    last = ckpt.latest_checkpoint(out_dir)
    if last is not None:
        state = ckpt.load_checkpoint(last, accelerator.unwrap_model(loss_model), optimizer, scheduler)
        start = state["step"]
        if main:
            _truncate_metrics(metrics_path, start)
    if main:
        summary = {"event": "setup", "step": start, "rows": len(rows), "eval_rows": len(eval_rows),
                   "records": encoded.records, "skips": encoded.skips.summary(), "pack": pack_stats,
                   "total_steps": total_steps, "processes": world, "attention": impl, "compile": compiled, "new_ids": surgery.new_ids,
                   "trainable_params": sum(p.numel() for p in loss_model.parameters() if p.requires_grad)}
        if start == 0:
            _log(metrics_path, summary)
            if eval_rows:
                _log(metrics_path, {"step": 0, **evaluate_loss(accelerator.unwrap_model(loss_model), eval_rows, recipe, pad_id, impl, device)})
        if encoded.skips:
            print(f"skipped records: {encoded.skips.summary()} (first places: {encoded.skips.examples})")

    progress = progress and os.environ.get("CTRLTOK_PROGRESS", "1") != "0"
    bar = _progress(progress and main, total_steps, start, recipe.name)
    tokens_in = tokens_sup = 0
    t0 = time.perf_counter()
    for step in range(start, total_steps):
        global_rows = step_rows(rows, step, per_step, t.seed)
        mine = global_rows[rank * per_process:(rank + 1) * per_process]
        micro = [mine[i:i + t.micro_batch_size] for i in range(0, len(mine), t.micro_batch_size)]
        batches = [to_batch(m, pad_id, recipe.data.packing) for m in micro]
        n_step = sum(ex.n_supervised for r in global_rows for ex in r)
        n_head = sum(len(ex.head_positions) for r in global_rows for ex in r)
        # DDP averages gradients over processes; scale back so the loss is a per-target mean overall.
        n_targets, n_head_div = max(n_step, 1) / world, max(n_head, 1) / world
        ce_step, head_step, n_in, n_sup = accumulate(loss_model, accelerator, batches, impl, device, n_targets,
                                                     n_head_div)
        tokens_in += n_in
        tokens_sup += n_sup
        grad_norm = accelerator.clip_grad_norm_(loss_model.parameters(), t.max_grad_norm) if t.max_grad_norm else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        elapsed = time.perf_counter() - t0
        record = {"step": done, "loss": ce_step / max(n_step / world, 1), "lr": scheduler.get_last_lr()[0],
                  "tokens_per_s": tokens_in * world / elapsed, "supervised_tokens_per_s": tokens_sup * world / elapsed}
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if n_head:
            record["head_bce"] = head_step / max(n_head / world, 1)
        if main and (done % max(t.log_every, 1) == 0 or done == total_steps):
            _log(metrics_path, record)
        if bar is not None:
            bar[0].update(bar[1], completed=done, loss=record["loss"], tps=record["supervised_tokens_per_s"])
        if t.eval_every and done % t.eval_every == 0 and eval_rows and done < total_steps and main:
            _log(metrics_path, {"step": done, **evaluate_loss(accelerator.unwrap_model(loss_model), eval_rows, recipe, pad_id, impl, device)})
        if t.save_every and done % t.save_every == 0 and done < total_steps:
            accelerator.wait_for_everyone()
            if main:
                ckpt.save_checkpoint(out_dir, done, accelerator.unwrap_model(loss_model), optimizer, scheduler,
                                     {"recipe": recipe.name})
        if os.environ.get("CTRLTOK_FAULT_KILL_AFTER_STEP") == str(done):
            # Fault injection for the resume test: a real SIGKILL, no cleanup, at a known step.
            os.kill(os.getpid(), 9)
    if bar is not None:
        bar[0].stop()

    accelerator.wait_for_everyone()
    if main:
        final_eval = evaluate_loss(accelerator.unwrap_model(loss_model), eval_rows, recipe, pad_id, impl, device) if eval_rows else {}
        if final_eval:
            _log(metrics_path, {"step": total_steps, **final_eval})
        save_final(out_dir, accelerator.unwrap_model(loss_model), tokenizer, surgery, recipe,
                   {"pack": pack_stats, "skips": encoded.skips.summary(), "records": encoded.records,
                    "steps": total_steps, "processes": world, "attention": impl, "compile": compiled,
                    **final_eval})
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out_dir


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress(enabled: bool, total: int, start: int, name: str):
    if not enabled:
        return None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    prog = Progress(TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:.0f} sup tok/s"),
                    TimeRemainingColumn())
    prog.start()
    task = prog.add_task("train", total=total, completed=start, loss=float("nan"), tps=0.0)
    return prog, task


def save_final(out_dir: Path, loss_model: LossModel, tokenizer, surgery: Surgery, recipe: Recipe, summary: dict) -> None:
    """The deliverable: a plain HF checkpoint in out_dir (LoRA merged), card, curves, manifest last."""
    model = loss_model.model
    uncompile_blocks(model)  # the saved model and any later use in this process run eager
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if model.config._attn_implementation == VARLEN:  # a training path (no KV cache): reload-equivalent sdpa
        model.set_attn_implementation(loading_attention(VARLEN))
    template = get_template(recipe.data.template, tokenizer)
    surgery.model = model
    apply_generation_config(model, surgery, template.end_of_turn)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if loss_model.head is not None:
        from ctrltok.core.heads import save_head
        from ctrltok.core.tokens import load_charter

        save_head(loss_model.head, out_dir, [c.id for c in load_charter(recipe.tokens.charter)])
    manifest = {
        **surgery.manifest(),
        "template": recipe.data.template,
        "end_of_turn": template.end_of_turn,
        "recipe": recipe.name,
        "recipe_values": asdict(recipe),
        "summary": summary,
        "complete": False,
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    try:
        from ctrltok.training.card import plot_curves, write_card

        plot_curves(out_dir / "metrics.jsonl", out_dir / "loss_curves.png")
        write_card(out_dir, manifest)
    except ImportError:
        pass
    manifest["complete"] = True
    tmp = out_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, default=str))
    os.replace(tmp, out_dir / MANIFEST)
