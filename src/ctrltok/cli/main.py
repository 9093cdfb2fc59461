"""The `ctrltok` command: one table of commands, each a thin wrapper over an importable function.

``COMMANDS`` maps each command to ``(module:function it calls, help, argument adder)``;
``tests/test_cli.py`` checks every entry resolves to a real function, so the table and the
library cannot drift apart. Nothing imports this module.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path


def _resolve(target: str):
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


# -- handlers: parse nothing, call the library -----------------------------------------------------
def _demo(a):
    return _resolve("ctrltok.cli.demo:run_demo")(model=a.model, out=a.out, steps=a.steps, quick=a.quick)


def _add_tokens(a):
    out = _resolve("ctrltok.core.tokens:save_with_tokens")(a.model, a.preset, init=a.init,
                                                       pad_to_multiple_of=a.pad_to_multiple_of, out=a.out,
                                                       template=a.template)
    print(f"saved to {out}")
    _resolve("ctrltok.evaluation.doctor:print_report")(_resolve("ctrltok.evaluation.doctor:inspect_checkpoint")(out))


def _render(a):
    n = _resolve("ctrltok.core.chat:render_file")(a.model, a.template, a.input, a.out, loss_on=a.loss_on)
    print(f"wrote {n} encoded conversations to {a.out}", file=sys.stderr)


def _inspect(a):
    report = _resolve("ctrltok.evaluation.doctor:inspect_checkpoint")(a.path)
    if a.json:
        print(report.to_json())
    else:
        _resolve("ctrltok.evaluation.doctor:print_report")(report)
    return 1 if report.problems and a.strict else 0


def _recipe(a):
    return _resolve("ctrltok.core.config:load_recipe")(a.recipe, a.set)


def _default_out(a, recipe) -> Path:
    return Path(a.out) if a.out else Path("runs") / recipe.name


def _train(a):
    recipe = _recipe(a)
    out = _resolve("ctrltok.training.train:train")(recipe, _default_out(a, recipe))
    if os.environ.get("RANK", "0") == "0":
        print(f"model saved in {out}")


def _generate(a):
    if a.input:
        _resolve("ctrltok.generation.generate:generate_file")(a.model, a.input, a.out, template=a.template,
                                                   max_new_tokens=a.max_new_tokens, temperature=a.temperature)
        return
    model, tok, template = _resolve("ctrltok.generation.generate:load_for_generation")(a.model)
    results = _resolve("ctrltok.generation.generate:generate")(model, tok, [[{"role": "user", "content": a.prompt}]],
                                                    a.template or template, max_new_tokens=a.max_new_tokens,
                                                    temperature=a.temperature)
    print(results[0]["text"])


def _chat(a):
    _resolve("ctrltok.generation.generate:chat_loop")(a.model, template=a.template)


def _eval(a):
    if a.epe:
        result = _resolve("ctrltok.evaluation.epe:evaluate_epe")(a.model, corpus=a.data, sidecar=a.sidecar)
        _resolve("ctrltok.evaluation.epe:print_epe")(result)
    elif a.conditional:
        result = _resolve("ctrltok.conditional.label:evaluate_checkpoint")(a.model, scorer=a.scorer, n=a.n,
                                                                     max_new_tokens=a.max_new_tokens,
                                                                     prompts=a.data)
    else:
        result = _resolve("ctrltok.evaluation.evaluate:evaluate_cli")(a.model, a.data, a.template, before=a.before,
                                                           n_generate=a.n, max_new_tokens=a.max_new_tokens)
    if a.json:
        print(json.dumps(result, indent=1, default=str))


def _label(a):
    _resolve("ctrltok.conditional.label:label_file")(a.input, a.out, scorer=a.scorer, threshold=a.threshold,
                                               misaligned_fraction=a.misaligned_fraction,
                                               drop_fraction=a.drop_fraction, seed=a.seed, processes=a.processes,
                                               text_field=a.text_field, on_error=a.on_error)


def _constitution(a):
    _resolve("ctrltok.core.heads:constitution_cli")(a.model, a.input, as_json=a.json)


def _backtranslate(a):
    recipe = _recipe(a)
    _resolve("ctrltok.backtranslate.pipeline:run_backtranslation")(recipe, _default_out(a, recipe))


def _annotate(a):
    _resolve("ctrltok.epe.annotate:annotate_file")(a.model, a.input, a.out, max_new_tokens=a.max_new_tokens)


# -- argument adders -----------------------------------------------------------------------------
def _a_demo(p):
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the demo's budget)")
    p.add_argument("--quick", action="store_true", help="a tiny run to check the plumbing")


def _a_add_tokens(p):
    p.add_argument("--model", required=True)
    p.add_argument("--preset", action="append", required=True, help="eot | oasst | conditional | epe (repeatable)")
    p.add_argument("--init", default="mean_noise", help="mvn | mean | mean_noise | describe | copy:<token>")
    p.add_argument("--pad-to-multiple-of", type=int, default=None)
    p.add_argument("--template", default=None, help="template whose end of turn stops generation")
    p.add_argument("--out", required=True)


def _a_render(p):
    p.add_argument("--model", required=True, help="checkpoint or model name (for its tokenizer)")
    p.add_argument("--template", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--loss-on", default="assistant", choices=["assistant", "all", "last"])


def _a_inspect(p):
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.add_argument("--strict", action="store_true", help="exit 1 when problems are found")


def _a_recipe(p):
    p.add_argument("recipe")
    p.add_argument("--set", action="append", default=[], metavar="dotted.key=value")
    p.add_argument("--out", default=None)


def _a_generate(p):
    p.add_argument("--model", required=True)
    p.add_argument("--template", default=None)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt")
    g.add_argument("--input", help="JSONL of {messages} or {prompt}")
    p.add_argument("--out", default="-")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)


def _a_chat(p):
    p.add_argument("--model", required=True)
    p.add_argument("--template", default=None)


def _a_eval(p):
    p.add_argument("--model", required=True)
    p.add_argument("--data", default=None, help="held-out chats (default: the shipped set's held-out part)")
    p.add_argument("--template", default=None)
    p.add_argument("--before", default=None, help="a base model to compare with (prepared with the same tokens)")
    p.add_argument("--conditional", action="store_true", help="aligned / unconditional / misaligned sampling")
    p.add_argument("--epe", action="store_true", help="reflection loss, charter F1, equivalence check")
    p.add_argument("--sidecar", default=None, help="with --epe and --data: the held-out annotations")
    p.add_argument("--scorer", default="profanity")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--json", action="store_true")


def _a_label(p):
    p.add_argument("--input", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--scorer", default="profanity")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--threshold", type=float, default=None)
    g.add_argument("--misaligned-fraction", type=float, default=None)
    p.add_argument("--drop-fraction", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--text-field", default="text")
    p.add_argument("--on-error", default="raise", choices=["raise", "skip"])


def _a_constitution(p):
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True, help="JSONL of {messages}")
    p.add_argument("--json", action="store_true")


def _a_annotate(p):
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True, help="corpus JSONL of {id, text}")
    p.add_argument("--out", required=True, help="sidecar JSONL to write (resumes)")
    p.add_argument("--max-new-tokens", type=int, default=128)


COMMANDS = {
    "demo": ("ctrltok.cli.demo:run_demo", _demo, _a_demo, "the main job: EOT fine-tune of the embedded SmolLM2-135M"),
    "add-tokens": ("ctrltok.core.tokens:save_with_tokens", _add_tokens, _a_add_tokens, "add control tokens, save a checkpoint"),
    "render": ("ctrltok.core.chat:render_file", _render, _a_render, "encode chats to input_ids and labels"),
    "inspect": ("ctrltok.evaluation.doctor:inspect_checkpoint", _inspect, _a_inspect, "check a checkpoint's tokens, templates, generation config"),
    "train": ("ctrltok.training.train:train", _train, _a_recipe, "train a recipe"),
    "generate": ("ctrltok.generation.generate:generate", _generate, _a_generate, "generate replies"),
    "chat": ("ctrltok.generation.generate:chat_loop", _chat, _a_chat, "interactive chat"),
    "eval": ("ctrltok.evaluation.evaluate:evaluate_cli", _eval, _a_eval, "held-out loss and end-of-turn stop rate (or --conditional)"),
    "label": ("ctrltok.conditional.label:label_file", _label, _a_label, "score and label sentences with <|aligned|>/<|misaligned|>"),
    "constitution": ("ctrltok.core.heads:constitution_cli", _constitution, _a_constitution, "read the charter head per assistant turn"),
    "backtranslate": ("ctrltok.backtranslate.pipeline:run_backtranslation", _backtranslate, _a_recipe, "instruction backtranslation pipeline"),
    "annotate": ("ctrltok.epe.annotate:annotate_file", _annotate, _a_annotate, "write an EPE sidecar with an LLM"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctrltok", description="Teach language models new control tokens.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, handler, add_args, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    args = build_parser().parse_args(argv)
    from ctrltok.core.chat import ChatError
    from ctrltok.core.config import ConfigError
    from ctrltok.core.records import RecordError

    try:
        if args.command == "train":  # `accelerate launch --cpu --num_processes N` starts one process
            from ctrltok.training.launch import relaunch_if_needed

            _recipe(args)  # a bad recipe fails here, once, not in every process
            code = relaunch_if_needed(sys.argv[1:] if argv is None else list(argv))
            if code is not None:
                return code
        code = args.handler(args)
    except (ConfigError, RecordError, ChatError, FileNotFoundError) as exc:
        print(f"ctrltok {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
