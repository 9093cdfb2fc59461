"""The device check (issue 12): the GPU attention paths, a DeepSpeed ZeRO-2 run, and training
throughput against TRL, on one CUDA GPU, in one command that writes one JSON.

    bash bench/gpu_check.sh                  # a CUDA machine: <= 8 minutes on one H200
    bash bench/gpu_check.sh --dry-run        # anywhere: the same code on CPU, tiny shapes

What it checks (pass/fail each, in ``checks``):

* ``varlen``: packed == unpacked logits in bf16 (autocast, float32 weights, as ``train.precision:
  bf16`` trains) on ``model.attn: auto``'s CUDA path for rows without holes (one flash varlen call,
  ``cu_seqlens`` from ``Batch.doc_ids``), against every document run alone through SDPA.
* ``flex``: the same rows through FlexAttention (``model.attn: flex_attention``, a BlockMask).
* ``epe_flex``: the EPE equivalence on the CUDA path for rows with holes (FlexAttention): every
  context token of a document with a reflection (holes + aliased positions) has the logits of
  the document without the reflection, run alone through SDPA.
* ``deepspeed_zero2``: ``accelerate launch --config_file recipes/accelerate/deepspeed-zero2.yaml
  -m ctrltok train`` for 2 steps with seed 002's ``recipes/deepspeed/zero2.json`` (skipped with a
  message when DeepSpeed or the launch config is missing).

Tolerance of the equivalences, stated: bf16 carries 8 mantissa bits, so two bf16 forwards of the
same document differ by rounding alone. The noise floor is measured in the run: the largest
|logit difference| between the unpacked document in bf16 and in float32. A check passes when the
packed (or EPE) logits differ from the unpacked bf16 logits by at most ``max(2 x noise, 0.02)``;
attention leaking across documents or into a reflection moves logits by O(1) (0.5-0.9 measured on
CPU), far above it.

What it measures (``throughput``, per model shape): supervised tokens/s of full training steps
(forward, backward, clipping, fused AdamW; bf16 autocast, float32 weights, no gradient
checkpointing) on the same synthetic SFT documents (lengths log-normal, median 300, 16-1024 tokens;
loss on the last 70% of each), the same documents per step for every contender:

* ``ctrltok packed``: the step's documents best-fit packed into rows of ``--row-length``,
  ``model.attn: auto`` (flash varlen here), ``LossModel`` (LM head on supervised positions only,
  chunked cross-entropy), through accelerate as ``ctrltok train`` runs;
* ``TRL padding-free``: SFTTrainer with ``padding_free=True`` (the step's documents concatenated
  into one row, ``position_ids`` + ``cu_seq_lens``) on flash varlen: ``flash_attention_2`` when
  the flash-attn package is installed, else torch's own flash varlen kernel (the one ctrltok uses)
  registered as a transformers attention function fed by TRL's ``cu_seq_lens_q``;
* ``TRL padded``: SFTTrainer, the step's documents padded to the longest, SDPA.

Random weights, shapes built by hand (no hub): SmolLM2-135M (hidden 576, 30 layers, 9/3 heads) and
SmolLM2-1.7B (hidden 2048, 24 layers, 32/32 heads), vocabulary 49,152, tied embeddings.
MFU = model FLOPs / time / peak, model FLOPs per document of n tokens ``6 * P * n + 6 * L * d * n^2``
(P parameters, embeddings counted once as they are tied to the LM head; L layers; d = heads x
head_dim; causal attention forward + backward), padding excluded, the same FLOPs for every
contender (ctrltok skips the LM head off supervised positions, so its hardware FLOPs are lower);
peak 989 TFLOP/s, the H200's dense bf16 figure. ``epe_hole_cost``: forward + backward of the same
packed EPE rows with their holes (FlexAttention) and without (flash varlen, causal per document),
interleaved, medians.

Targets (printed PASS/FAIL, in ``targets``): ctrltok packed >= 1.3x TRL padding-free in supervised
tokens/s; MFU >= 45% on the 1.7B shape; EPE holes <= 10% over varlen causal.

``--dry-run`` runs every part on CPU with tiny shapes and the flash kernel replaced by
``ctrltok.core.varlen.varlen_reference`` (its plain-PyTorch stand-in): it proves the script, not
the GPU; its figures mean nothing. Without ``--dry-run`` and without CUDA it exits with status 2.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch.nn.attention.flex_attention import create_block_mask
from transformers import (
    AttentionInterface,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)

from ctrltok.core import attention, varlen
from ctrltok.core.attention import CUDA, build_mask, cuda_path, training_attention
from ctrltok.core.example import IGNORE, Example
from ctrltok.core.loss import LossModel, decoder_hidden, run_batch
from ctrltok.core.packing import Batch, collate, pack
from ctrltok.epe.reflection import Insert, layout

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "assets" / "smollm2-tokenizer"
PEAK_TFLOPS = 989.0  # H200 SXM, dense bf16 (no sparsity)
VOCAB = 49152
TRL_VARLEN = "bench_torch_varlen"  # torch's flash varlen kernel for TRL's padding-free batches

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, rope_theta=100000.0),
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, rope_theta=130000.0),
    # --dry-run: the same code on CPU
    "tiny-a": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=1024),
    "tiny-b": dict(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=6,
                   num_key_value_heads=6, vocab_size=1024),
}
# Per shape: documents per optimizer step, ctrltok's row length, warm-up and timed steps.
REAL = {"equivalence": "smollm2-135m", "hole_cost": "smollm2-135m",
        "throughput": {"smollm2-135m": dict(docs=40, row=4096, warmup=3, steps=8),
                       "smollm2-1.7b": dict(docs=20, row=4096, warmup=3, steps=6)},
        "rows": dict(n_docs=16, row=2048, epe_docs=8, epe_len=471, epe_row=2048, hole_rows=4, hole_row=4096,
                     hole_doc=512, hole_reps=5)}
DRY = {"equivalence": "tiny-a", "hole_cost": "tiny-a",
       "throughput": {"tiny-a": dict(docs=4, row=256, warmup=1, steps=2),
                      "tiny-b": dict(docs=4, row=256, warmup=1, steps=2)},
       "rows": dict(n_docs=6, row=128, epe_docs=4, epe_len=23, epe_row=128, hole_rows=1, hole_row=128, hole_doc=64,
                    hole_reps=2)}


# -- helpers --------------------------------------------------------------------------------------
class Budget:
    """The run's wall-clock budget: each part asks for what it needs and is skipped without it."""

    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)

    def allows(self, need: float) -> bool:
        return self.left() >= need


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def make_model(shape: str, device: torch.device, attn: str = "sdpa", seed: int = 0) -> LlamaForCausalLM:
    """A Llama of ``shape`` with random weights (float32), built on ``device``."""
    config = LlamaConfig(**{"vocab_size": VOCAB, **SHAPES[shape]}, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2, use_cache=False,
                         attention_dropout=0.0)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model


