"""Generated tokens/s: ctrltok's batched TransformersBackend vs one-prompt-at-a-time model.generate.

Same model, same prompts (the first N user turns of the shipped instruction set, rendered with the
model's chat template), same greedy decoding and token budget. Runs are interleaved (A B A B ...)
because this machine's speed drifts within seconds; the table shows medians over the repeats.
Tokens counted are the tokens each method really generated, up to and including the stop token.

    python bench/generate_throughput.py             # embedded SmolLM2-135M-Instruct
    python bench/generate_throughput.py --tiny      # random tiny Llama, a quick smoke run

Target (issue 6): batched >= 5x one-at-a-time on CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from ctrltok.core.models import load_model
from ctrltok.generation.completion import Sampling, TransformersBackend

ROOT = Path(__file__).resolve().parents[1]
INSTRUCTIONS = ROOT / "src" / "ctrltok" / "resources" / "instructions.jsonl"
TINY_TOKENIZER = ROOT / "tests" / "assets" / "smollm2-tokenizer"


def load(tiny: bool):
    if not tiny:
        return load_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(config).eval(), tokenizer


def prompts(tokenizer, n: int) -> list[str]:
    questions = []
    with INSTRUCTIONS.open(encoding="utf-8") as fh:
        for line in fh:
            messages = json.loads(line)["messages"]
            questions.append(next(m["content"] for m in messages if m["role"] == "user"))
            if len(questions) == n:
                break
    if len(questions) < n:
        raise SystemExit(f"{INSTRUCTIONS} has only {len(questions)} instructions, {n} asked")
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q in questions]


def one_at_a_time(model, tokenizer, texts: list[str], max_new_tokens: int) -> tuple[int, list[list[int]]]:
    """The peer: plain model.generate, one prompt per call, no padding."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    total, outputs = 0, []
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False)[0, ids.shape[1]:].tolist()
            end = next((k + 1 for k, t in enumerate(out) if t in eos), len(out))
            outputs.append(out[:end])
            total += end
    return total, outputs


def batched(backend: TransformersBackend, texts: list[str], max_new_tokens: int) -> tuple[int, list[list[int]]]:
    completions = backend.generate(texts, Sampling(max_new_tokens=max_new_tokens))
    return sum(len(c.token_ids) for c in completions), [c.token_ids for c in completions]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="random tiny Llama with the SmolLM2 tokenizer (quick)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="16,32", help="comma-separated TransformersBackend batch sizes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0 = torch's default); 1 is steadier on a busy shared machine")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load(args.tiny)
    texts = prompts(tokenizer, args.prompts)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    contenders = {"model.generate, one prompt at a time": lambda: one_at_a_time(model, tokenizer, texts, args.max_new_tokens)}
    for size in sizes:
        for share in (False, True):
            backend = TransformersBackend(model, tokenizer, batch_size=size, share_prefix=share)
            label = f"TransformersBackend, batch_size={size}, {'shared prefix' if share else 'no prefix sharing'}"
            contenders[label] = lambda backend=backend: batched(backend, texts, args.max_new_tokens)

    # Warm-up (first-call allocations, lazy imports) outside the timings.
    TransformersBackend(model, tokenizer, batch_size=2).generate(texts[:2], Sampling(max_new_tokens=2))
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    tokens: dict[str, int] = {}
    outputs: dict[str, list[list[int]]] = {}
    for rep in range(args.repeats):
        for name, run in contenders.items():  # interleaved: A B C A B C ...
            start = time.perf_counter()
            n, outs = run()
            seconds = time.perf_counter() - start
            rates[name].append(n / seconds)
            tokens[name], outputs[name] = n, outs
            print(f"  run {rep + 1}/{args.repeats} {name}: {n} tokens in {seconds:.1f} s ({n / seconds:.1f} tok/s)",
                  file=sys.stderr, flush=True)

    base_name = next(iter(contenders))
    base = statistics.median(rates[base_name])
    model_name = "random tiny Llama (4 x 128, untied)" if args.tiny else "SmolLM2-135M-Instruct (embedded, fp32)"
    print(f"command: python bench/generate_throughput.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print(f"model: {model_name}; {args.prompts} prompts from the shipped instruction set; greedy; "
          f"max_new_tokens={args.max_new_tokens}; {args.repeats} interleaved repeats, medians; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}")
    print()
    print("| method | generated tokens | tokens/s (median) | min-max | vs one-at-a-time | same tokens as peer |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in contenders:
        same = sum(a == b for a, b in zip(outputs[name], outputs[base_name]))
        med = statistics.median(rates[name])
        print(f"| {name} | {tokens[name]} | {med:.1f} | {min(rates[name]):.1f}-{max(rates[name]):.1f} "
              f"| {med / base:.2f}x | {same}/{len(texts)} |")
    best = max((statistics.median(rates[n]) / base for n in contenders if n != base_name), default=0.0)
    print()
    print(f"ratio (best batched / one-at-a-time): {best:.2f}x (target >= 5x: {'met' if best >= 5 else 'NOT met'})")


if __name__ == "__main__":
    main()
