"""Chat encoding speed: ctrltok's ``ChatEncoder.encode_many`` vs transformers' ``apply_chat_template``.

Both sides do the same work: conversation -> input ids + which tokens are supervised (assistant
turns and the ``<|im_end|>`` that closes each of them), under the ``default`` template, with the
real SmolLM2 tokenizer (``tests/assets/smollm2-tokenizer``, no model needed).

* ctrltok: ``ChatEncoder(tokenizer, "default").encode_many(conversations)`` -> ``Example`` with
  ``input_ids`` and ``labels`` (-100 where not supervised), injection-safe.
* transformers: ``tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True,
  return_assistant_tokens_mask=True)``. That mask needs ``{% generation %}`` markers, so this side
  uses a copy of ``default`` with markers around each assistant content *and* its ``<|im_end|>``
  (ctrltok supervises the closer too), so the two supervise the same positions.

Before timing, a sample is checked: same ids and same supervised positions on both sides (an
``AssertionError`` otherwise). Conversations whose contents spell a special token are left out of
that check only (there ctrltok encodes the text as text on purpose and transformers does not).

Data: the shipped ``src/ctrltok/resources/instructions.jsonl`` repeated to ``--n`` conversations,
plus, when ``../shared/data`` exists (not in a fresh clone), LIMA (with its multi-turn histories)
and the OASST trees (the best-ranked path through each tree, as a multi-turn chat). Both sides get
the conversations in chunks of ``--chunk`` (ctrltok's data pipeline encodes 256 at a time), and
the transformers call is timed in its batched form (one Rust ``encode_batch`` per chunk) and one
conversation per call (what TRL's ``datasets.map`` preparation does). For reference it is also
timed with ``sanitize_control_tokens=True`` (transformers' own injection-safe mode, new in 5.x),
which gives ids only: transformers refuses to combine it with ``return_assistant_tokens_mask``, so
no transformers call does ctrltok's whole job. The last row, the Rust tokenizer alone on the
message contents, is the floor under every row. Repeats are
interleaved (A B A B ...) because this machine's speed drifts within seconds; medians are shown.

    python bench/encode.py                 # ~3,000 shipped conversations (+ LIMA, OASST if present)
    python bench/encode.py --n 1000 --repeats 3

Target (issue 2): ctrltok >= 10x transformers in conversations/s.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

from transformers import AutoTokenizer

from ctrltok.core.chat import ChatEncoder
from ctrltok.core.example import IGNORE

ROOT = Path(__file__).resolve().parents[1]
INSTRUCTIONS = ROOT / "src" / "ctrltok" / "resources" / "instructions.jsonl"
TOKENIZER = ROOT / "tests" / "assets" / "smollm2-tokenizer"
SHARED = ROOT.parent / "shared" / "data"

# ctrltok's `default` template with transformers' generation markers: the assistant content and the
# `<|im_end|>` that closes it are inside the block, the newline after it is not (ctrltok's closer rule).
DEFAULT_WITH_GENERATION = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


# -- data ---------------------------------------------------------------------------------------
def shipped() -> list[list[dict]]:
    with INSTRUCTIONS.open(encoding="utf-8") as fh:
        return [json.loads(line)["messages"] for line in fh if line.strip()]


def lima(path: Path) -> list[list[dict]]:
    out = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            msgs = []
            for user, assistant in rec.get("history") or []:
                msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
            msgs += [{"role": "user", "content": rec["instruction"]}, {"role": "assistant", "content": rec["output"]}]
            out.append(msgs)
    return out


def oasst(path: Path) -> list[list[dict]]:
    """Each tree as one chat: from the root prompt, follow the best-ranked reply (rank 0 / first)."""
    roles = {"prompter": "user", "assistant": "assistant"}
    out = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            node = json.loads(line)["prompt"]
            msgs = []
            while node is not None:
                msgs.append({"role": roles[node["role"]], "content": node["text"]})
                replies = [r for r in node.get("replies") or [] if not r.get("deleted")]
                replies.sort(key=lambda r: (r.get("rank") is None, r.get("rank") or 0))
                node = replies[0] if replies else None
            if msgs[-1]["role"] != "assistant":
                msgs.pop()
            if msgs:
                out.append(msgs)
    return out


def conversations(n: int) -> tuple[list[list[dict]], list[str]]:
    base = shipped()
    convs = [base[i % len(base)] for i in range(n)]
    sources = [f"instructions.jsonl x{n // len(base) + (n % len(base) > 0)} ({n})"]
    for name, path, read in (("lima", SHARED / "lima" / "lima_train.jsonl", lima),
                             ("oasst", SHARED / "oasst" / "oasst_trees.jsonl", oasst)):
        if path.exists():
            extra = read(path)
            convs += extra
            sources.append(f"{name} ({len(extra)})")
    return convs, sources


# -- the two contenders ---------------------------------------------------------------------------
def run_ctrltok(encoder: ChatEncoder, convs: list[list[dict]], chunk: int) -> list[tuple[list[int], list[bool]]]:
    out = []
    for i in range(0, len(convs), chunk):
        for ex in encoder.encode_many(convs[i:i + chunk]):
            out.append((ex.input_ids, [lab != IGNORE for lab in ex.labels]))
    return out


def run_transformers(tokenizer, convs: list[list[dict]], chunk: int) -> list[tuple[list[int], list[bool]]]:
    out = []
    for i in range(0, len(convs), chunk):
        enc = tokenizer.apply_chat_template(convs[i:i + chunk], chat_template=DEFAULT_WITH_GENERATION, tokenize=True,
                                            return_dict=True, return_assistant_tokens_mask=True)
        for ids, mask in zip(enc["input_ids"], enc["assistant_masks"]):
            out.append((ids, [bool(m) for m in mask]))
    return out


def run_transformers_single(tokenizer, convs: list[list[dict]], chunk: int) -> list[tuple[list[int], list[bool]]]:
    """One call per conversation, as TRL's dataset preparation does (``datasets.map`` per example)."""
    out = []
    for msgs in convs:
        enc = tokenizer.apply_chat_template(msgs, chat_template=DEFAULT_WITH_GENERATION, tokenize=True,
                                            return_dict=True, return_assistant_tokens_mask=True)
        out.append((enc["input_ids"], [bool(m) for m in enc["assistant_masks"]]))
    return out


