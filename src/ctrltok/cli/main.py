"""The `ctrltok` command: the table of commands, their arguments, and the one error format.

The command layer is the package :mod:`ctrltok.cli`: it takes names and paths, loads, prints, and
calls the library with objects. Nothing in the library imports it. ``COMMANDS`` maps each command
to ``(handler "ctrltok.cli.MODULE:FUNCTION", argument adder, help)``; the handler's module is
imported only when its command runs, so ``ctrltok --help`` stays fast. ``tests/test_cli.py``
resolves every handler in the table.

Errors. A user error (a bad recipe value, record, model name, path, resume; the types in
``USER_ERRORS``) ends the command with one line on stderr, ``ctrltok COMMAND: error: ...``, and
exit code 2; argument errors the same way. Anything else is a bug and keeps its traceback, and
``--debug`` (or ``CTRLTOK_DEBUG=1``) shows the traceback of a user error too. Ctrl-C exits with 130.
Names (model, template) and input paths are checked before anything loads (:func:`preflight`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ctrltok import __version__
from ctrltok.backtranslate.pairs import backtranslation_folder
from ctrltok.cli.checks import (  # noqa: F401  (PRESET_NAMES: tests name it here)
    MAX_PROMPTS,
    PRESET_NAMES,
    SAMPLES,
    check_input,
    check_model_name,
    check_output,
    check_template,
)
from ctrltok.cli.run import check_train
from ctrltok.training.launch import relaunch_if_needed

# The library's user-error types, by module (checked only once their module is loaded: an error of a
# type whose module was never imported cannot have been raised).
USER_ERRORS = (
    "ctrltok.core.config:ConfigError",  # also training.runs.RunError
    "ctrltok.core.records:RecordError",
    "ctrltok.core.chat:ChatError",
    "ctrltok.core.stages:ResumeError",
    "ctrltok.core.models:ModelNotFoundError",
    "ctrltok.conditional.label:LabelError",
    "ctrltok.conditional.scorers:ScorerError",
    "ctrltok.data.store:PreparedDataError",
    "ctrltok.training.publish:PublishError",
    "ctrltok.cli.checks:UsageError",
    "builtins:FileNotFoundError",
    "builtins:IsADirectoryError",
    "builtins:NotADirectoryError",
    "builtins:PermissionError",
)
# Library messages speak in Python keywords; a command's user knows its flags.
CLI_TERMS = {
    "label": (("text_field=", "--text-field"), ("on_error='skip'", "--on-error skip"),
              ("misaligned_fraction=", "--misaligned-fraction"), ("threshold=", "--threshold"),
              ("drop_fraction", "--drop-fraction")),
}



class _Parser(argparse.ArgumentParser):
    """argparse with the one error format: ``ctrltok COMMAND: error: ...`` on one line, exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- argument types --------------------------------------------------------------------------------
