"""`ctrltok add-tokens`, `render`, `inspect`: vocabulary surgery and encoding from the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table
from transformers import AutoTokenizer

from ctrltok.cli.checks import UsageError, check_output, model_vocab, output_file
from ctrltok.core.chat import ChatEncoder
from ctrltok.core.config import TokensConfig
from ctrltok.core.conversation import to_conversation
from ctrltok.core.models import load_model, resolve_model
from ctrltok.core.records import read_records
from ctrltok.core.templates import get_template, install_templates, preset_template
from ctrltok.core.tokens import add_tokens as add_control_tokens
from ctrltok.core.tokens import apply_generation_config, resolve_tokens
from ctrltok.evaluation.doctor import Report, inspect_checkpoint
from ctrltok.training.checkpoint import RunManifest


def save_with_tokens(model: str, presets: list[str], init: str | None = None, pad_to_multiple_of: int | None = None,
                     out: str | Path = "out", template: str | None = None) -> Path:
    """Load a model, add preset tokens (``init``: default ``tokens.init``'s), install templates, save a
    plain checkpoint with its manifest."""
    init = init or TokensConfig().init
    m, tok = load_model(model)
    surgery = add_control_tokens(m, tok, resolve_tokens(presets), init=init, pad_to_multiple_of=pad_to_multiple_of)
    if template is None:  # the first preset that has a template of its own names the end of turn
        template = preset_template(presets)
    install_templates(tok, default=template)  # the template the tokens are for is the saved default
    tmpl = get_template(template, tok)
    end_of_turn = tmpl.end_of_turn
    apply_generation_config(m, surgery, tmpl.end_of_turn_id(tok))
    out = Path(out)
    m.save_pretrained(out)
    tok.save_pretrained(out)
    RunManifest({**surgery.manifest(), "template": template, "end_of_turn": end_of_turn, "recipe": None}).write(
        out, complete=True)
    return out


def render_file(model: str, template: str, input: str, out: str, loss_on: str = "assistant") -> int:
    """Chats (any layout :func:`to_conversation` reads) -> ``{"input_ids", "labels"}`` JSONL, in input order.

    ``out`` is written to ``OUT.tmp`` and renamed into place when every record is encoded: a bad
    record leaves an existing ``OUT`` untouched, a kill leaves no ``OUT`` that looks complete;
    ``out`` may not be ``input``; ``-`` writes to stdout."""
    check_output(out, {"--input": input})
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    encoder = ChatEncoder(tokenizer, template, loss_on)
    n = 0
    with output_file(out) as fh:
        chunk: list[tuple[str, dict]] = []

        def flush() -> None:
            convs = [to_conversation(rec, where) for where, rec in chunk]
            for ex in encoder.encode_many(convs, [w for w, _ in chunk]):
                fh.write(json.dumps({"input_ids": ex.input_ids, "labels": ex.labels}) + "\n")
            chunk.clear()

        for where, rec in read_records(input):
            chunk.append((where, rec))
            n += 1
            if len(chunk) == 512:
                flush()
        flush()
        if n == 0:
            raise UsageError(f"--input {input}: no records; nothing to render")
    return n


def print_report(report: Report) -> None:
    console = Console()
    console.print(f"[bold]{report.path}[/]")
    console.print(f"  embedding rows   {report.model_rows if report.model_rows is None else f'{report.model_rows:,}'}")
    console.print(f"  tokenizer length {report.tokenizer_length:,}")
    console.print(f"  tied embeddings  {report.tied}")
    console.print(f"  named templates  {', '.join(report.templates) or '(none)'}")
    console.print(f"  default template {report.default_template or '(none)'}")
    console.print(f"  stop ids         {report.stop_ids}")
    console.print(f"  suppressed ids   {report.suppressed} (e.g. {report.suppressed_sample})")
    table = Table("id", "token", "special", "atomic", title="added tokens")
    shown = [t for t in report.added_tokens if t["id"] >= 17 or not t["token"].startswith("<")] or report.added_tokens
    # Long runs (35 charter tokens) are shown by their ends; --json lists every token.
    visible = shown if len(shown) <= 12 else shown[:6] + [None] + shown[-3:]
    for t in visible:
        if t is None:
            hidden = shown[6:-3]
            bad = sum(1 for x in hidden if not x["atomic"])
            table.add_row("...", f"{len(hidden)} more ({hidden[0]['id']}..{hidden[-1]['id']})", "",
                          "yes" if not bad else f"[red]{bad} NOT[/]")
            continue
        table.add_row(str(t["id"]), t["token"], str(t["special"]), "yes" if t["atomic"] else "[red]NO[/]")
    console.print(table)
    if report.problems:
        console.print("[bold red]problems[/]")
        for p in report.problems:
            console.print(f"  - {p}")
    else:
        console.print("[bold green]no problems found[/]")


def add_tokens(a):
    vocab = model_vocab(a.model)  # a local folder's tokens, read before the weights load
    for preset in a.preset:
        have = [t.text for t in resolve_tokens([preset]) if vocab and t.text in vocab and not t.reuse]
        if have:
            raise UsageError(f"--model {a.model} already has {have[0]!r} (id {vocab[have[0]]}) of --preset {preset}; "
                             "leave that preset out, or start from a model without its tokens")
    out = save_with_tokens(a.model, a.preset, init=a.init, pad_to_multiple_of=a.pad_to_multiple_of, out=a.out,
                           template=a.template)
    print(f"saved to {out}")
    print_report(inspect_checkpoint(out))


def render(a):
    n = render_file(a.model, a.template, a.input, a.out, loss_on=a.loss_on)
    print(f"wrote {n} encoded conversations to {'stdout' if a.out == '-' else a.out}", file=sys.stderr)


def inspect(a):
    path = Path(a.path).expanduser()
    if not path.is_dir():
        raise UsageError(f"{a.path}: no such checkpoint folder" if not path.exists() else
                         f"{a.path}: a file; give the checkpoint's folder")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise UsageError(f"{a.path}: not a checkpoint folder (no tokenizer.json or tokenizer_config.json); give a "
                         "folder written by ctrltok train / add-tokens or save_pretrained")
    report = inspect_checkpoint(path)
    if a.json:
        print(report.to_json())
    else:
        print_report(report)
    return 1 if report.problems and a.strict else 0
