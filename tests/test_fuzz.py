"""Hypothesis fuzz of what users hand the CLI: recipe values and JSONL records.

The property, for every input: a clean success, or exit code 2 with exactly one line on stderr
(``ctrltok COMMAND: error: ...``) and no traceback; never exit code 0 with wrong output.

* Recipes: a valid tiny recipe with a few values replaced by odd ones (wrong types, negatives, NaN,
  huge numbers, empty strings, unknown keys, empty or missing sections, odd ``--set`` strings, YAML
  that is not a recipe), through ``ctrltok train``. Training itself is replaced by the trainer's
  first uses of the values (the tracker check, the optimizer and learning-rate schedule of
  ``training/train.py``, one step of each), so an example costs milliseconds: the point is what the
  CLI accepts, not a training run.
* Records: lines of a JSONL file (every chat layout, forged control-token spellings in the text,
  unicode, huge strings, wrong types, empty assistant turns, turns out of order, lines that are not
  objects or not JSON, invalid UTF-8, blank lines), through ``ctrltok render`` (a bad record stops
  it) and ``ctrltok prepare`` with ``data.on_error`` raise and skip. Every line is generated with
  what a correct reader must make of it, so a success is checked: one output per record, written +
  skipped = lines, and the control ids in each output are exactly the template's (text that spells
  ``<EOT>`` or ``<|im_start|>`` stays text).

The examples are derandomized (the same ones on every run, so a failure reproduces); the counts are
kept small for the suite's time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

import ctrltok.training.train as trainer
from ctrltok.cli.main import main
from ctrltok.core.config import Recipe, load_recipe
from ctrltok.core.example import IGNORE
from ctrltok.data.store import PreparedData
from ctrltok.training.setup import prepare_tokenizer

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("CTRLTOK_PROGRESS", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def one_error_line(err: str, command: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ctrltok {command}: error: "), err[-3000:]
    return lines[0]


# -- recipes ---------------------------------------------------------------------------------------
def _sections() -> dict[str, list[str]]:
    """Every recipe section and its keys, from the dataclasses (so new keys are fuzzed too)."""
    out = {}
    for name, tp in typing.get_type_hints(Recipe).items():
        cls = next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), tp)
        if dataclasses.is_dataclass(cls):
            out[name] = [f.name for f in dataclasses.fields(cls)]
    return out


SECTIONS = _sections()
ODD_STRINGS = ["", " ", "nan", "-1", "1e-3", "0", "all-linear", "copy:", "copy:<EOT>", "eot", "default", "chatml",
               "ctrltok:nope", "ctrltok:instructions", "hf:", "hf:x?bad=1", "./nosuch", "../", "~", "raise", "skip",
               "cosine", "linear", "reduce_lr_on_plateau", "fp16", "bf16", "deepspeed", "fsdp2", "tensorboard",
               "wandb", "q_proj", "<EOT>", "\x00", "é", "a" * 300]
ODD = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70), st.sampled_from([0, -1, 1, 2, 7, 2**31, 10**12]),
    st.floats(),  # NaN, infinities, -0.0, subnormals
    st.text(max_size=12), st.sampled_from(ODD_STRINGS),
    st.lists(st.one_of(st.integers(-2, 2), st.text(max_size=4), st.floats(), st.none()), max_size=3),
    st.dictionaries(st.one_of(st.text(max_size=4), st.integers(-2, 2)), st.integers(-2, 2), max_size=2),
)
SET_VALUES = st.one_of(st.text(max_size=8), st.sampled_from([
    "[", "]", "{", "}", "a: b", "!!python/object:os.system", "&a", "*a", "@x", "`x", "%x", "'", '"', "- x", "? x",
    "|", ">", "1e999", ".inf", "-.inf", ".nan", "0x1F", "1_000", "2024-01-01", "null", "~", "yes", "[1, [2]]",
    "{a: 1}", "-3", "0", "1e-4"]))
RAW_DOCUMENTS = ["", "# only a comment\n", "[1, 2]\n", "just a string\n", "42\n", "model: [\n", "model:\n\tname: x\n",
                 "a: &x 1\nb: *y\n", "!!python/name:os.system\n", "data: {}\n---\ntrain: {}\n", "\x00\n",
                 "model: {name: a}\nmodel: {name: b}\n", "? [a, b]\n: c\n", "{[1]: 2}\n", "train: !!binary aGk=\n"]


@st.composite
def recipes(draw, base: dict) -> tuple[str, list[str]]:
    """(YAML text, --set arguments): the base recipe with odd changes, or a document that is not one."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from(RAW_DOCUMENTS)), []
    mapping = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["value", "value", "value", "unknown key", "section", "drop section", "top"]))
        section = draw(st.sampled_from(sorted(SECTIONS)))
        if kind == "value":
            key = draw(st.sampled_from(SECTIONS[section]))
            node = mapping.setdefault(section, {})
            if isinstance(node, dict):
                node[key] = draw(ODD)
        elif kind == "unknown key":
            node = mapping.setdefault(section, {})
            if isinstance(node, dict):
                node[draw(st.one_of(st.text(max_size=6), st.integers(-2, 2), st.none()))] = draw(ODD)
        elif kind == "section":
            mapping[section] = draw(st.one_of(st.just({}), ODD))
        elif kind == "drop section":
            mapping.pop(section, None)
        else:
            mapping[draw(st.one_of(st.sampled_from(["name", "source", "models", "Train"]), st.integers(0, 2)))] = draw(ODD)
    sets = []
    for _ in range(draw(st.integers(0, 2))):
        section = draw(st.sampled_from(sorted(SECTIONS)))
        key = draw(st.one_of(st.sampled_from(SECTIONS[section]), st.text(max_size=5)))
        sets += ["--set", f"{section}.{key}={draw(SET_VALUES)}"]
    return yaml.safe_dump(mapping, sort_keys=False, allow_unicode=True), sets


