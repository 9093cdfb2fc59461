"""SFT training throughput: ctrltok packed / ctrltok padded / TRL SFTTrainer / transformers Trainer.

What is compared. The same chat data (the shipped instructions, plus LIMA and Alpaca from
``../shared/data`` when present), shuffled once with a fixed seed, each conversation cut to its
first ``--max-length`` (512) tokens, loss on assistant turns and their closing ``<|im_end|>`` only,
and the same model (SmolLM2-135M-Instruct from ``load_model("smollm2-135m")``; ``--tiny``: a random
4-layer Llama with the real tokenizer). Everything fp32, AdamW (torch), lr 2e-5 constant, weight
decay 0, gradient clipping at 1.0, no gradient checkpointing, one process, ``--threads`` threads.
AdamW is each library's default: fused (``torch.optim.AdamW(fused=True)``) for all four.

| contender | one optimizer step |
|---|---|
| ctrltok packed | one row of <= 1024 tokens (best-fit decreasing ``pack`` of the round's conversations), documents isolated by the attention ``train`` uses by default (``model.attn: auto``: per-document SDPA on CPU), ``LossModel`` (LM head on supervised positions only), ``train.compile: true`` (the decoder layers' MLPs and norms through inductor, compiled during the warm-up) |
| ctrltok packed, eager | the same, ``train.compile: false`` (the default) |
| ctrltok packed, dense mask (optional) | the same rows behind an explicit block-diagonal ``[T, T]`` mask in one SDPA call (``model.attn: sdpa``), compiled |
| ctrltok padded | 2 conversations padded to the longer one (``pad_batch``), same ``LossModel``, default attention, compiled |
| TRL SFTTrainer | 2 conversations padded to the longer one; ``assistant_only_loss=True`` with our ``default`` template plus ``{% generation %}`` markers (``bench/encode.py``); ``bf16=False`` and ``gradient_checkpointing=False`` (TRL turns both on by default), ``packing=False``, ``padding_free=False`` |
| TRL SFTTrainer padded, compiled (optional) | the same with ``torch_compile=True`` (the whole model through inductor) |
| transformers Trainer | 2 conversations padded to the longer one (``DataCollatorForSeq2Seq``), labels -100 off the assistant turns (from ctrltok's encoder), the model's own loss |

So the global batch is <= 1024 tokens for every contender (packed 1 x 1024 vs padded 2 x 512).
The ctrltok contenders run the loop body of ``train.py`` (``to_batch``, ``run_batch`` with
``build_mask``, ``accelerator.backward``, clipping, ``optimizer.step``).

How it is measured. Each contender lives in its own process (so its peak RSS is its own), sets
up, trains on a warm-up share of the data, then waits. The parent then runs ``--rounds`` rounds;
in each, every contender in turn (rotating the order) trains on *the same* ``--steps x --batch``
conversations, the next ones in the shared shuffled order, while the others sleep: the padded
contenders in ``--steps`` optimizer steps of ``--batch``, the packed ones in as many steps as those
conversations pack into (packed per round, so less tightly than ``ctrltok train`` packs a whole
set). Each reports its wall time, input tokens (non-padding) and supervised tokens (targets after
the shift; the same count for every contender, which the report checks). Tables show medians over
the rounds, and per-round ratios compare identical work. Before each round the parent measures a
2048 x 2048 fp32 matmul (GFLOP/s, best of 5); model FLOPs utilisation (MFU) is the useful model
FLOP/s, ``6 * params * input tokens + 6 * layers * d_attn * n^2`` per document of ``n`` tokens
(causal attention, forward + backward; padding is not useful work), over the median matmul rate.

    python bench/sft_throughput.py --tiny                       # a quick run, random tiny Llama
    nohup python bench/sft_throughput.py > /tmp/sft_bench.log 2>&1 &    # SmolLM2-135M, 10-20 min
    python bench/sft_throughput.py --only "ctrltok packed" "TRL SFTTrainer padded" "TRL SFTTrainer padded, compiled"

Target (issue 3): ctrltok packed >= 2x TRL padded in supervised tokens/s.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encode import DEFAULT_WITH_GENERATION, SHARED, TOKENIZER, lima, shipped  # noqa: E402

CONTENDERS = ("ctrltok packed", "ctrltok packed, eager", "ctrltok padded", "TRL SFTTrainer padded",
              "transformers Trainer padded")
# Run only when named with --only (each process holds ~5 GB: six or more at once exhaust 24 GiB).
OPTIONAL = ("ctrltok packed, dense mask", "TRL SFTTrainer padded, compiled")


# -- data and model (built identically in every worker) -------------------------------------------
def alpaca(path: Path) -> list[list[dict]]:
    from ctrltok.core.conversation import to_conversation

    with path.open(encoding="utf-8") as fh:
        return [to_conversation(json.loads(line), f"{path.name}:{i}") for i, line in enumerate(fh, 1)]


def conversations(limit: int, seed: int) -> tuple[list[list[dict]], str]:
    convs, names = shipped(), [f"instructions.jsonl ({len(shipped())})"]
    for name, path, read in (("lima", SHARED / "lima" / "lima_train.jsonl", lima),
                             ("alpaca", SHARED / "alpaca" / "alpaca_5000.jsonl", alpaca)):
        if path.exists():
            extra = read(path)
            convs += extra
            names.append(f"{name} ({len(extra)})")
    random.Random(seed).shuffle(convs)
    return convs[:limit], " + ".join(names) + f", shuffled (seed {seed}), first {min(limit, len(convs))}"


def load(tiny: bool):
    if not tiny:
        from ctrltok.core.models import load_model

        model, tokenizer = load_model("smollm2-135m")
    else:
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                             bos_token_id=1, eos_token_id=2, pad_token_id=2, attn_implementation="sdpa")
        model = LlamaForCausalLM(config)
    model.config.use_cache = False  # training: no KV cache for anyone
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def encode(tokenizer, convs: list[list[dict]], max_length: int):
    """ctrltok's examples, cut to max_length; conversations left with no target are dropped for all."""
    from ctrltok.core.chat import ChatEncoder
    from ctrltok.core.packing import slice_example

    examples = ChatEncoder(tokenizer, "default").encode_many(convs)
    kept_convs, kept = [], []
    for msgs, ex in zip(convs, examples):
        if len(ex) > max_length:
            ex = slice_example(ex, 0, max_length)
        if ex.n_supervised:
            kept.append(ex)
            kept_convs.append(msgs)
    return kept_convs, kept