def _at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, found {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, found {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _number(low: float, high: float | None = None, low_open: bool = False, high_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, found {text!r}") from None
        ok = value == value and (value > low if low_open else value >= low)
        if high is not None:
            ok = ok and (value < high if high_open else value <= high)
        if not ok:
            span = (f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}" if high is not None
                    else f"{'>' if low_open else '>='} {low:g}")
            raise argparse.ArgumentTypeError(f"expected a number {'in ' if high is not None else ''}{span}, found {text}")
        return value

    parse.__name__ = "number"
    return parse


POSITIVE = _at_least(1)
# Defaults of `ctrltok eval`'s caps, here since the parser is built without loading the handlers;
# ctrltok.cli.eval's functions take the same defaults from here.


# -- argument adders -------------------------------------------------------------------------------
def _a_demo(p):
    p.add_argument("--model", default="smollm2-135m", help="the base model: alias, local folder or Hub id")
    p.add_argument("--out", default="runs/demo", help="folder for the demo's outputs (default: runs/demo)")
    p.add_argument("--steps", type=POSITIVE, default=None, help="optimizer steps (default: the demo's budget)")
    p.add_argument("--quick", action="store_true", help="a tiny run to check the plumbing")


def _a_add_tokens(p):
    p.add_argument("--model", required=True, help="the base model: alias, local folder or Hub id")
    p.add_argument("--preset", action="append", required=True, choices=PRESET_NAMES,
                   help="token preset to add (repeatable)")
    p.add_argument("--init", default=None, help="mvn | mean | mean_noise | describe | copy:<token> (default: tokens.init's)")
    p.add_argument("--pad-to-multiple-of", type=POSITIVE, default=None,
                   help="pad the vocabulary with filler tokens to a multiple of N (default: no padding)")
    p.add_argument("--template", default=None, help="template whose end of turn stops generation")
    p.add_argument("--out", required=True, help="folder to save the checkpoint in")


def _a_render(p):
    p.add_argument("--model", required=True, help="checkpoint or model name (for its tokenizer)")
    p.add_argument("--template", required=True, help="chat template to encode with (default, eot, oasst, epe, ...)")
    p.add_argument("--input", required=True, help="chats: JSONL/JSON/Parquet file or folder, any chat layout")
    p.add_argument("--out", required=True,
                   help="JSONL of {input_ids, labels} to write ('-': stdout); written whole, then renamed into place")
    p.add_argument("--loss-on", default="assistant", choices=["assistant", "all", "last"],
                   help="which turns are supervised")


def _a_inspect(p):
    p.add_argument("path", help="a checkpoint folder")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--strict", action="store_true", help="exit 1 when problems are found")


def _a_recipe(p, resume: bool = True):
    p.add_argument("recipe", help="the recipe YAML (see recipes/)")
    p.add_argument("--set", action="append", default=[], metavar="dotted.key=value", help="override a recipe value")
    p.add_argument("--out", default=None, help="output folder (default: runs/<recipe name>); a rerun resumes it")
    if resume:
        p.add_argument("--resume-with-changes", action="store_true",
                       help="resume a run in --out although train.max_steps, num_tokens, epochs, eval_every or "
                            "save_every changed (other changes need a new --out)")


def _a_backtranslate(p):
    _a_recipe(p, resume=False)


def _a_prepare(p):
    p.add_argument("recipe", help="the recipe YAML whose data section to prepare")
    p.add_argument("--set", action="append", default=[], metavar="dotted.key=value", help="override a recipe value")
    p.add_argument("--out", required=True, help="the prepared folder to write (a rerun resumes it)")
    p.add_argument("--workers", type=POSITIVE, default=None, help="encoding processes (default: data.workers)")
    p.add_argument("--shard-size", type=POSITIVE, default=4096,
                   help="records per shard: a killed prepare redoes at most this many (fixed by the first run)")


def _a_generate(p):
    p.add_argument("--model", required=True, help="checkpoint folder, alias or Hub id")
    p.add_argument("--template", default=None, help="chat template (default: the one the checkpoint was trained with)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="one user message")
    g.add_argument("--input", help="JSONL of {messages} or {prompt}")
    p.add_argument("--out", default="-",
                   help="with --input: JSONL to write ('-', the default: stdout); written whole, then renamed")
    _a_decoding(p)


def _a_decoding(p, length: str = "most tokens generated per reply"):
    """The decoding flags of generate, chat and eval: each overrides the checkpoint's decoding."""
    g = p.add_argument_group("decoding", "default: the checkpoint's generation_config.json, where a ctrltok run "
                                         "writes its recipe's decoding section")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="greedy decoding, whatever the checkpoint says")
    mode.add_argument("--temperature", type=_number(0.0), default=None, help="sampling temperature (0: greedy)")
    g.add_argument("--top-p", type=_number(0.0, 1.0, low_open=True), default=None, help="nucleus sampling mass")
    g.add_argument("--top-k", type=_at_least(0), default=None, help="sample from the k likeliest tokens (0: no limit)")
    g.add_argument("--repetition-penalty", type=_number(0.0, low_open=True), default=None,
                   help="divide the logits of already generated tokens (1: none; LIMA used 1.2)")
    g.add_argument("--no-repeat-ngram-size", type=_at_least(0), default=None, help="never repeat an n-gram (0: off)")
    g.add_argument("--max-new-tokens", type=POSITIVE, default=None, help=length)
    g.add_argument("--seed", type=_at_least(0), default=0, help="sampling seed")


def _a_chat(p):
    p.add_argument("--model", required=True, help="checkpoint folder, alias or Hub id")
    p.add_argument("--template", default=None, help="chat template (default: the one the checkpoint was trained with)")
    p.add_argument("--system", default=None, help="a system message to start the conversation with")
    _a_decoding(p)


def _a_eval(p):
    p.add_argument("--model", required=True,
                   help="checkpoint folder, alias or Hub id; or a backtranslation output folder")
    p.add_argument("--data", default=None,
                   help="held-out chats (default: the run's held-out split); --conditional: prompts; "
                        "backtranslation: held-out instruction chats for the ablation")
    p.add_argument("--template", default=None, help="chat template (default: the one the checkpoint was trained with)")
    p.add_argument("--before", default=None, help="a base model to compare with (prepared with the same tokens)")
    p.add_argument("--conditional", action="store_true", help="aligned / unconditional / misaligned sampling")
    p.add_argument("--epe", action="store_true", help="reflection loss, charter F1, equivalence check")
    p.add_argument("--sidecar", default=None, help="with --epe and --data: the held-out annotations")
    p.add_argument("--scorer", default="profanity", help="with --conditional: the sentence scorer (profanity, detoxify)")
    p.add_argument("--max-prompts", type=_at_least(0), default=MAX_PROMPTS,
                   help=f"prompts generated for: the stop rate's (0: the loss and role-token counts alone), or "
                        f"--conditional's from --data (default {MAX_PROMPTS})")
    p.add_argument("--max-conversations", type=POSITIVE, default=None,
                   help="held-out conversations in the loss (default: all)")
    p.add_argument("--samples", type=POSITIVE, default=SAMPLES,
                   help=f"--conditional: samples per prompt and condition (default {SAMPLES})")
    p.add_argument("--batch-size", type=POSITIVE, default=32, help="sequences per generate call (default 32)")
    # The old --n (prompts, or conditional samples): refused by name, since argparse would otherwise
    # read it as an abbreviation of --no-repeat-ngram-size.
    p.add_argument("--n", type=POSITIVE, default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print the result as JSON alone on stdout (tables: stderr)")
    _a_decoding(p, "most tokens generated per reply (default: the decoding's; --conditional: 32)")


def _a_label(p):
    p.add_argument("--input", required=True, help="documents: JSONL/Parquet file, folder, or datasets name")
    p.add_argument("--out", required=True, help="labelled JSONL to write (a rerun resumes it)")
    p.add_argument("--scorer", default="profanity", help="sentence scorer (profanity, detoxify)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--threshold", type=float, default=None, help="absolute score above which a sentence is misaligned")
    g.add_argument("--misaligned-fraction", type=_number(0.0, 1.0, True, True), default=None,
                   help="calibrate the threshold so this fraction of sentences is misaligned")
    p.add_argument("--drop-fraction", type=_number(0.0, 1.0), default=0.01,
                   help="fraction of sentences left without a control token")
    p.add_argument("--seed", type=_at_least(0), default=0, help="seed of the dropped sentences")
    p.add_argument("--processes", type=POSITIVE, default=1, help="scoring processes")
    p.add_argument("--text-field", default="text", help="the field holding each document's text")
    p.add_argument("--on-error", default="raise", choices=["raise", "skip"],
                   help="a bad record: stop (raise) or count it and go on (skip)")


def _a_constitution(p):
    p.add_argument("--model", required=True, help="an EPE checkpoint folder (with its head)")
    p.add_argument("--input", required=True, help="JSONL of {messages}")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")


def _a_annotate(p):
    p.add_argument("--model", required=True, help="the annotating model: checkpoint folder, alias or Hub id")
    p.add_argument("--input", required=True, help="corpus JSONL of {id, text}")
    p.add_argument("--out", required=True, help="sidecar JSONL to write (resumes)")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=128, help="most tokens per answer")


def _a_push(p):
    p.add_argument("path", help="a saved model folder (the --out of ctrltok train)")
    p.add_argument("--repo", required=True, help="the Hub repository, OWNER/NAME")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--revision", default=None, help="branch to upload to (default: main)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="also leave out these files")
    p.add_argument("--message", default=None, help="the commit message")
    p.add_argument("--dry-run", action="store_true", help="list the files that would be uploaded; send nothing")


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
    "backtranslate": ("ctrltok.cli.backtranslate:backtranslate", _a_backtranslate, "instruction backtranslation pipeline"),
    "annotate": ("ctrltok.cli.annotate:annotate", _a_annotate, "write an EPE sidecar with an LLM"),
    "push": ("ctrltok.cli.push:push", _a_push, "upload a saved model folder to the Hugging Face Hub, without checkpoints"),
}