def _non_finite(value, where: str = "") -> str | None:
    """The first NaN or infinity in a recipe's values (``model.config`` is the model's own business)."""
    if isinstance(value, float) and not math.isfinite(value):
        return where
    if isinstance(value, dict):
        for k, v in value.items():
            if f"{where}.{k}".lstrip(".") != "model.config":
                found = _non_finite(v, f"{where}.{k}")
                if found:
                    return found
    if isinstance(value, list):
        for i, v in enumerate(value):
            found = _non_finite(v, f"{where}[{i}]")
            if found:
                return found
    return None


def _first_uses(calls: list[Recipe]) -> Callable:
    """Stands in for ``training.train.train``: the trainer's first uses of the recipe's values that
    need no model (trackers, the optimizer with its groups, the learning-rate schedule and one step
    of each, as the loop takes them). A value the CLI accepted must get through them."""

    def train(recipe: Recipe, out_dir, progress: bool = True, resume_with_changes: bool = False) -> Path:
        trainer.check_trackers(recipe)
        optimizer, scheduler = trainer._optimizer(torch.nn.Linear(2, 2), recipe, 10)
        optimizer.step()
        scheduler.step()
        calls.append(recipe)
        return Path(out_dir)

    return train


@pytest.fixture(scope="module")
def chats_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fuzz-data") / "chats.jsonl"
    good = {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]}
    path.write_text(json.dumps(good) + "\n")
    return path