def model_flops(n_params: int, layers: int, d_attn: int, doc_lengths) -> float:
    return float(sum(6 * n_params * n + 6 * layers * d_attn * n * n for n in doc_lengths))


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


# -- the worker side --------------------------------------------------------------------------------
class Stop(Exception):
    pass


class Gate:
    """Counts work per optimizer step; after warm-up and after every round, reports and waits.

    ``plan`` is the number of optimizer steps of each phase (warm-up, round 1, round 2, ...): the
    padded contenders take ``--steps`` steps of ``--batch`` conversations per round, the packed ones
    as many rows as that round's conversations pack into.
    """

    def __init__(self, conn, plan: list[int], model, setup_t0: float):
        self.conn, self.step = conn, 0
        self.bounds = [sum(plan[:i + 1]) for i in range(len(plan))]
        cfg = model.config
        self.n_params = sum(p.numel() for p in model.parameters())
        self.layers = cfg.num_hidden_layers
        self.d_attn = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
        self.setup_t0 = setup_t0
        self.t0 = 0.0
        self.steps = 0
        self._reset()

    def _reset(self) -> None:
        self.input_tokens = self.supervised = self.slots = self.steps = 0
        self.flops = 0.0
        self.losses: list[float] = []

    def add(self, doc_lengths, supervised: int, slots: int, loss: float) -> None:
        """One micro-batch: real document lengths, targets, and the tokens the model computed on."""
        doc_lengths = [int(n) for n in doc_lengths]
        self.input_tokens += sum(doc_lengths)
        self.supervised += int(supervised)
        self.slots += int(slots)
        self.flops += model_flops(self.n_params, self.layers, self.d_attn, doc_lengths)
        self.losses.append(float(loss))

    def _wait(self) -> None:
        cmd = self.conn.recv()
        if cmd[0] == "stop":
            raise Stop
        self._reset()
        self.t0 = time.perf_counter()

    def after_step(self) -> None:
        self.step += 1
        self.steps += 1
        if self.step == self.bounds[0]:
            self.conn.send({"ready": True, "setup_s": time.perf_counter() - self.setup_t0, "params": self.n_params})
            self._wait()
        elif self.step in self.bounds[1:]:
            self.conn.send({"seconds": time.perf_counter() - self.t0, "input_tokens": self.input_tokens,
                            "supervised": self.supervised, "slots": self.slots, "flops": self.flops,
                            "steps": self.steps, "loss": statistics.fmean(self.losses)})
            self._wait()
        elif self.step > self.bounds[-1]:
            raise RuntimeError("ran past the last round without a stop from the parent")