def model_flops(model, doc_lengths) -> float:
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    d_attn = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    return float(sum(6 * params * n + 6 * cfg.num_hidden_layers * d_attn * n * n for n in doc_lengths))


def vocab(shape: str) -> int:
    return SHAPES[shape].get("vocab_size", VOCAB)


def documents(n: int, seed: int, max_len: int = 1024, median: float = 300.0, vocab: int = VOCAB) -> list[Example]:
    """Synthetic SFT documents: log-normal lengths, random ids, loss on the last 70%."""
    g = random.Random(seed)
    out = []
    for i in range(n):
        length = int(min(max_len, max(16, g.lognormvariate(math.log(median), 0.8))))
        ids = [g.randrange(3, vocab) for _ in range(length)]
        prompt = max(1, int(0.3 * length))
        out.append(Example(input_ids=ids, labels=[IGNORE] * prompt + ids[prompt:], source=f"doc{i}"))
    return out


def epe_documents(n: int, seed: int, length: int, vocab: int = VOCAB,
                  reflection: int = 40) -> tuple[list[Example], list[list[int]]]:
    """Documents with one reflection (``<assistant>`` + ``reflection`` tokens) in the middle, and the
    same documents without it."""
    g = random.Random(seed)
    examples, plain = [], []
    for i in range(n):
        text = [g.randrange(3, vocab - 1) for _ in range(length)]
        refl = [g.randrange(3, vocab - 1) for _ in range(reflection)]
        examples.append(layout(text, [Insert(length // 2, refl, [])], assistant_id=vocab - 1, source=f"epe{i}"))
        plain.append(text)
    return examples, plain


def use_reference_kernel() -> None:
    """--dry-run: the flash varlen kernel (CUDA only) replaced by its plain-PyTorch reference, and
    BlockMasks built eagerly (compiling ``create_block_mask`` costs minutes on a small CPU)."""
    varlen.varlen_attn = varlen.varlen_reference
    varlen.kernel_runs = lambda query: True
    attention._compiled_create_block_mask = lambda: create_block_mask


def trl_varlen_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """TRL's padding-free batches (one row, ``cu_seq_lens_q`` / ``max_length_q`` from its collator)
    through torch's flash varlen kernel: what ``flash_attention_2`` does, without the flash-attn
    package."""
    cu, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    B, H, T, D = query.shape
    if cu is None or B != 1:
        raise ValueError(f"{TRL_VARLEN} expects TRL's padding-free batches (one row with cu_seq_lens_q)")
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in varlen._autocast(query, key, value))
    out = varlen.varlen_attn(q, k, v,
                             cu.to(device=q.device, dtype=torch.int32), cu.to(device=q.device, dtype=torch.int32),
                             int(longest), int(longest), scale=scaling, window_size=(-1, 0),
                             enable_gqa=H != k.shape[1])
    return out[None], None


# -- equivalence ----------------------------------------------------------------------------------
def _compare(got: torch.Tensor, ref_bf16: torch.Tensor, ref_fp32: torch.Tensor) -> dict:
    diff = (got.float() - ref_bf16.float()).abs()
    noise = float((ref_bf16.float() - ref_fp32.float()).abs().max())
    tol = max(2 * noise, 0.02)
    worst = float(diff.max())
    return {"max_abs_diff": worst, "mean_abs_diff": float(diff.mean()), "noise_bf16_vs_fp32": noise,
            "tolerance": tol, "tokens_compared": int(got.shape[0]), "pass": worst <= tol}


def _alone(model, ids: list[int], device, bf16: bool) -> torch.Tensor:
    x = torch.tensor([ids], device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        return model(input_ids=x, use_cache=False).logits[0].float()


def _packed(model, batch: Batch, mask_impl: str, device) -> torch.Tensor:
    """Logits of a packed batch on the CUDA path (``ctrltok_cuda``) under bf16 autocast, with the
    mask ``build_mask`` gives ``mask_impl``: the CUDA path's own (varlen, or a BlockMask for rows
    with holes), or ``flex_attention``'s BlockMask to run rows without holes through FlexAttention."""
    model.set_attn_implementation(CUDA)
    batch = batch.to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        hidden = decoder_hidden(model, batch.input_ids, batch.position_ids, build_mask(batch, mask_impl))
        out = model.get_output_embeddings()(hidden).float()
    model.set_attn_implementation("sdpa")
    return out


def equivalence(shape: str, sizes: dict, device: torch.device) -> dict:
    """Packed == unpacked on varlen and flex, and the EPE equivalence on the CUDA path (flex)."""
    training_attention(CUDA, "cuda")
    model = make_model(shape, device).eval()
    out: dict = {"shape": shape}
    docs = documents(sizes["n_docs"], seed=1, max_len=sizes["row"] // 2, median=sizes["row"] / 8, vocab=vocab(shape))
    rows = pack(docs, sizes["row"], "error").rows
    batch = collate(rows, pad_id=2, pad_to=sizes["row"])  # a multiple of 128 (CPU FlexAttention needs it)
    with torch.no_grad():
        refs = {ex.source: (_alone(model, ex.input_ids, device, True), _alone(model, ex.input_ids, device, False))
                for row in rows for ex in row}
        for name, impl in (("varlen", CUDA), ("flex", "flex_attention")):
            t0 = time.perf_counter()
            if impl == CUDA:
                assert cuda_path(batch) == "varlen"
            logits = _packed(model, batch, impl, device)
            got, bf, fp = [], [], []
            for b, row in enumerate(rows):
                offset = 0
                for ex in row:
                    got.append(logits[b, offset:offset + len(ex)])
                    bf.append(refs[ex.source][0])
                    fp.append(refs[ex.source][1])
                    offset += len(ex)
            path = f"{CUDA} -> " + ("flash varlen (cu_seqlens)" if impl == CUDA else "FlexAttention (BlockMask)")
            out[name] = {**_compare(torch.cat(got), torch.cat(bf), torch.cat(fp)), "rows": list(batch.shape),
                         "documents": len(docs), "path": path, "seconds": time.perf_counter() - t0}
            del logits
        # EPE: reflections packed with holes and aliased positions, on the CUDA path (FlexAttention)
        t0 = time.perf_counter()
        examples, plain = epe_documents(sizes["epe_docs"], seed=2, length=sizes["epe_len"], vocab=vocab(shape))
        epe_rows = pack(examples, sizes["epe_row"], "error").rows
        epe = collate(epe_rows, pad_id=2, pad_to=sizes["epe_row"])
        assert cuda_path(epe) == "flex"
        logits = _packed(model, epe, CUDA, device)
        by_source = {ex.source: p for ex, p in zip(examples, plain)}
        got, bf, fp = [], [], []
        for b, row in enumerate(epe_rows):
            offset = 0
            for ex in row:
                text = by_source[ex.source]
                at, skip = len(text) // 2, 41  # <assistant> + 40 reflection tokens
                context = [i for i in range(len(ex)) if i < at or i >= at + skip]
                got.append(logits[b, [offset + i for i in context]])
                bf.append(_alone(model, text, device, True))
                fp.append(_alone(model, text, device, False))
                offset += len(ex)
        out["epe_flex"] = {**_compare(torch.cat(got), torch.cat(bf), torch.cat(fp)), "rows": list(epe.shape),
                           "documents": len(examples), "path": f"{CUDA} -> FlexAttention (holes)",
                           "seconds": time.perf_counter() - t0}
    del model
    free(device)
    return out


# -- DeepSpeed ZeRO-2 -----------------------------------------------------------------------------
def deepspeed_run(device: torch.device, dry: bool, timeout: float) -> dict:
    """``ctrltok train`` for 2 steps under ``accelerate launch`` with the ZeRO-2 launch config."""
    config = ROOT / "recipes" / "accelerate" / "deepspeed-zero2.yaml"
    out: dict = {"launch_config": str(config.relative_to(ROOT)), "deepspeed_json": "recipes/deepspeed/zero2.json",
                 "deepspeed": version("deepspeed")}
    if importlib.util.find_spec("deepspeed") is None:
        return {**out, "skipped": "deepspeed is not installed (pip install deepspeed); the ZeRO-2 run was not tried"}
    if not config.exists():
        return {**out, "skipped": f"{out['launch_config']} does not exist yet (the DeepSpeed wiring ships it)"}
    work = Path(tempfile.gettempdir()) / "gpu_check_zero2" if dry else Path(tempfile.mkdtemp(prefix="gpu_check_zero2_"))
    model_dir, recipe, run_dir = work / "model", work / "recipe.yaml", work / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "1",
           "-m", "ctrltok", "train", str(recipe), "--out", str(run_dir)]
    out["command"] = " ".join(["accelerate", "launch"] + cmd[3:])
    if dry:
        return {**out, "skipped": "dry run: the ZeRO-2 run needs CUDA; the command above is what the real run starts"}
    # a random SmolLM2-135M-shaped model with the shipped tokenizer, as a local model name
    make_model("smollm2-135m", torch.device("cpu")).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(model_dir)
    recipe.write_text(
        "name: gpu-check-zero2\n"
        f"model:\n  name: {model_dir}\n"
        "data:\n  kind: chat\n  train: ctrltok:instructions\n  max_length: 512\n"
        "train:\n  max_steps: 2\n  micro_batch_size: 2\n  grad_accum: 2\n  precision: bf16\n  lr: 1.0e-5\n",
        encoding="utf-8")
    env = {**os.environ, "CTRLTOK_PROGRESS": "0", "PYTHONPATH": str(ROOT / "src") + os.pathsep
           + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**out, "pass": False, "error": f"timed out after {timeout:.0f} s"}
    out["seconds"] = time.perf_counter() - t0
    out["returncode"] = proc.returncode
    steps = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        steps = [r for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]
    out["losses"] = [r["loss"] for r in steps]
    out["deepspeed_in_log"] = "deepspeed" in (proc.stdout + proc.stderr).lower()  # the engine was really used
    out["pass"] = proc.returncode == 0 and len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)
    if not out["pass"]:
        out["stderr_tail"] = proc.stderr[-4000:]
    return out


# -- throughput -----------------------------------------------------------------------------------
def _steps(shape: str, plan: dict) -> list[list[Example]]:
    docs = documents(plan["docs"] * (plan["warmup"] + plan["steps"]), seed=7, max_len=min(1024, plan["row"]),
                     median=min(300.0, plan["row"] / 4), vocab=vocab(shape))
    return [docs[i:i + plan["docs"]] for i in range(0, len(docs), plan["docs"])]


def _result(name: str, times: list[float], steps: list[list[Example]], plan: dict, model, flops_per_s_peak: float,
            **extra) -> dict:
    timed = steps[plan["warmup"]:]
    seconds = sum(times[plan["warmup"]:])
    sup = sum(ex.n_supervised for s in timed for ex in s)
    tokens = sum(len(ex) for s in timed for ex in s)
    flops = sum(model_flops(model, [len(ex) for ex in s]) for s in timed)
    return {"contender": name, "seconds": seconds, "steps": len(timed), "supervised_tokens": sup, "input_tokens": tokens,
            "supervised_tokens_per_s": sup / seconds, "input_tokens_per_s": tokens / seconds,
            "mfu": flops / seconds / flops_per_s_peak, "step_seconds_median": statistics.median(times[plan["warmup"]:]),
            **extra}


def run_ctrltok(shape: str, plan: dict, steps, device: torch.device, dry: bool, peak: float) -> dict:
    impl = training_attention("auto", "cuda" if dry else device)  # dry: the CUDA path, reference kernel
    model = make_model(shape, device, attn=impl).train()
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(mixed_precision="bf16", cpu=device.type == "cpu")
    loss_model = LossModel(model)
    optimizer = torch.optim.AdamW(loss_model.parameters(), lr=1e-5, fused=device.type == "cuda")
    loss_model, optimizer = accelerator.prepare(loss_model, optimizer)
    times, paths, fills = [], set(), []
    for docs in steps:
        rows = pack(docs, plan["row"], "error").rows
        batch = collate(rows, pad_id=2)
        paths.add(cuda_path(batch))
        fills.append(sum(len(ex) for ex in docs) / batch.input_ids.numel())
        sync(device)
        t0 = time.perf_counter()
        with accelerator.autocast():
            loss, _, _ = run_batch(loss_model, batch, impl, accelerator.device, float(max(batch.n_targets, 1)), 1.0)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(loss_model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t0)
    result = _result("ctrltok packed", times, steps, plan, model, peak, attention=f"{impl} ({'/'.join(sorted(paths))})",
                     row_fill=statistics.fmean(fills))
    del loss_model, optimizer, model, accelerator
    AcceleratorState._reset_state(True)
    return result


def run_trl(shape: str, plan: dict, steps, device: torch.device, dry: bool, peak: float, padding_free: bool) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    if padding_free:
        if importlib.util.find_spec("flash_attn") is not None and device.type == "cuda":
            attn = "flash_attention_2"
        else:
            AttentionInterface.register(TRL_VARLEN, trl_varlen_forward)
            attn = TRL_VARLEN
    else:
        attn = "sdpa"
    model = make_model(shape, device, attn=attn).train()
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = Dataset.from_list([{"input_ids": ex.input_ids, "labels": ex.labels} for s in steps for ex in s])
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            times.append(time.perf_counter() - self.t0)

    AcceleratorState._reset_state(True)
    with tempfile.TemporaryDirectory() as out:
        cfg = SFTConfig(output_dir=out, per_device_train_batch_size=plan["docs"], gradient_accumulation_steps=1,
                        max_steps=len(steps), learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0,
                        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch_fused" if device.type == "cuda"
                        else "adamw_torch", bf16=True, gradient_checkpointing=False, logging_strategy="no",
                        save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
                        dataloader_num_workers=0, use_cpu=device.type == "cpu", train_sampling_strategy="sequential",
                        shuffle_dataset=False, packing=False, padding_free=padding_free, max_length=None,
                        completion_only_loss=None, seed=0)
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tokenizer,
                             callbacks=[Clock()])
        trainer.train()
    name = "TRL padding-free" if padding_free else "TRL padded"
    if len(times) != len(steps):
        raise RuntimeError(f"{name}: {len(times)} optimizer steps timed, {len(steps)} expected")
    result = _result(name, times, steps, plan, model, peak, attention=attn, trl=version("trl"))
    del trainer, model
    AcceleratorState._reset_state(True)
    return result


def throughput(plans: dict, device: torch.device, dry: bool, budget: Budget, need: dict) -> dict:
    out: dict = {}
    peak = PEAK_TFLOPS * 1e12
    for shape, plan in plans.items():
        steps = _steps(shape, plan)
        entry: dict = {"plan": plan, "contenders": {}}
        for name, fn in (("ctrltok packed", lambda: run_ctrltok(shape, plan, steps, device, dry, peak)),
                         ("TRL padding-free", lambda: run_trl(shape, plan, steps, device, dry, peak, True)),
                         ("TRL padded", lambda: run_trl(shape, plan, steps, device, dry, peak, False))):
            if not budget.allows(need[shape]):
                entry["contenders"][name] = {"skipped": f"time budget ({budget.left():.0f} s left)"}
                continue
            try:
                entry["contenders"][name] = fn()
            except Exception as exc:  # one contender failing (an OOM, a TRL change) must not lose the others
                entry["contenders"][name] = {"error": f"{type(exc).__name__}: {exc}",
                                             "traceback": traceback.format_exc()[-3000:]}
            free(device)
        c = entry["contenders"]
        ours, peer = c.get("ctrltok packed", {}), c.get("TRL padding-free", {})
        if "supervised_tokens_per_s" in ours and "supervised_tokens_per_s" in peer:
            entry["ratio_vs_trl_padding_free"] = ours["supervised_tokens_per_s"] / peer["supervised_tokens_per_s"]
        padded = c.get("TRL padded", {})
        if "supervised_tokens_per_s" in ours and "supervised_tokens_per_s" in padded:
            entry["ratio_vs_trl_padded"] = ours["supervised_tokens_per_s"] / padded["supervised_tokens_per_s"]
        out[shape] = entry
    return out


# -- EPE hole cost --------------------------------------------------------------------------------
def hole_cost(shape: str, sizes: dict, device: torch.device, dry: bool) -> dict:
    """Forward + backward of packed EPE rows with holes (FlexAttention) vs the same rows without
    (flash varlen), interleaved, medians (CPU: forward only, FlexAttention has no CPU backward)."""
    impl = training_attention(CUDA, "cuda")
    model = make_model(shape, device, attn=impl).train()
    loss_model = LossModel(model)
    per_doc = sizes["hole_doc"]
    docs_per_row = sizes["hole_row"] // per_doc
    examples, _ = epe_documents(docs_per_row * sizes["hole_rows"], seed=3, length=per_doc - 41, vocab=vocab(shape))
    rows = pack(examples, sizes["hole_row"], "error").rows
    holes = collate(rows, pad_id=2, pad_to=sizes["hole_row"])
    plain = collate(rows, pad_id=2, pad_to=sizes["hole_row"])
    plain.blocked = [[] for _ in plain.blocked]
    assert cuda_path(holes) == "flex" and cuda_path(plain) == "varlen"
    backward = device.type == "cuda"
    grad = torch.enable_grad() if backward else torch.no_grad()

    def once(batch: Batch) -> float:
        sync(device)
        t0 = time.perf_counter()
        with grad, torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _, _ = run_batch(loss_model, batch, impl, device, float(max(batch.n_targets, 1)), 1.0)
        if backward:
            loss.backward()
            loss_model.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    once(holes), once(plain)  # compile FlexAttention (forward and backward) and warm both up
    warm = time.perf_counter() - t0
    times: dict[str, list[float]] = {"holes (flex)": [], "no holes (varlen)": []}
    for _ in range(sizes["hole_reps"]):
        times["holes (flex)"].append(once(holes))
        times["no holes (varlen)"].append(once(plain))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"shape": shape, "rows": list(holes.shape), "documents": len(examples), "reflection_tokens": 41,
            "pass_timed": "forward + backward" if backward else "forward only (no FlexAttention backward on CPU)",
            "median_seconds": med, "warmup_seconds": warm,
            "overhead": med["holes (flex)"] / med["no holes (varlen)"] - 1.0}


# -- main -----------------------------------------------------------------------------------------
def targets(report: dict, plans: dict, big: str) -> list[dict]:
    out = []
    for shape in plans:
        ratio = report.get("throughput", {}).get(shape, {}).get("ratio_vs_trl_padding_free")
        out.append({"target": f"ctrltok packed / TRL padding-free, supervised tokens/s ({shape}) >= 1.3x",
                    "value": ratio, "pass": None if ratio is None else ratio >= 1.3})
    mfu = report.get("throughput", {}).get(big, {}).get("contenders", {}).get("ctrltok packed", {}).get("mfu")
    out.append({"target": f"MFU of ctrltok packed ({big}) >= 45%", "value": mfu,
                "pass": None if mfu is None else mfu >= 0.45})
    over = report.get("epe_hole_cost", {}).get("overhead")
    out.append({"target": "EPE holes (FlexAttention) over varlen causal <= 10%", "value": over,
                "pass": None if over is None else over <= 0.10})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, reference kernel: proves the script")
    ap.add_argument("--out", default=str(ROOT / "runs" / "gpu_check.json"), help="the JSON written")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget, parts past it skipped (default 450 s; --dry-run: 3600 s)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["equivalence", "deepspeed", "throughput", "holes"])
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here. This check measures the GPU paths and needs one GPU (an H200 "
              "for the stated peak); run `bash bench/gpu_check.sh --dry-run` to exercise the script on CPU.",
              file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("CTRLTOK_PROGRESS", "0")
    budget = Budget(args.budget_s or (3600.0 if args.dry_run else 450.0))
    device = torch.device("cpu" if args.dry_run else "cuda")
    sizes = DRY if args.dry_run else REAL
    if args.dry_run:
        use_reference_kernel()
        torch.set_num_threads(min(2, torch.get_num_threads()))
    report: dict = {
        "command": "bash bench/gpu_check.sh " + " ".join(sys.argv[1:] if argv is None else argv),
        "dry_run": args.dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "environment": {"torch": torch.__version__, "transformers": version("transformers"), "trl": version("trl"),
                        "accelerate": version("accelerate"), "deepspeed": version("deepspeed"),
                        "liger_kernel": version("liger-kernel"), "flash_attn": version("flash-attn"),
                        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                        "peak_tflops_assumed": PEAK_TFLOPS, "auto_attention_on_cuda": training_attention("auto", "cuda")},
        "tolerance": "packed/EPE logits vs unpacked bf16 logits: max |diff| <= max(2 x noise, 0.02), noise = max |bf16 - "
                     "fp32| of the unpacked forward (measured in the run)",
        "mfu_formula": "sum over documents of 6*P*n + 6*L*(heads*head_dim)*n^2 (causal fwd+bwd), padding excluded, over "
                       f"{PEAK_TFLOPS:.0f} TFLOP/s",
        "checks": {},
    }
    if args.dry_run:
        report["note"] = "dry run: CPU, tiny shapes, the flash kernel replaced by varlen_reference; figures mean nothing"

    def part(name: str, need: float, fn):
        if name in args.skip:
            return {"skipped": "--skip"}
        if not budget.allows(need):
            return {"skipped": f"time budget ({budget.left():.0f} s left, {need:.0f} s needed)"}
        t0 = time.perf_counter()
        try:
            result = fn()
        except Exception as exc:
            result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        print(f"[{time.perf_counter() - budget.t0:6.1f} s] {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        free(device)
        return result

    eq = part("equivalence", 30, lambda: equivalence(sizes["equivalence"], sizes["rows"], device))
    for key in ("varlen", "flex", "epe_flex"):
        report["checks"][key] = eq.get(key, {k: v for k, v in eq.items() if k in ("skipped", "error", "traceback")})
    report["epe_hole_cost"] = part("holes", 30, lambda: hole_cost(sizes["hole_cost"], sizes["rows"], device,
                                                                 args.dry_run))
    plans = sizes["throughput"]
    shapes = list(plans)
    need = {shapes[0]: 20, shapes[-1]: 30} if args.dry_run else {shapes[0]: 40, shapes[-1]: 60}
    report["throughput"] = part("throughput", need[shapes[0]], lambda: throughput(plans, device, args.dry_run,
                                                                                 budget, need))
    # last: a subprocess with its own timeout, given what the budget has left (the launch config may be missing)
    report["checks"]["deepspeed_zero2"] = part("deepspeed", 45, lambda: deepspeed_run(
        device, args.dry_run, timeout=min(180.0, budget.left() - 5)))
    report["targets"] = targets(report, plans, shapes[-1])
    report["seconds"] = time.perf_counter() - budget.t0

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print()
    for key, check in report["checks"].items():
        state = "SKIP" if "skipped" in check else ("ERROR" if "error" in check else ("PASS" if check.get("pass") else "FAIL"))
        detail = check.get("skipped") or check.get("error") or (
            f"max |diff| {check['max_abs_diff']:.4f} <= {check['tolerance']:.4f}" if "max_abs_diff" in check else "")
        print(f"CHECK  {key:16s} {state:5s} {detail}")
    for shape, entry in report["throughput"].items():
        if not isinstance(entry, dict) or "contenders" not in entry:
            continue
        for name, c in entry["contenders"].items():
            if "supervised_tokens_per_s" in c:
                print(f"RATE   {shape:14s} {name:18s} {c['supervised_tokens_per_s']:12.0f} sup tok/s  MFU {c['mfu']:.1%}"
                      f"  ({c['attention']})")
            else:
                print(f"RATE   {shape:14s} {name:18s} {c.get('skipped') or c.get('error')}")
    for t in report["targets"]:
        value = "n/a" if t["value"] is None else (f"{t['value']:.1%}" if "MFU" in t["target"] or "EPE" in t["target"]
                                                   else f"{t['value']:.2f}x")
        state = "n/a" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
        print(f"TARGET {t['target']}: {value} {state}{' (dry run: meaningless)' if args.dry_run else ''}")
    print(f"\nwrote {out} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