def test_fuzz_recipe_values(capsys, tmp_path, monkeypatch, tiny_model_dir, chats_file):
    base = {"model": {"name": str(tiny_model_dir)}, "tokens": {"presets": ["eot"], "pad_to_multiple_of": 64},
            "data": {"train": str(chats_file), "template": "eot", "max_length": 64, "eval_fraction": 0.0},
            "train": {"max_steps": 2, "lr": 1e-3}}
    monkeypatch.chdir(tmp_path)  # relative paths in the odd values resolve inside the test's folder
    accepted = []

    @settings(FUZZ, max_examples=60)
    @given(recipes(base))
    def check(example):
        text, sets = example
        calls: list[Recipe] = []
        with tempfile.TemporaryDirectory(dir=tmp_path) as d, pytest.MonkeyPatch.context() as mp:
            mp.setattr(trainer, "train", _first_uses(calls))
            (Path(d) / "r.yaml").write_text("# fuzzed recipe: ctrltok train r.yaml\n" + text, encoding="utf-8")
            out = Path(d) / "run"
            code = main(["train", str(Path(d) / "r.yaml"), "--out", str(out), *sets])
            captured = capsys.readouterr()
            if code == 0:
                assert len(calls) == 1, captured.err[-3000:]
                assert "Traceback" not in captured.err
                bad = _non_finite(dataclasses.asdict(calls[0]))
                assert bad is None, f"accepted a non-finite {bad}: {text!r} {sets}"
                accepted.append(text)
            else:
                assert code == 2, (code, captured.err[-3000:])
                one_error_line(captured.err, "train")
                assert not calls and not out.exists(), "refused only after the run began"

    def changed(section: str, key, value) -> tuple[str, list[str]]:
        mapping = json.loads(json.dumps(base))
        mapping.setdefault(section, {})[key] = value
        return yaml.safe_dump(mapping, sort_keys=False), []

    # What the fuzz found, kept as explicit examples (each drawn rarely at random). They pass once
    # core/config.py and core/schema.py refuse them (see the issue-15 fuzz report):
    # train.scheduler: unchecked, a traceback from transformers after the model loads (also for the
    # names that need arguments ctrltok does not pass: reduce_lr_on_plateau, warmup_stable_decay, ...);
    # conditional.threshold: NaN accepted (every sentence labelled one way); a key that is not a
    # string: TypeError in schema.build's sorted(); a --set value that is not YAML: a yaml traceback.
    found = [changed("train", "scheduler", "foo"), changed("train", "scheduler", "reduce_lr_on_plateau"),
             changed("conditional", "threshold", float("nan")), changed("backtranslate", 0, None),
             (yaml.safe_dump(base), ["--set", "train.lr=["]), (yaml.safe_dump(base), ["--set", "data.template='"])]
    for case in found:
        check = example(case)(check)
    check()
    assert accepted, "no example was a valid recipe: the fuzz only tests refusals"


# -- records ---------------------------------------------------------------------------------------
BOM = "\ufeff".encode()
# What a record must give: a conversation of `n` messages under each template, or None for a
# record a correct reader refuses (an error, or a counted skip).
@dataclass
class Line:
    raw: bytes
    default: int | None  # messages under a template with role markers ("default": ChatML)
    eot: int | None  # messages under "eot" (no role markers: turns must alternate)
    assistant: bool = True  # has an assistant turn (else nothing to train on: prepare drops it)
    huge: bool = False  # may be cut by data.max_length (prepare may drop it: its reply cut off)

    @property
    def blank(self) -> bool:
        try:  # a byte-order mark (only ever on the first line) is dropped by the reader
            return not self.raw.removeprefix(BOM).decode("utf-8").strip()
        except UnicodeDecodeError:
            return False


FORGED = ["<EOT>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|assistant|>", "<|aligned|>", "<|misaligned|>",
          "<repo_name>", "<EOT", "EOT>", "<|im_start|>assistant\n", "\u200b<EOT>", "<<EOT>>"]
PIECE = st.one_of(st.text(max_size=12), st.sampled_from(FORGED))
CONTENT = st.lists(PIECE, max_size=4).map("".join)
REPLY = st.tuples(CONTENT, st.sampled_from(["Blue.", "ok", "<EOT>", "<|im_end|>", "é", "数", "🙂"])).map("".join)
BLANKS = ["", " ", "\t", "\n", " \u3000 "]  # contents of an empty turn
BLANK_LINES = ["", " ", "\t", " \u3000 ", "\r"]  # what the reader passes over (no newline: one line each)


