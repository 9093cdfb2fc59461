"""What does EPE's attention hole cost? Forward+backward on 2k-token packed rows with reflections.

Rows of ``--docs`` documents, each with one reflection (``<assistant>`` + reflection tokens) in its
middle, packed to ``--length`` tokens, on the SmolLM2-135M architecture with random weights
(hidden 576, 9 heads, 3 kv heads, intermediate 1536, vocab 49152; ``--layers`` of its 30 decoder
layers). The loss is on the final hidden states and the embedding is frozen: the LM head and the
embedding gradient cost the same for every contender and would only dilute the attention
difference, so the ratios are those of the decoder stack alone (conservative for a full step).

Contenders, interleaved (A B C D, A B C D, ...), medians of ``--reps``; the mask is built inside the
timed region (it is built at the last moment in training too):

* ``causal``: plain causal attention over the whole row, no documents, no hole (the reference);
* ``sdpa dense``: SDPA with the dense ``[B, 1, T, T]`` bool mask (documents + holes);
* ``varlen``: ``ctrltok_varlen``, SDPA per document, a small mask only in documents with a hole;
* ``varlen, no hole``: the same path with the holes removed (what the hole itself costs there);
* ``flex``: FlexAttention with a compiled BlockMask, forward only (torch 2.13 has no FlexAttention
  backward on CPU), against the forward-only ``causal`` and ``varlen``; its compile time is
  reported apart.

Prints a markdown table and "hole cost over plain causal on the best path".

    python bench/reflection_attention.py                   # the full 30-layer stack
    python bench/reflection_attention.py --layers 6 --reps 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ctrltok.core.attention import VARLEN, build_mask
from ctrltok.core.packing import Batch, collate, pack
from ctrltok.epe.reflection import Insert, layout


def smollm2_config(layers: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )


def make_row(length: int, docs: int, reflection: int, seed: int = 0) -> tuple[Batch, Batch]:
    """One packed row with a reflection in every document, and the same row without the holes."""
    g = torch.Generator().manual_seed(seed)
    per_doc = length // docs
    examples = []
    for _ in range(docs):
        text = torch.randint(3, 49000, (per_doc - reflection - 1,), generator=g).tolist()
        refl = torch.randint(3, 49000, (reflection,), generator=g).tolist()
        examples.append(layout(text, [Insert(len(text) // 2, refl, [])], assistant_id=49151))
    rows = pack(examples, max_length=length, overlong="error").rows
    assert len(rows) == 1, "the documents must fill one row"
    with_hole = collate(rows, pad_id=0, pad_to=length)
    no_hole = collate(rows, pad_id=0, pad_to=length)
    no_hole.blocked = [[] for _ in no_hole.blocked]
    return with_hole, no_hole


def run(model, batch: Batch, impl: str, backward: bool) -> float:
    model.config._attn_implementation = impl
    t0 = time.perf_counter()
    if impl == "causal":
        model.config._attn_implementation = "sdpa"
        positions = torch.arange(batch.input_ids.shape[1])[None].expand_as(batch.input_ids)
        kwargs = dict(position_ids=positions, attention_mask=None)  # is_causal fast path, no mask
    else:
        kwargs = dict(position_ids=batch.position_ids, attention_mask=build_mask(batch, impl))
    with torch.set_grad_enabled(backward):
        hidden = model.model(input_ids=batch.input_ids, use_cache=False, **kwargs).last_hidden_state
        if backward:
            hidden.float().pow(2).mean().backward()
    elapsed = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--docs", type=int, default=8)
    p.add_argument("--reflection", type=int, default=40, help="reflection tokens per document")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-flex", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.manual_seed(0)
    model = LlamaForCausalLM(smollm2_config(args.layers)).train()
    model.model.embed_tokens.weight.requires_grad_(False)
    batch, plain = make_row(args.length, args.docs, args.reflection)

    train = [("causal", "causal", plain), ("sdpa dense", "sdpa", batch), ("varlen", VARLEN, batch),
             ("varlen, no hole", VARLEN, plain)]
    infer = [("causal", "causal", plain), ("varlen", VARLEN, batch)]
    compile_s = None
    if not args.no_flex:
        infer.append(("flex", "flex_attention", batch))
        model.eval()
        t0 = time.perf_counter()
        run(model, batch, "flex_attention", backward=False)  # compiles the BlockMask and the kernel
        compile_s = time.perf_counter() - t0
        model.train()
    for name, impl, b in train:  # warm-up round, not timed
        run(model, b, impl, backward=True)
    times: dict[tuple[str, str], list[float]] = {}
    for rep in range(args.reps):
        for name, impl, b in train:
            times.setdefault(("fwd+bwd", name), []).append(run(model, b, impl, backward=True))
        model.eval()
        for name, impl, b in infer:
            times.setdefault(("fwd", name), []).append(run(model, b, impl, backward=False))
        model.train()
        print(f"rep {rep + 1}/{args.reps}: " + ", ".join(f"{k[0]} {k[1]} {v[-1]:.2f}s" for k, v in times.items()), flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    print()
    print(f"rows of {args.length} tokens, {args.docs} documents each with a {args.reflection}-token reflection; "
          f"SmolLM2-135M config with {args.layers} layers, random weights, fp32, {torch.get_num_threads()} threads; "
          f"medians of {args.reps} interleaved reps")
    print()
    print("| pass | attention | median s | / causal |")
    print("|---|---|---|---|")
    for (kind, name), m in med.items():
        print(f"| {kind} | {name} | {m:.3f} | {m / med[(kind, 'causal')]:.3f} |")
    if compile_s is not None:
        print(f"\nflex first call (BlockMask + kernel compile): {compile_s:.1f} s")
    hole_paths = {name: med[("fwd+bwd", name)] for name in ("sdpa dense", "varlen")}
    best = min(hole_paths, key=hole_paths.get)
    ratio = hole_paths[best] / med[("fwd+bwd", "causal")] - 1
    own = med[("fwd+bwd", "varlen")] / med[("fwd+bwd", "varlen, no hole")] - 1
    print(f"\nhole cost over plain causal on the best path ({best}, fwd+bwd): {ratio:+.1%} (target <= +10%)")
    print(f"the hole's own cost inside the varlen path (varlen / varlen without holes): {own:+.1%}")


if __name__ == "__main__":
    main()