def run_transformers_sanitized(tokenizer, convs: list[list[dict]], chunk: int) -> list[tuple[list[int], list[bool]]]:
    """transformers' own injection-safe mode: ids only (it refuses to combine it with the assistant mask)."""
    out = []
    for i in range(0, len(convs), chunk):
        enc = tokenizer.apply_chat_template(convs[i:i + chunk], chat_template=DEFAULT_WITH_GENERATION, tokenize=True,
                                            return_dict=True, sanitize_control_tokens=True)
        out.extend((ids, []) for ids in enc["input_ids"])
    return out


def run_floor(tokenizer, convs: list[list[dict]], chunk: int) -> list[tuple[list[int], list[bool]]]:
    backend = tokenizer.backend_tokenizer
    out = []
    for i in range(0, len(convs), chunk):
        texts = [m["content"] for msgs in convs[i:i + chunk] for m in msgs]
        out.extend((e.ids, []) for e in backend.encode_batch(texts, add_special_tokens=False))
    return out


def check_equal(ours, theirs, convs, specials: list[str]) -> int:
    """Same ids and same supervised positions, except where a content spells a special token."""
    checked = 0
    for k, ((ids_a, sup_a), (ids_b, sup_b), msgs) in enumerate(zip(ours, theirs, convs)):
        if any(s in m["content"] for m in msgs for s in specials):
            continue
        assert ids_a == ids_b, f"conversation {k}: ids differ (ctrltok {len(ids_a)} tokens, transformers {len(ids_b)})"
        if sup_a != sup_b:
            diff = [i for i, (a, b) in enumerate(zip(sup_a, sup_b)) if a != b]
            raise AssertionError(f"conversation {k}: supervised positions differ at token indices {diff[:10]}")
        assert any(sup_a), f"conversation {k}: nothing supervised"
        checked += 1
    return checked


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=3200, help="shipped conversations (repeated) to encode")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repetitions per contender")
    ap.add_argument("--chunk", type=int, default=256, help="conversations per batch call")
    ap.add_argument("--check", type=int, default=400, help="conversations cross-checked before timing")
    args = ap.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    encoder = ChatEncoder(tokenizer, "default")
    convs, sources = conversations(args.n)
    specials = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]

    # Equal work check on a sample spread over all sources (the extra data sits at the end).
    shipped_part, extra_part = convs[: args.n], convs[args.n:]
    sample = shipped_part[: min(args.check, len(shipped()))] + extra_part[:: max(1, len(extra_part) // args.check)]
    ours = run_ctrltok(encoder, sample, args.chunk)
    checked = check_equal(ours, run_transformers(tokenizer, sample, args.chunk), sample, specials)
    assert check_equal(ours, run_transformers_single(tokenizer, sample, args.chunk), sample, specials) == checked
    sanitized = run_transformers_sanitized(tokenizer, sample, args.chunk)
    # Where a content spells a special token, transformers' sanitizer splits e.g. " <|im_end|>" as " " + "<|..."
    # (its private markers break the merge) while ctrltok gives the plain-text tokens: both are text, not control.
    assert all(a[0] == b[0] for a, b, msgs in zip(ours, sanitized, sample)
               if not any(s in m["content"] for m in msgs for s in specials)), "sanitize_control_tokens=True: other ids"
    print(f"checked: {checked} of {len(sample)} sampled conversations give the same ids and supervised positions")

    contenders = {
        "ctrltok encode_many": lambda: run_ctrltok(encoder, convs, args.chunk),
        "transformers apply_chat_template": lambda: run_transformers(tokenizer, convs, args.chunk),
        "  same, one conversation per call": lambda: run_transformers_single(tokenizer, convs, args.chunk),
        "  ids only, sanitize_control_tokens": lambda: run_transformers_sanitized(tokenizer, convs, args.chunk),
        # Not a contender: the Rust tokenizer alone on the message contents, the floor under both.
        "reference: contents encode_batch": lambda: run_floor(tokenizer, convs, args.chunk),
    }
    tokens = supervised = 0
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name, fn in contenders.items():  # interleaved: A B A B ...
            t0 = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - t0)
            if name == "ctrltok encode_many":
                tokens = sum(len(ids) for ids, _ in out)
                supervised = sum(sum(sup) for _, sup in out)

    print(f"\ndata: {' + '.join(sources)} = {len(convs)} conversations, {tokens:,} tokens "
          f"({supervised:,} supervised); chunks of {args.chunk}; {args.repeats} interleaved repeats, medians")
    print(f"machine: {platform.processor() or platform.machine()}, python {sys.version.split()[0]}\n")
    header = f"{'contender':<36}{'median s':>10}{'conv/s':>12}{'tokens/s':>14}"
    print(header)
    print("-" * len(header))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    for name in contenders:
        print(f"{name:<36}{med[name]:>10.3f}{len(convs) / med[name]:>12,.0f}{tokens / med[name]:>14,.0f}")
    ours_t = times["ctrltok encode_many"]
    for name in list(contenders)[1:4]:
        ratio = med[name] / med["ctrltok encode_many"]
        per_repeat = ", ".join(f"{b / a:.2f}" for a, b in zip(ours_t, times[name]))
        print(f"ratio ctrltok / {name.strip()} (conversations/s): {ratio:.2f}x (per repeat: {per_repeat})")
    print("target (issue 2): >= 10x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