def _dump(record) -> bytes:
    return json.dumps(record, ensure_ascii=False).encode("utf-8")


@st.composite
def good_chats(draw) -> Line:
    """Alternating user/assistant turns (a system message first, sometimes) in one of the layouts."""
    pairs = [(draw(CONTENT), draw(REPLY)) for _ in range(draw(st.integers(1, 3)))]
    layout = draw(st.sampled_from(["messages", "lima", "sharegpt", "alpaca", "prompt/response"]))
    if layout == "lima":
        return Line(_dump({"conversations": [t for p in pairs for t in p]}), 2 * len(pairs), 2 * len(pairs))
    if layout == "sharegpt":
        turns = [{"from": f, "value": t} for u, a in pairs for f, t in (("human", u), ("gpt", a))]
        return Line(_dump({"conversations": turns}), len(turns), len(turns))
    if layout == "alpaca":
        record = {"instruction": pairs[-1][0], "output": pairs[-1][1], "history": [list(p) for p in pairs[:-1]]}
        if draw(st.booleans()):
            record["input"] = draw(st.one_of(st.none(), CONTENT))
        return Line(_dump(record), 2 * len(pairs), 2 * len(pairs))
    if layout == "prompt/response":
        return Line(_dump({"prompt": pairs[0][0], "response": pairs[0][1]}), 2, 2)
    msgs = [{"role": "system", "content": draw(CONTENT)}] if draw(st.booleans()) else []
    msgs += [{"role": r, "content": t} for u, a in pairs for r, t in (("user", u), ("assistant", a))]
    return Line(_dump({"messages": msgs}), len(msgs), len(msgs))


def _alternates(roles: list[str]) -> bool:
    """The rule of a template without role markers: [system], user, assistant, user, ..."""
    start = 1 if roles and roles[0] == "system" else 0
    return all(r == ("user", "assistant")[(j - start) % 2] for j, r in enumerate(roles) if j >= start)


@st.composite
def any_order_chats(draw) -> Line:
    """Roles in any order, every assistant turn filled: fine with role markers, not always without."""
    roles = draw(st.lists(st.sampled_from(["system", "user", "assistant"]), min_size=1, max_size=4))
    msgs = [{"role": r, "content": draw(REPLY if r == "assistant" else CONTENT)} for r in roles]
    return Line(_dump({"messages": msgs}), len(msgs), len(msgs) if _alternates(roles) else None,
                assistant="assistant" in roles)


@st.composite
def empty_replies(draw) -> Line:
    msgs = [{"role": "user", "content": draw(CONTENT)}, {"role": "assistant", "content": draw(st.sampled_from(BLANKS))}]
    return Line(_dump({"messages": msgs}), None, None)


BAD_RECORDS = [
    {}, {"text": "just text"}, {"foo": 1}, {"messages": []}, {"messages": "hi"}, {"messages": [1]},
    {"messages": [{"role": "user"}]}, {"messages": [{"role": "bot", "content": "x"}]},
    {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},
    {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]},
    {"messages": [{"role": ["user"], "content": "x"}]}, {"conversations": []}, {"conversations": ["a", 1]},
    {"conversations": [{"from": "alien", "value": "x"}]}, {"conversations": "a"},
    {"instruction": None, "output": "x"}, {"instruction": ["x"], "output": "y"}, {"instruction": "x", "output": None},
    {"instruction": "x", "input": 3, "output": "y"}, {"instruction": "x", "output": "y", "history": "h"},
    {"instruction": "x", "output": "y", "history": [["a"]]}, {"prompt": "x"}, {"prompt": 1, "response": "x"},
    {"prompt": {"text": "x"}, "response": "y"}, {"prompt": "x", "response": ["y"]},
]
BAD_LINES = [b"{bad", b"{'a': 1}", b'{"messages": [', b"NaN", b"{} {}", b"[" * 100_000, b"\x00",
             b'{"a": ' + b"1" * 5000 + b"}", b'{"messages": [{"role": "user", "content": "a\\ud800b"}, '
             b'{"role": "assistant", "content": "ok"}]}', b'\xff\xfe{"prompt": "x", "response": "y"}',
             b'{"prompt": "x", "response": "\\udfff"}']


