"""`ctrltok demo`: the main job, end to end on the embedded SmolLM2-135M, on a laptop CPU.

1. Seed 000's tokenizer reproduced: the EPE preset padded to 128 gives 49,280 rows with
   `<assistant>` = 49152 and the 35 charter tokens after it; the `inspect` report of the result.
2. One conversation rendered under each named template, supervised tokens highlighted.
3. LIMA's end-of-turn token taught by a short LoRA fine-tune (new rows trained too) on the shipped
   instruction set; generations and the held-out loss / end-of-turn stop rate before and after.
4. Where everything was written: the checkpoint (plain transformers), its card, curves and metrics.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from tokenizers import AddedToken
from transformers import AutoTokenizer

from ctrltok.cli.eval import comparison_table
from ctrltok.cli.tokens import print_report
from ctrltok.core.chat import encode_chat, show
from ctrltok.core.config import load_recipe
from ctrltok.core.models import load_model, resolve_model
from ctrltok.core.templates import get_template, install_templates
from ctrltok.core.tokens import add_tokens, load_charter, resolve_tokens
from ctrltok.data.encode import build_examples
from ctrltok.evaluation.doctor import inspect_checkpoint
from ctrltok.evaluation.evaluate import evaluate_model, load_conversations
from ctrltok.generation.generate import generate
from ctrltok.training.setup import prepare_model
from ctrltok.training.train import train

DEMO_STEPS = 30
HELD_OUT_PROMPTS = 4
MAX_NEW_TOKENS = 200  # the shipped replies are 20-120 words: room to finish a turn


def _seed_000(console: Console, model_name: str, out: Path) -> None:
    console.rule("[bold]1. Seed 000's tokenizer, reproduced on the embedded SmolLM2-135M")
    model, tok = load_model(model_name)
    rows_before = model.get_input_embeddings().weight.shape[0]
    s = add_tokens(model, tok, resolve_tokens(["epe"]), init="describe", pad_to_multiple_of=128)
    install_templates(tok)
    charter = load_charter()
    ids = [s.ids[c.token] for c in charter]
    console.print(f"embedding rows {rows_before:,} -> {model.get_input_embeddings().weight.shape[0]:,} "
                  f"(tokenizer {len(tok):,}); <assistant> = {s.ids['<assistant>']}; "
                  f"charter tokens {charter[0].token}..{charter[-1].token} = {ids[0]}..{ids[-1]}; "
                  f"{len(s.filler_ids)} filler rows {s.filler_ids[0]}..{s.filler_ids[-1]} (never generated)")
    ok = (len(tok) == 49_280 and s.ids["<assistant>"] == 49_152 and ids == list(range(49_153, 49_188)))
    console.print("[bold green]matches seed 000[/]" if ok else "[bold red]does NOT match seed 000[/]")
    target = out / "epe-tokenizer"
    target.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(target)
    model.config.save_pretrained(target)
    model.generation_config.save_pretrained(target)
    (target / "ctrltok.json").write_text(json.dumps({**s.manifest(), "template": "epe", "end_of_turn": "<|im_end|>"},
                                                    indent=1))
    print_report(inspect_checkpoint(target))


def _templates(console: Console, model_name: str) -> None:
    console.rule("[bold]2. One conversation under each named template (green: supervised)")
    tok = AutoTokenizer.from_pretrained(resolve_model(model_name))
    for t in resolve_tokens(["epe", "eot", "oasst"]):
        tok.add_tokens([AddedToken(t.text, special=True, normalized=False)], special_tokens=True)
    install_templates(tok)
    messages = [{"role": "user", "content": "Is <assistant> a word? Answer briefly."},
                {"role": "assistant", "content": "It is a tag, not an English word."}]
    for name in ("default", "epe", "oasst", "eot", "model"):
        console.print(f"[bold]{name}[/]")
        console.print(show(encode_chat(messages, tok, name), tok))
    console.print("[dim]The user's literal '<assistant>' is encoded as plain text, never as the control token.[/]")


def run_demo(model: str = "smollm2-135m", out: str | Path = "runs/demo", steps: int | None = None,
             quick: bool = False) -> Path:
    console = Console()
    steps = steps or (4 if quick else DEMO_STEPS)
    out = Path(out)
    console.print(Panel(
        f"ctrltok demo: reproduce seed 000's tokenizer, then teach SmolLM2-135M-Instruct LIMA's <EOT> token with a "
        f"{steps}-step LoRA fine-tune on the shipped instruction set.\nIt takes about 6-9 minutes on a 2-core CPU "
        "(the first run also converts the embedded model once, about 30 s). Output goes to " + str(out.resolve()),
        title="ctrltok"))
    t0 = time.perf_counter()
    resolve_model(model)  # fetch/convert once, with progress
    _seed_000(console, model, out)
    _templates(console, model)

    console.rule("[bold]3. Teaching <EOT>: before")
    recipe_path = Path(str(resources.files("ctrltok") / "resources" / "demo-eot.yaml"))
    overrides = [f"model.name={model}", f"train.max_steps={steps}"]
    if quick:
        overrides += ["data.limit=40", "data.max_length=128"]
    recipe = load_recipe(recipe_path, overrides)
    prepared = prepare_model(recipe)
    base, tok = prepared.model, prepared.tokenizer
    del prepared
    held = build_examples(recipe, tok).eval
    convs, sources = load_conversations(recipe.data.train)
    held_sources = {ex.source for ex in held}
    held_convs = [c for c, s in zip(convs, sources) if s in held_sources] or convs[-HELD_OUT_PROMPTS:]
    prompts = [c[:-1] for c in held_convs if c[-1]["role"] == "assistant"][:HELD_OUT_PROMPTS]
    n_gen = len(prompts)
    # The loss in the rows the run trains on (recipe.data: max_length, overlong, packing).
    before = evaluate_model(base, tok, held_convs, "eot", data=recipe.data, n_generate=n_gen,
                            max_new_tokens=MAX_NEW_TOKENS, examples=held)
    before_gen = generate(base, tok, prompts, "eot", max_new_tokens=MAX_NEW_TOKENS)
    del base

    console.rule("[bold]3. Teaching <EOT>: training")
    run_dir = out / "eot-model"
    train(recipe, run_dir)
    trained, tok2 = load_model(str(run_dir))
    after = evaluate_model(trained, tok2, held_convs, "eot", data=recipe.data, n_generate=n_gen,
                           max_new_tokens=MAX_NEW_TOKENS, examples=held)
    after_gen = generate(trained, tok2, prompts, "eot", max_new_tokens=MAX_NEW_TOKENS)

    console.rule("[bold]3. Teaching <EOT>: before vs after")
    eot_id = get_template("eot", tok2).end_of_turn_id(tok2)

    def ending(result: dict) -> str:
        if result["ids"] and result["ids"][-1] == eot_id:
            return "ends with <EOT>"
        if result["stopped"]:
            return f"stopped at {tok2.convert_ids_to_tokens(result['ids'][-1])}, not <EOT>"
        return f"no stop within {MAX_NEW_TOKENS} tokens"

    for p, b, a in zip(prompts, before_gen, after_gen):
        console.print(f"[bold]prompt[/] {p[-1]['content'][:100]!r}")
        console.print(f"  [red]before[/] ({ending(b)}): {b['text'][:160]!r}")
        console.print(f"  [green]after[/]  ({ending(a)}): {a['text'][:160]!r}")
    console.print(comparison_table(before, after))
    (run_dir / "demo_evaluation.json").write_text(json.dumps({"before": before, "after": after}, indent=1, default=str))

    console.rule("[bold]4. Where everything is")
    for what, path in (("checkpoint (plain transformers)", run_dir), ("model card", run_dir / "README.md"),
                       ("loss curves", run_dir / "loss_curves.png"), ("metrics", run_dir / "metrics.jsonl"),
                       ("before/after evaluation", run_dir / "demo_evaluation.json"),
                       ("seed-000 tokenizer", out / "epe-tokenizer")):
        console.print(f"  {what:32s} {path}")
    console.print(f"  try: ctrltok generate --model {run_dir} --prompt 'Name three primary colours.'")
    console.print(f"done in {time.perf_counter() - t0:.0f} s")
    return run_dir