def phases(args) -> list[int]:
    """Conversations per phase (warm-up, then each round), consumed in the shared shuffled order."""
    return [args.batch * args.warmup] + [args.batch * args.steps] * args.rounds


def packed_rows(examples, args) -> tuple[list[list], list[int]]:
    """Each phase's conversations packed on their own (best-fit decreasing, rows <= --row-length), so
    the packed contenders train on exactly the conversations the padded ones see in that round.
    (``ctrltok train`` packs the whole set, which fills rows better: this is the harder case.)"""
    from ctrltok.core.packing import pack

    rows, plan, start = [], [], 0
    for n in phases(args):
        chunk = pack(examples[start:start + n], args.row_length, "error").rows
        rows += chunk
        plan.append(len(chunk))
        start += n
    return rows, plan


def run_ctrltok(gate: Gate, model, tokenizer, examples, args, packed: bool, attn: str = "auto",
                compile: bool = True) -> None:
    from accelerate import Accelerator

    from ctrltok.core.attention import training_attention
    from ctrltok.core.loss import LossModel, run_batch
    from ctrltok.data.encode import to_batch
    from ctrltok.training.compiling import compile_blocks, compile_unavailable
    from ctrltok.training.train import make_optimizer

    if packed:
        rows, _ = packed_rows(examples, args)
        per_step = 1
    else:
        rows = [[ex] for ex in examples]  # in the shared shuffled order, like the Trainers' sequential sampler
        per_step = args.batch
    pad_id = tokenizer.pad_token_id
    accelerator = Accelerator(cpu=True)
    impl = training_attention(attn, accelerator.device)  # what `ctrltok train` picks for model.attn
    model.set_attn_implementation(impl)
    if compile:  # train.compile: true; compiled during the warm-up steps
        if compile_unavailable():
            raise RuntimeError(f"torch.compile does not work here: {compile_unavailable()}")
        compile_blocks(model)
    loss_model = LossModel(model)
    loss_model.train()
    params = [p for p in loss_model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, lr=args.lr, weight_decay=0.0)
    loss_model, optimizer = accelerator.prepare(loss_model, optimizer)
    for step in range(10**9):
        batch_rows = rows[step * per_step:(step + 1) * per_step]
        batch = to_batch(batch_rows, pad_id, packed)
        n = max(batch.n_targets, 1)
        loss, ce_sum, _ = run_batch(loss_model, batch, impl, accelerator.device, float(n), 1.0)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(loss_model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        gate.add([len(ex) for row in batch_rows for ex in row], batch.n_targets, batch.input_ids.numel(),
                 float(ce_sum) / n)
        gate.after_step()


def _training_args(cls, out: str, args, **extra):
    return cls(output_dir=out, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
               max_steps=args.warmup + args.rounds * args.steps + 1, learning_rate=args.lr,
               lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
               bf16=False, fp16=False, gradient_checkpointing=False, logging_strategy="no", save_strategy="no",
               eval_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0, use_cpu=True,
               train_sampling_strategy="sequential", seed=args.seed, **extra)


def _counting(trainer_cls, gate: Gate):
    """A subclass that counts each micro-batch's work, and a callback that closes each step."""
    from transformers import TrainerCallback

    class Counting(trainer_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
            mask = inputs["attention_mask"]
            targets = inputs["labels"][:, 1:] != -100
            value = (loss[0] if isinstance(loss, tuple) else loss).detach()
            gate.add(mask.sum(dim=1).tolist(), int(targets.sum()), mask.numel(), float(value))
            return loss

    class Close(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            gate.after_step()

    return Counting, Close()


def run_trl(gate: Gate, model, tokenizer, convs, args, compile: bool = False) -> None:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer.chat_template = DEFAULT_WITH_GENERATION
    cls, close = _counting(SFTTrainer, gate)
    with tempfile.TemporaryDirectory() as out:
        cfg = _training_args(SFTConfig, out, args, assistant_only_loss=True, completion_only_loss=None, packing=False,
                             padding_free=False, max_length=args.max_length, dataset_num_proc=None,
                             torch_compile=compile)
        trainer = cls(model=model, args=cfg, train_dataset=Dataset.from_list([{"messages": m} for m in convs]),
                      processing_class=tokenizer, callbacks=[close])
        trainer.train()


def run_hf(gate: Gate, model, tokenizer, examples, args) -> None:
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    data = Dataset.from_list([{"input_ids": ex.input_ids, "labels": ex.labels} for ex in examples])
    cls, close = _counting(Trainer, gate)
    with tempfile.TemporaryDirectory() as out:
        trainer = cls(model=model, args=_training_args(TrainingArguments, out, args), train_dataset=data,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
                      callbacks=[close])
        trainer.train()


def worker(conn, name: str, args) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        import datasets

        datasets.disable_progress_bars()  # keep the log readable: TRL maps the data set several times
        model, tokenizer = load(args.tiny)
        convs, _ = conversations(args.limit, args.seed)
        convs, examples = encode(tokenizer, convs, args.max_length)
        plan = (packed_rows(examples, args)[1] if name.startswith("ctrltok packed")
                else [args.warmup] + [args.steps] * args.rounds)
        gate = Gate(conn, plan, model, t0)
        try:
            if name == "ctrltok packed":
                run_ctrltok(gate, model, tokenizer, examples, args, packed=True)
            elif name == "ctrltok packed, eager":
                run_ctrltok(gate, model, tokenizer, examples, args, packed=True, compile=False)
            elif name == "ctrltok packed, dense mask":
                run_ctrltok(gate, model, tokenizer, examples, args, packed=True, attn="sdpa")
            elif name == "ctrltok padded":
                run_ctrltok(gate, model, tokenizer, examples, args, packed=False)
            elif name == "TRL SFTTrainer padded":
                run_trl(gate, model, tokenizer, convs, args)
            elif name == "TRL SFTTrainer padded, compiled":
                run_trl(gate, model, tokenizer, convs, args, compile=True)
            else:
                run_hf(gate, model, tokenizer, examples, args)
            raise RuntimeError(f"{name}: training ended before the parent said stop (too few max_steps)")
        except Stop:
            pass
        conn.send({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    except Exception as exc:  # the parent prints it, naming the contender
        import traceback

        conn.send({"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"})


# -- the parent ---------------------------------------------------------------------------------------
def _recv(conn, name: str) -> dict:
    msg = conn.recv()
    if "error" in msg:
        raise SystemExit(f"contender {name!r} failed:\n{msg['error']}")
    return msg


def report(args, names: list[str], results: dict[str, list[dict]], peaks: list[float], rss: dict[str, float],
           params: int, partial: int = 0) -> None:
    """The table (medians over the rounds so far) and the ratios; peak RSS only at the end."""
    head = f"after round {partial} of {args.rounds}: " if partial else ""
    _, data_desc = conversations(args.limit, args.seed)
    peak = statistics.median(peaks)
    print(f"\n{head}model: {'tiny random Llama (4 layers, hidden 128)' if args.tiny else 'SmolLM2-135M-Instruct'}, "
          f"{params / 1e6:.1f}M params, fp32, {args.threads} threads")
    print(f"data: {data_desc}; conversations cut to {args.max_length} tokens")
    per_round = args.batch * args.steps
    print(f"rounds: {args.rounds} interleaved; in each, every contender trains on the same {per_round} conversations "
          f"(padded: {args.steps} steps of {args.batch}; packed: the rows they pack into); "
          f"warm-up: the {args.batch * args.warmup} before them; medians over rounds")
    print(f"matmul 2048x2048 fp32: median {peak:.0f} GFLOP/s (min {min(peaks):.0f}, max {max(peaks):.0f})\n")
    header = (f"{'contender':<34}{'batch':>12}{'steps/round':>12}{'sup tok/s':>11}{'input tok/s':>13}{'sup/input':>11}"
              f"{'pad waste':>11}{'MFU':>8}{'peak RSS':>11}")
    print(header)
    print("-" * len(header))
    med = {}
    for name in names:
        rs = results[name]
        sup = statistics.median(x["supervised"] / x["seconds"] for x in rs)
        inp = statistics.median(x["input_tokens"] / x["seconds"] for x in rs)
        flops = statistics.median(x["flops"] / x["seconds"] for x in rs)
        waste = 1 - sum(x["input_tokens"] for x in rs) / max(sum(x["slots"] for x in rs), 1)
        med[name] = sup
        batch = f"1x{args.row_length}" if name.startswith("ctrltok packed") else f"{args.batch}x<={args.max_length}"
        steps = statistics.median(x["steps"] for x in rs)
        print(f"{name:<34}{batch:>12}{steps:>12g}{sup:>11.1f}{inp:>13.1f}{sup / inp:>11.2f}{waste:>10.0%}"
              f"{flops / (peak * 1e9):>8.1%}{rss.get(name, float('nan')):>9.0f}MB")
    targets = {name: [x["supervised"] for x in results[name]] for name in names}
    same = len({tuple(t) for t in targets.values()}) == 1
    print(f"\nsupervised targets per round: {targets[names[0]]}"
          + (" (the same for every contender)" if same else f" - NOT the same: {targets}"))
    def ratio(a: str, b: str, target: str = "") -> None:
        """Per round (identical work) and their median, which is the headline figure."""
        if a not in med or b not in med:
            return
        per_round = [x["supervised"] / x["seconds"] / (y["supervised"] / y["seconds"])
                     for x, y in zip(results[a], results[b])]
        print(f"ratio {a} / {b} (supervised tok/s): {statistics.median(per_round):.2f}x median of rounds "
              f"(per round: {', '.join(f'{r:.2f}' for r in per_round)}; ratio of medians {med[a] / med[b]:.2f}x)"
              + (f"; target {target}" if target else ""))

    print()
    ratio("ctrltok packed", "TRL SFTTrainer padded", ">= 2x")
    ratio("ctrltok packed", "TRL SFTTrainer padded, compiled")
    ratio("ctrltok packed", "transformers Trainer padded")
    ratio("ctrltok packed", "ctrltok packed, eager")
    ratio("ctrltok packed", "ctrltok packed, dense mask")
    ratio("ctrltok packed", "ctrltok padded")

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="random tiny Llama with the real tokenizer (fast)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=16,
                    help="padded optimizer steps per round (the round's conversations: --steps x --batch)")
    ap.add_argument("--warmup", type=int, default=2, help="optimizer steps before timing")
    ap.add_argument("--max-length", type=int, default=512, help="tokens kept per conversation")
    ap.add_argument("--row-length", type=int, default=1024, help="packed row length (ctrltok packed)")
    ap.add_argument("--batch", type=int, default=2, help="conversations per padded batch")
    ap.add_argument("--limit", type=int, default=1500, help="conversations used (after shuffling)")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=min(2, torch.get_num_threads()))
    ap.add_argument("--only", nargs="*", choices=CONTENDERS + OPTIONAL,
                    help="run only these contenders (the optional ones run only when named here)")
    args = ap.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        ap.error("--warmup, --steps and --rounds must be >= 1")
    names = list(args.only or CONTENDERS)

    ctx = mp.get_context("spawn")
    procs, conns, setup = {}, {}, {}
    for name in names:  # set up one at a time: loading and warm-up never overlap
        parent, child = ctx.Pipe()
        p = ctx.Process(target=worker, args=(child, name, args), daemon=True)
        p.start()
        procs[name], conns[name] = p, parent
        setup[name] = _recv(parent, name)
        print(f"ready: {name} (setup + {args.warmup} warm-up steps: {setup[name]['setup_s']:.0f} s)", flush=True)

    torch.set_num_threads(args.threads)
    results: dict[str, list[dict]] = {n: [] for n in names}
    peaks = []
    for r in range(args.rounds):
        peaks.append(matmul_gflops())
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            conns[name].send(("run", args.steps))
            res = _recv(conns[name], name)
            results[name].append(res)
            print(f"round {r + 1}/{args.rounds} {name}: {res['supervised'] / res['seconds']:.1f} supervised tok/s, "
                  f"{res['input_tokens'] / res['seconds']:.1f} input tok/s, loss {res['loss']:.3f}", flush=True)
        if r + 1 < args.rounds:  # a long run shows its figures so far
            report(args, names, results, peaks, {}, setup[names[0]]["params"], partial=r + 1)
    peaks.append(matmul_gflops())
    rss = {}
    for name in names:
        conns[name].send(("stop",))
        rss[name] = _recv(conns[name], name)["peak_rss_mb"]
        procs[name].join(timeout=60)

    report(args, names, results, peaks, rss, setup[names[0]]["params"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