def bad_lines() -> st.SearchStrategy[Line]:
    return st.one_of(
        st.sampled_from(BAD_RECORDS).map(lambda r: Line(_dump(r), None, None)),
        st.one_of(st.lists(st.integers(), max_size=2), st.integers(), st.text(max_size=5), st.none(), st.booleans(),
                  st.floats(allow_nan=False)).map(lambda v: Line(_dump(v), None, None)),
        st.sampled_from(BAD_LINES).map(lambda b: Line(b, None, None)),
        empty_replies(),
    )


@st.composite
def huge_chats(draw) -> Line:
    user = draw(st.sampled_from(["x", "<EOT>", "数", "ab "])) * draw(st.integers(20_000, 60_000))
    return Line(_dump({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "ok"}]}),
                2, 2, huge=True)


LINES = st.one_of(good_chats(), good_chats(), any_order_chats(), bad_lines(),
                  st.sampled_from(BLANK_LINES).map(lambda b: Line(b.encode(), None, None)), huge_chats())


@st.composite
def record_files(draw, min_good: int = 0) -> list[Line]:
    lines = draw(st.lists(LINES, min_size=1, max_size=8))
    if min_good:
        lines += draw(st.lists(good_chats(), min_size=min_good, max_size=min_good))
        lines = draw(st.permutations(lines))
    if draw(st.integers(0, 5)) == 0:  # a byte-order mark before the first line, as some editors write
        lines[0] = dataclasses.replace(lines[0], raw=BOM + lines[0].raw)
    return lines


def _write(path: Path, lines: list[Line]) -> None:
    path.write_bytes(b"".join(line.raw + b"\n" for line in lines))


def _specials(tokenizer) -> set[int]:
    return {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}


def _line_of(error: str, name: str) -> int | None:
    """The line number an error names in ``name`` (``chats.jsonl:7: ...``), if any."""
    marker = f"{name}:"
    if marker not in error:
        return None
    digits = error.split(marker, 1)[1].split(":", 1)[0].split(" ", 1)[0]
    return int(digits) if digits.isdigit() else None


