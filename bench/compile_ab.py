"""``train.compile`` A/B: eager vs compiled training steps, alternating in one process on the same rows.

The interleaved ``sft_throughput.py`` runs each contender alone for a whole round (30-60 s), and
this machine's speed moves more than a few percent between rounds, so a ~8% difference drowns
there. Here two copies of SmolLM2-135M (same weights, same packed 1,024-token rows, per-document
attention, ``LossModel``, fused AdamW) take turns step by step, the order flipping each row, and
the script sums each copy's step times. The compiled copy has ``compiling.compile_blocks`` applied
(the decoder layers' MLPs and norms); its compilation happens in the warm-up steps, which are not
timed. ``--lora`` puts PEFT LoRA (r 16, all projections) on both copies, as the CPU recipes do.

    python bench/compile_ab.py [--rows 18] [--lora]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft_throughput import conversations, encode, load  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=18, help="timed rows (after 3 warm-up rows)")
    ap.add_argument("--lora", action="store_true", help="LoRA r=16 on all projections (as recipes/*-cpu.yaml)")
    ap.add_argument("--threads", type=int, default=min(2, torch.get_num_threads()))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from ctrltok.core.attention import training_attention
    from ctrltok.core.loss import LossModel, run_batch
    from ctrltok.core.packing import pack
    from ctrltok.data.encode import to_batch
    from ctrltok.training.compiling import compile_blocks, compile_unavailable
    from ctrltok.training.train import make_optimizer

    if compile_unavailable():
        raise SystemExit(f"torch.compile does not work here: {compile_unavailable()}")
    model, tokenizer = load(tiny=False)
    _, examples = encode(tokenizer, conversations(400, 0)[0], 512)
    rows = pack(examples, 1024, "error").rows[: args.rows + 3]
    impl = training_attention("auto", torch.device("cpu"))
    model.set_attn_implementation(impl)
    copies = {"eager": model, "compiled": copy.deepcopy(model)}
    if args.lora:
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        copies = {k: get_peft_model(m, LoraConfig(r=16, lora_alpha=32, target_modules=targets)) for k, m in copies.items()}
    print(f"compiled modules: {compile_blocks(copies['compiled'])}")
    runs = {}
    for name, m in copies.items():
        lm = LossModel(m).train()
        runs[name] = (lm, make_optimizer([p for p in lm.parameters() if p.requires_grad], lr=2e-5, weight_decay=0.0))

    def step(name: str, row) -> tuple[float, float]:
        lm, opt = runs[name]
        batch = to_batch([row], tokenizer.pad_token_id, True)
        t0 = time.perf_counter()
        loss, _, _ = run_batch(lm, batch, impl, torch.device("cpu"), float(batch.n_targets), 1.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, float(loss.detach())

    for name in runs:
        for row in rows[:3]:
            step(name, row)
    total = dict.fromkeys(runs, 0.0)
    for i, row in enumerate(rows[3:]):
        losses = {}
        for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
            dt, losses[name] = step(name, row)
            total[name] += dt
        print(f"row {i + 1}/{len(rows) - 3}: {sum(len(ex) for ex in row)} tokens, eager {total['eager']:.1f} s, "
              f"compiled {total['compiled']:.1f} s, loss {losses['eager']:.4f} / {losses['compiled']:.4f}", flush=True)
    print(f"\n{'LoRA r=16' if args.lora else 'full fine-tuning'}, SmolLM2-135M, {len(rows) - 3} rows of <= 1024 tokens, "
          f"{args.threads} threads: eager / compiled step time = {total['eager'] / total['compiled']:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
