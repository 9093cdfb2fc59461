"""The `ctrltok` command: the table of commands, their arguments, and the one error format.

The command layer is the package :mod:`ctrltok.cli`: it takes names and paths, loads, prints, and
calls the library with objects. Nothing in the library imports it. ``COMMANDS`` maps each command
to ``(handler "ctrltok.cli.MODULE:FUNCTION", argument adder, help)``; the handler's module is
imported only when its command runs, so ``ctrltok --help`` stays fast. ``tests/test_cli.py``
resolves every handler in the table.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys


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


def _a_prepare(p):
    p.add_argument("recipe", help="the recipe YAML whose data section to prepare")
    p.add_argument("--set", action="append", default=[], metavar="dotted.key=value", help="override a recipe value")
    p.add_argument("--out", required=True, help="the prepared folder to write (a rerun resumes it)")
    p.add_argument("--workers", type=int, default=None, help="encoding processes (default: data.workers)")
    p.add_argument("--shard-size", type=int, default=4096,
                   help="records per shard: a killed prepare redoes at most this many (fixed by the first run)")


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
    "demo": ("ctrltok.cli.run:demo", _a_demo, "the main job: EOT fine-tune of the embedded SmolLM2-135M"),
    "add-tokens": ("ctrltok.cli.tokens:add_tokens", _a_add_tokens, "add control tokens, save a checkpoint"),
    "render": ("ctrltok.cli.tokens:render", _a_render, "encode chats to input_ids and labels"),
    "inspect": ("ctrltok.cli.tokens:inspect", _a_inspect, "check a checkpoint's tokens, templates, generation config"),
    "prepare": ("ctrltok.cli.prepare:prepare", _a_prepare, "encode a recipe's data once into memory-mapped shards"),
    "train": ("ctrltok.cli.run:train", _a_recipe, "train a recipe"),
    "generate": ("ctrltok.cli.generate:generate", _a_generate, "generate replies"),
    "chat": ("ctrltok.cli.generate:chat", _a_chat, "interactive chat"),
    "eval": ("ctrltok.cli.eval:evaluate", _a_eval, "held-out loss and end-of-turn stop rate (or --conditional, --epe)"),
    "label": ("ctrltok.cli.label:label", _a_label, "score and label sentences with <|aligned|>/<|misaligned|>"),
    "constitution": ("ctrltok.cli.eval:constitution", _a_constitution, "read the charter head per assistant turn"),
    "backtranslate": ("ctrltok.cli.backtranslate:backtranslate", _a_recipe, "instruction backtranslation pipeline"),
    "annotate": ("ctrltok.cli.annotate:annotate", _a_annotate, "write an EPE sidecar with an LLM"),
}


def resolve(target: str):
    """A handler from the table: ``"ctrltok.cli.MODULE:FUNCTION"`` -> the function."""
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctrltok", description="Teach language models new control tokens.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (target, add_args, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(target=target)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    args = build_parser().parse_args(argv)
    from ctrltok.core.chat import ChatError
    from ctrltok.core.config import ConfigError
    from ctrltok.core.records import RecordError

    try:
        if args.command == "train":  # `accelerate launch --cpu --num_processes N` starts one process
            from ctrltok.core.config import load_recipe
            from ctrltok.training.launch import relaunch_if_needed

            load_recipe(args.recipe, args.set)  # a bad recipe fails here, once, not in every process
            code = relaunch_if_needed(sys.argv[1:] if argv is None else list(argv))
            if code is not None:
                return code
        code = resolve(args.target)(args)
    except (ConfigError, RecordError, ChatError, FileNotFoundError) as exc:
        print(f"ctrltok {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