@pytest.fixture(scope="module")
def eot_model(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuzz-eot") / "model"
    assert main(["add-tokens", "--model", str(tiny_model_dir), "--preset", "eot", "--out", str(out)]) == 0
    return out


def test_fuzz_records_through_render(capsys, tmp_path, tiny_model_dir, eot_model):
    """``ctrltok render`` stops at a bad record: exit 0 only when every record is good, with one
    output per record whose control ids are exactly the template's; otherwise one line naming a
    line of the file that is not good."""
    models = {"default": tiny_model_dir, "eot": eot_model}
    specials = {t: _specials(AutoTokenizer.from_pretrained(m)) for t, m in models.items()}
    assert 49152 in specials["eot"]  # <EOT> is a control id of the eot model
    per_message = {"default": 2, "eot": 1}  # <|im_start|> ... <|im_end|>, or ... <EOT>

    @settings(FUZZ, max_examples=25)
    @given(record_files(), st.sampled_from(sorted(models)))
    def check(lines, template):
        with tempfile.TemporaryDirectory(dir=tmp_path) as d:
            src, out = Path(d) / "chats.jsonl", Path(d) / "ids.jsonl"
            _write(src, lines)
            code = main(["render", "--model", str(models[template]), "--template", template, "--input", str(src),
                         "--out", str(out)])
            captured = capsys.readouterr()
            records = [line for line in lines if not line.blank]
            expected = [getattr(line, template) for line in records]
            if code == 0:
                assert "Traceback" not in captured.err
                assert None not in expected, f"exit 0 over a bad record: {[r.raw[:200] for r in records]}"
                rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
                assert len(rows) == len(records)
                for row, n, line in zip(rows, expected, records):
                    ids, labels = row["input_ids"], row["labels"]
                    assert len(ids) == len(labels) and all(lab in (IGNORE, t) for t, lab in zip(ids, labels))
                    controls = sum(t in specials[template] for t in ids)
                    assert controls == per_message[template] * n, f"control ids made from text: {line.raw[:300]!r}"
                    assert any(lab != IGNORE for lab in labels) == line.assistant
            else:
                assert code == 2, (code, captured.err[-3000:])
                error = one_error_line(captured.err, "render")
                assert not out.exists()
                if not records:
                    return
                assert None in expected, f"refused good records: {error}"
                k = _line_of(error, "chats.jsonl")
                assert k is not None, error
                assert getattr(lines[k - 1], template) is None, f"named a good line: {error}"

    check()


def test_fuzz_records_through_prepare(capsys, tmp_path, tiny_model_dir):
    """``ctrltok prepare`` with data.on_error: skip counts every record (documents + skips = the
    file's records, each good record one document with only the template's control ids); with raise,
    exit 0 only when no record is bad, else one line naming a bad line."""
    def recipe(folder: Path, on_error: str) -> Path:
        mapping = {"model": {"name": str(tiny_model_dir)}, "tokens": {"presets": ["eot"]},
                   "data": {"train": str(folder / "chats.jsonl"), "template": "eot", "max_length": 2048,
                            "eval_fraction": 0.0, "on_error": on_error}}
        path = folder / "r.yaml"
        path.write_text("# fuzz: ctrltok prepare r.yaml --out DIR\n" + yaml.safe_dump(mapping))
        return path

    tokenizer, _ = prepare_tokenizer(load_recipe(recipe(tmp_path, "raise")))
    specials = _specials(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<EOT>") in specials

    @settings(FUZZ, max_examples=8)
    @given(st.one_of(record_files(), record_files(min_good=1)), st.sampled_from(["skip", "raise"]))
    def check(lines, on_error):
        with tempfile.TemporaryDirectory(dir=tmp_path) as d:
            _write(Path(d) / "chats.jsonl", lines)
            out = Path(d) / "prepared"
            code = main(["prepare", str(recipe(Path(d), on_error)), "--out", str(out)])
            captured = capsys.readouterr()
            records = [(k, line) for k, line in enumerate(lines, 1) if not line.blank]
            good = {k: line for k, line in records if line.eot is not None and line.assistant and not line.huge}
            if code != 0:
                assert code == 2, (code, captured.err[-3000:])
                error = one_error_line(captured.err, "prepare")
                assert on_error == "raise" or not good, f"skip mode refused a file with good records: {error}"
                k = _line_of(error, "chats.jsonl")
                if k is None:  # about the whole file: nothing in it to train on
                    assert not good and "chats.jsonl" in error, error
                else:
                    assert k not in good, f"named a good line: {error}"
                return
            assert "Traceback" not in captured.err
            if on_error == "raise":
                assert all(line.eot is not None for _, line in records), "exit 0 over a bad record"
            data = PreparedData.open(out)
            skips = sum(data.manifest["skips"].values())
            assert len(data.train) + len(data.eval) + skips == len(records), (data.manifest["skips"], len(records))
            docs = {int(ex.source.rsplit(":", 1)[1]): ex for ex in data.train}
            assert set(good) <= set(docs), f"good records missing: {sorted(set(good) - set(docs))}"
            for k, ex in docs.items():
                assert lines[k - 1].eot is not None, f"line {k} is bad, yet a document"
                controls = sum(t in specials for t in ex.input_ids)
                assert controls == lines[k - 1].eot, f"control ids made from text: {lines[k - 1].raw[:300]!r}"

    # Found by the fuzz, kept explicit: with every record skipped, data/prepare.py raises a plain
    # ValueError ("no usable training documents"), a traceback; passes once it raises a user error.
    check = example([Line(b"{bad", None, None)], "skip")(check)
    check()