def resolve(target: str):
    """A handler from the table: ``"ctrltok.cli.MODULE:FUNCTION"`` -> the function."""
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ctrltok", description="Teach language models new control tokens.")
    parser.add_argument("--version", action="version", version=f"ctrltok {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (target, add_args, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        add_args(p)
        p.set_defaults(target=target)
    return parser


# -- checks before anything loads -------------------------------------------------------------------
def preflight(args: argparse.Namespace) -> None:
    """The names and paths a command takes, checked before its handler imports or loads anything."""
    model = getattr(args, "model", None)
    run_folder = False  # a backtranslation folder holds models, is none
    if args.command == "eval" and model is not None:
        run_folder = backtranslation_folder(model) is not None
    if model is not None and not run_folder:
        check_model_name(model)
    if getattr(args, "before", None):
        check_model_name(args.before, "--before")
    if getattr(args, "template", None):
        check_template(args.template, model)
    for flag in ("input", "data", "sidecar"):
        value = getattr(args, flag, None)
        if value:
            check_input(value, f"--{flag}")
    if getattr(args, "out", None) and args.command in ("render", "generate", "label", "annotate"):
        check_output(args.out, {"--input": getattr(args, "input", None)})


# -- main ------------------------------------------------------------------------------------------
def user_error_types() -> tuple[type[BaseException], ...]:
    """The loaded classes of ``USER_ERRORS``."""
    out = []
    for spec in USER_ERRORS:
        module, name = spec.split(":")
        loaded = sys.modules.get(module)
        if loaded is not None:
            out.append(getattr(loaded, name))
    return tuple(out)


def one_line(exc: BaseException, command: str) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    for python, flag in CLI_TERMS.get(command, ()):
        text = text.replace(python, flag)
    return text


def _quiet_transformers() -> None:
    """transformers' own tqdm bars ("Loading weights", "Writing model shards") off; ctrltok's rich
    progress stays, and so do the Hub's download bars (a first download can take minutes)."""
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    enable_progress_bars()


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    preflight(args)
    if args.command == "train":  # `accelerate launch --cpu --num_processes N` starts one process
        if check_train(args) == "done":  # a bad recipe or used --out fails here, once, not in every process
            return 0
        code = relaunch_if_needed(sys.argv[1:] if argv is None else list(argv))
        if code is not None:
            return code
    _quiet_transformers()
    code = resolve(args.target)(args)
    return code if isinstance(code, int) else 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or an argument error (already printed)
        return exc.code if isinstance(exc.code, int) else 2
    debug = args.debug or os.environ.get("CTRLTOK_DEBUG", "") not in ("", "0")
    try:
        return _run(args, argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print(file=sys.stderr)  # end the line the ^C was echoed on; nothing else
        return 130
    except Exception as exc:
        if debug or not isinstance(exc, user_error_types()):
            raise
        print(f"ctrltok {args.command}: error: {one_line(exc, args.command)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
