"""The CLI as a user meets it: every user error is one line ``ctrltok COMMAND: error: ...`` with exit
code 2 and no traceback; names are checked before anything loads; a run is tied to its settings (a
finished folder is not trained again, other settings are refused naming the key); outputs are
renamed into place (an input error or a kill leaves no partial file, ``--out`` may not be
``--input``). In-process through ``ctrltok.cli.main.main``, or as a subprocess where a kill is needed.
Tiny local models only, never the network."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ctrltok.cli.main import COMMANDS, PRESET_NAMES, USER_ERRORS, build_parser, main
from ctrltok.core.config import ConfigError, recipe_from_mapping
from ctrltok.core.records import resource_path
from ctrltok.training.checkpoint import RunManifest
from ctrltok.training.runs import (
    RunError,
    RunIdentity,
    check_run,
    recipe_values,
    run_identity,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = {"train": "ctrltok:instructions"}  # a recipe names its data (no default)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(err: str, command: str, *names: str) -> str:
    """The error is one line naming ``names``; nothing looks like a traceback."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith(f"ctrltok {command}: error: ")]
    assert len(errors) == 1, err
    for name in names:
        assert name in errors[0], errors[0]
    return errors[0]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("CTRLTOK_PROGRESS", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ctrltok-cache")


def write_recipe(path: Path, model: Path | str, data: str = "ctrltok:instructions", **train) -> Path:
    mapping = {
        "model": {"name": str(model)},
        "tokens": {"presets": ["eot"], "pad_to_multiple_of": 64},
        "data": {"train": data, "template": "eot", "max_length": 48, "limit": 16, "eval_fraction": 0.1},
        "train": {"lr": 1e-3, "max_steps": 2, "micro_batch_size": 2, "grad_accum": 1, **train},
    }
    path.write_text("# test recipe: ctrltok train r.yaml\n" + yaml.safe_dump(mapping))
    return path


# -- the command table -----------------------------------------------------------------------------
def test_version(capsys):
    from ctrltok import __version__

    code, out, _ = cli(capsys, "--version")
    assert code == 0 and out.strip() == f"ctrltok {__version__}"


def test_every_option_of_every_command_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    missing = [f"{name} {action.option_strings or action.dest}" for name, p in sub.choices.items()
               for action in p._actions if not isinstance(action, type(parser._actions[0])) and not action.help]
    assert not missing, missing


def test_readme_lists_every_command():
    table = (ROOT / "README.md").read_text(encoding="utf-8")
    assert [c for c in COMMANDS if f"`ctrltok {c}" not in table] == []


def test_tables_of_names_match_the_library():
    from ctrltok.core.tokens import PRESETS

    assert sorted(PRESET_NAMES) == sorted([*PRESETS, "epe"])
    for spec in USER_ERRORS:
        module, name = spec.split(":")
        cls = getattr(__import__(module, fromlist=[name]), name)
        assert issubclass(cls, Exception), spec
    assert issubclass(RunError, ConfigError)


@pytest.mark.parametrize("args,flag", [
    (["generate", "--model", "m", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["add-tokens", "--model", "m", "--preset", "eot", "--pad-to-multiple-of", "0", "--out", "o"], "--pad-to-multiple-of"),
    (["add-tokens", "--model", "m", "--preset", "eot", "--pad-to-multiple-of", "-8", "--out", "o"], "--pad-to-multiple-of"),
    (["add-tokens", "--model", "m", "--preset", "eott", "--out", "o"], "--preset"),
    (["eval", "--model", "m", "--n", "0"], "--n"),
    (["label", "--input", "i", "--out", "o", "--drop-fraction", "2"], "--drop-fraction"),
    (["generate", "--model", "m", "--prompt", "x", "--temperature", "-1"], "--temperature"),
])
def test_bad_arguments_are_one_line(capsys, args, flag):
    code, _, err = cli(capsys, *args)
    assert code == 2
    assert err.strip().count("\n") == 0, err  # no usage block either
    assert_one_line_error(err, args[0], flag)


# -- recipes: refused before anything loads --------------------------------------------------------
@pytest.mark.parametrize("sets,names", [
    (["train.max_steps=-3"], ["train.max_steps", "-3"]),
    (["train.micro_batch_size=0"], ["train.micro_batch_size"]),
    (["tokens.pad_to_multiple_of=0"], ["tokens.pad_to_multiple_of"]),
    (["tokens.pad_to_multiple_of=-8"], ["tokens.pad_to_multiple_of"]),
    (["train.lr=.nan"], ["train.lr"]),
    (["data.eval_fraction=1.5"], ["data.eval_fraction"]),
    (["lora.dropout=1"], ["lora.dropout"]),
    (["tokens.custom=[{purpose: x}]"], ["tokens.custom[0]", "'token'"]),
    (["tokens.presets=[eott]"], ["tokens.presets", "eott", "did you mean eot"]),
    (["data.template=eott"], ["data.template", "eott"]),
    (["model.name=smolm2-135m"], ["model.name", "did you mean smollm2-135m"]),
    (["model.name=./no/such/model"], ["model.name", "no such folder"]),
    (["data.train=nosuch.jsonl"], ["data.train", "nosuch.jsonl"]),
    (["tokens.presets=[]"], ["data.template", "<EOT>", "tokens.presets"]),
])
def test_bad_recipe_values_are_one_line_before_loading(capsys, tmp_path, tiny_model_dir, monkeypatch, sets, names):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir)
    args = ["train", recipe, "--out", tmp_path / "run"]
    for s in sets:
        args += ["--set", s]
    t0 = time.perf_counter()
    code, out, err = cli(capsys, *args)
    assert code == 2
    assert_one_line_error(err, "train", *names)
    assert not (tmp_path / "run").exists(), "refused before the run folder was made"
    assert "model saved" not in out
    assert time.perf_counter() - t0 < 120  # no model load, no training (generous: shared CPUs)


def test_empty_recipe_is_an_error(capsys, tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing here\n")
    code, _, err = cli(capsys, "train", tmp_path / "empty.yaml", "--out", tmp_path / "run")
    assert code == 2
    assert_one_line_error(err, "train", "empty.yaml", "empty")


def test_recipe_without_data_train_is_an_error(capsys, tmp_path, tiny_model_dir):
    path = tmp_path / "nodata.yaml"
    path.write_text(f"# ctrltok train nodata.yaml\nmodel:\n  name: {tiny_model_dir}\ndata:\n  template: eot\n")
    code, out, err = cli(capsys, "train", path, "--out", tmp_path / "run")
    assert code == 2 and "model saved" not in out
    assert_one_line_error(err, "train", "nodata.yaml", "data.train is missing", "ctrltok:instructions",
                          "--set data.train=")
    assert not (tmp_path / "run").exists()


def test_folder_without_data_files_is_an_error(capsys, tmp_path, tiny_model_dir):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.md").write_text("not data\n")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, data=str(tmp_path / "data"))
    code, _, err = cli(capsys, "train", recipe, "--out", tmp_path / "run")
    assert code == 2
    assert_one_line_error(err, "train", "data.train", "no data files", str(tmp_path / "data"))
    code, _, err = cli(capsys, "render", "--model", tiny_model_dir, "--template", "default",
                       "--input", tmp_path / "data", "--out", tmp_path / "o.jsonl")
    assert code == 2
    assert_one_line_error(err, "render", "--input", "no data files")


# -- names checked before loading ------------------------------------------------------------------
@pytest.mark.parametrize("args,names", [
    (["generate", "--model", "nosuch/model", "--prompt", "hi"], ["--model", "nosuch/model", "HF_HUB_OFFLINE"]),
    (["generate", "--model", "./nosuch", "--prompt", "hi"], ["--model", "no such folder"]),
    (["eval", "--model", "not a model!"], ["--model", "not a local path"]),
    (["inspect", "."], ["not a checkpoint folder"]),
])
def test_unknown_names_are_one_line(capsys, tmp_path, monkeypatch, args, names):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, *args)
    assert code == 2
    assert_one_line_error(err, args[0], *names)


def test_unknown_template_is_one_line(capsys, tiny_model_dir):
    code, _, err = cli(capsys, "generate", "--model", tiny_model_dir, "--template", "chatlm", "--prompt", "hi")
    assert code == 2
    assert_one_line_error(err, "generate", "--template", "chatlm", "did you mean chatml")


def test_ctrl_c_in_chat_exits_quietly(capsys, tiny_model_dir, monkeypatch):
    import ctrltok.cli.generate as gen

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gen, "chat_loop", interrupted)
    code, _, err = cli(capsys, "chat", "--model", tiny_model_dir)
    assert code == 130
    assert "Traceback" not in err and "error" not in err
    from transformers.utils import logging as hf_logging

    assert not hf_logging.is_progress_bar_enabled()  # transformers' own bars are off inside commands


# -- chats: refused or counted ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def eot_dir(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eot") / "model"
    assert main(["add-tokens", "--model", str(tiny_model_dir), "--preset", "eot", "--out", str(out)]) == 0
    return out


def test_add_tokens_twice_is_one_line(capsys, eot_dir, tmp_path):
    code, _, err = cli(capsys, "add-tokens", "--model", eot_dir, "--preset", "eot", "--out", tmp_path / "again")
    assert code == 2
    assert_one_line_error(err, "add-tokens", "<EOT>", "--preset eot")
    assert "reuse=True" not in err


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("messages,template,names", [
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], "default",
     ["chats.jsonl:2", "empty assistant turn"]),
    ([{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"},
      {"role": "assistant", "content": "ok"}], "eot", ["chats.jsonl:2", "do not alternate", "messages[0]"]),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
      {"role": "system", "content": "be terse"}, {"role": "user", "content": "and?"},
      {"role": "assistant", "content": "ok"}], "eot", ["chats.jsonl:2", "system message after the first turn"]),
])
def test_chats_that_teach_the_wrong_thing_are_refused(capsys, eot_dir, tmp_path, messages, template, names):
    good = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello"}]}
    src = _jsonl(tmp_path / "chats.jsonl", [good, {"messages": messages}])
    code, _, err = cli(capsys, "render", "--model", eot_dir, "--template", template, "--input", src,
                       "--out", tmp_path / "o.jsonl")
    assert code == 2
    assert_one_line_error(err, "render", *names)
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "o.jsonl.tmp").exists()


def test_bad_chat_reasons_are_countable(eot_dir):
    from transformers import AutoTokenizer

    from ctrltok.core.chat import ChatEncoder, ChatError
    from ctrltok.core.conversation import to_conversation

    with pytest.raises(ChatError, match="an empty assistant turn;"):
        to_conversation({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}, "f:1")
    enc = ChatEncoder(AutoTokenizer.from_pretrained(eot_dir), "eot")
    assert not enc.role_marked and ChatEncoder(enc.tokenizer, "default").role_marked
    with pytest.raises(ChatError) as info:
        enc.check_turns([{"role": "assistant", "content": "a"}], "f:2")
    assert info.value.reason == "turns do not alternate user, assistant (template 'eot' has no role markers)"
    assert str(info.value).startswith(f"f:2: {info.value.reason}; messages[0] is 'assistant'")
    again = pickle.loads(pickle.dumps(info.value))  # whole across a process pool, reason included
    assert (again.where, again.reason, str(again)) == ("f:2", info.value.reason, str(info.value))


# -- render and generate: outputs ------------------------------------------------------------------
GOOD = {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]}


def test_render_input_error_leaves_an_existing_out_untouched(capsys, tiny_model_dir, tmp_path):
    src = _jsonl(tmp_path / "chats.jsonl", [GOOD] * 600 + [{"text": "no chat here"}])
    out = tmp_path / "ids.jsonl"
    out.write_text("precious\n")
    code, _, err = cli(capsys, "render", "--model", tiny_model_dir, "--template", "default", "--input", src, "--out", out)
    assert code == 2
    assert_one_line_error(err, "render", "chats.jsonl:601", "no conversation found")
    assert out.read_text() == "precious\n"
    assert not (tmp_path / "ids.jsonl.tmp").exists()
    code, _, err = cli(capsys, "render", "--model", tiny_model_dir, "--template", "default",
                       "--input", _jsonl(tmp_path / "ok.jsonl", [GOOD] * 3), "--out", out)
    assert code == 0 and len(out.read_text().splitlines()) == 3


def test_out_equal_to_input_is_refused(capsys, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = _jsonl(tmp_path / "chats.jsonl", [GOOD] * 3)
    before = src.read_bytes()
    for command, extra in (("render", ["--template", "default"]), ("generate", [])):
        code, _, err = cli(capsys, command, "--model", tiny_model_dir, *extra, "--input", src,
                           "--out", "./chats.jsonl")
        assert code == 2
        assert_one_line_error(err, command, "--out", "--input")
        assert src.read_bytes() == before


def test_generate_out_dash_is_stdout(capsys, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hi"}, GOOD])
    code, out, err = cli(capsys, "generate", "--model", tiny_model_dir, "--input", src, "--out", "-",
                         "--max-new-tokens", "2")
    assert code == 0, err
    lines = [json.loads(x) for x in out.splitlines()]
    assert len(lines) == 2 and lines[0]["prompt"] == "hi" and "output_ids" in lines[1]
    assert not (tmp_path / "-").exists()


def test_render_killed_leaves_no_partial_file(tiny_model_dir, tmp_path):
    """SIGKILL while render is writing: no OUT appears (an existing one keeps its bytes), at most OUT.tmp."""
    fifo = tmp_path / "chats.jsonl"
    os.mkfifo(fifo)
    out = tmp_path / "ids.jsonl"
    out.write_text("earlier output\n")
    env = {**os.environ, "CTRLTOK_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ctrltok", "render", "--model", str(tiny_model_dir),
                             "--template", "default", "--input", str(fifo), "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        fd, deadline = None, time.time() + 300
        while fd is None:  # open the writing end once render has opened its input (or give up)
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
                time.sleep(0.1)
        os.set_blocking(fd, True)
        with os.fdopen(fd, "w") as writer:
            writer.write("".join(json.dumps(GOOD) + "\n" for _ in range(2000)))
            writer.flush()
            tmp = tmp_path / "ids.jsonl.tmp"
            while not (tmp.exists() and tmp.stat().st_size > 0) and time.time() < deadline:
                time.sleep(0.1)
            assert tmp.exists() and tmp.stat().st_size > 0, "render never wrote"
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert out.read_text() == "earlier output\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ids")) == ["ids.jsonl", "ids.jsonl.tmp"]


# -- label: resume only over the same input --------------------------------------------------------
def test_label_resume_with_another_input_is_refused(capsys, tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"text": "A fine day."}] * 5 + [{"body": "no text field"}])
    b = _jsonl(tmp_path / "b.jsonl", [{"text": "Another corpus."}] * 5)
    out = tmp_path / "labelled.jsonl"
    code, _, err = cli(capsys, "label", "--input", a, "--out", out, "--threshold", "0.5")
    assert code == 2  # stopped on line 6, its run left unfinished in labelled.jsonl.parts
    line = assert_one_line_error(err, "label", "a.jsonl:6", "--text-field", "--on-error skip")
    assert "text_field=" not in line and "on_error=" not in line
    assert (tmp_path / "labelled.jsonl.parts" / "run.json").exists()
    code, _, err = cli(capsys, "label", "--input", b, "--out", out, "--threshold", "0.5")
    assert code == 2
    assert_one_line_error(err, "label", "a.jsonl", "unfinished")
    shutil.copy(b, a)  # the same path, other contents
    code, _, err = cli(capsys, "label", "--input", a, "--out", out, "--threshold", "0.5")
    assert code == 2
    assert_one_line_error(err, "label", "contents changed")
    assert not out.exists()


# -- train: a run tied to its settings -------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory, cache):
    """One tiny finished run through the CLI: (recipe, out, data file, stdout + stderr)."""
    d = tmp_path_factory.mktemp("run")
    data = d / "chats.jsonl"
    shutil.copy(resource_path("instructions"), data)
    recipe = write_recipe(d / "r.yaml", tiny_model_dir, data=str(data))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CTRLTOK_PROGRESS", "0")
        mp.setenv("CTRLTOK_CACHE", str(cache))
        from io import StringIO

        out_buf, err_buf = StringIO(), StringIO()
        mp.setattr(sys, "stdout", out_buf)
        mp.setattr(sys, "stderr", err_buf)
        code = main(["train", str(recipe), "--out", str(d / "out")])
    assert code == 0, err_buf.getvalue()[-3000:]
    return recipe, d / "out", data, out_buf.getvalue() + err_buf.getvalue()


def test_train_prints_truncation(trained):
    _, out, _, printed = trained
    assert "model saved in" in printed
    pack = RunManifest.read(out).summary["pack"]
    assert pack["truncated_examples"] > 0  # 48 tokens cut the shipped replies
    assert f"truncated {pack['truncated_examples']:,} training examples to data.max_length = 48" in printed


def test_rerun_into_a_finished_folder_trains_nothing(capsys, trained, cache, monkeypatch):
    recipe, out, _, _ = trained
    monkeypatch.setenv("CTRLTOK_CACHE", str(cache))
    weights = out / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    for extra in ([], ["--set", "train.log_every=5"]):  # log_every does not change what is trained
        code, stdout, err = cli(capsys, "train", recipe, "--out", out, *extra)
        assert code == 0, err
        assert "already trained, nothing to do" in stdout and "model saved" not in stdout
    assert weights.stat().st_mtime_ns == stamp


@pytest.mark.parametrize("sets,names", [
    (["train.lr=0.05"], ["train.lr", "0.001 -> 0.05", "new --out", "cannot change within a run"]),
    (["lora.enabled=true"], ["lora.enabled", "new --out"]),
    (["data.train=ctrltok:instructions"], ["data.train", "new --out"]),
    (["train.max_steps=5"], ["train.max_steps", "2 -> 5", "--resume-with-changes", "new --out"]),
])
def test_rerun_with_other_settings_is_refused(capsys, trained, cache, monkeypatch, sets, names):
    recipe, out, _, _ = trained
    monkeypatch.setenv("CTRLTOK_CACHE", str(cache))
    args = ["train", recipe, "--out", out]
    for s in sets:
        args += ["--set", s]
    code, stdout, err = cli(capsys, *args)
    assert code == 2
    assert_one_line_error(err, "train", str(out), *names)
    assert "model saved" not in stdout


def test_rerun_over_changed_data_is_refused(capsys, trained, cache, tmp_path, monkeypatch):
    """With the identity in the manifest (the trainer's final save records it), other contents at
    the same data path are refused."""
    recipe_path, out, data, _ = trained
    monkeypatch.setenv("CTRLTOK_CACHE", str(cache))
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    recipe = recipe_from_mapping(yaml.safe_load(recipe_path.read_text()), str(recipe_path))
    manifest = RunManifest.read(copy)
    manifest.values["run"] = run_identity(recipe).to_dict()
    manifest.write(copy, complete=True)
    code, stdout, _ = cli(capsys, "train", recipe_path, "--out", copy)
    assert code == 0 and "already trained" in stdout
    original = data.read_bytes()
    try:
        data.write_bytes(original + json.dumps(GOOD).encode() + b"\n")
        code, _, err = cli(capsys, "train", recipe_path, "--out", copy)
    finally:
        data.write_bytes(original)
    assert code == 2
    assert_one_line_error(err, "train", "data.train (contents)")


def _trainer_records_identity() -> bool:
    import inspect

    from ctrltok.training.train import train

    return "resume_with_changes" in inspect.signature(train).parameters


needs_identity = pytest.mark.skipif(not _trainer_records_identity(),
                                    reason="training/train.py does not record the run identity yet")


@needs_identity
def test_resume_with_changes_continues_and_checkpoints_record_the_run(capsys, tiny_model_dir, tmp_path, cache,
                                                                      monkeypatch):
    monkeypatch.setenv("CTRLTOK_CACHE", str(cache))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, max_steps=4, save_every=2)
    out = tmp_path / "run"
    code, _, err = cli(capsys, "train", recipe, "--out", out)
    assert code == 0, err
    manifest = RunManifest.read(out)
    state = json.loads((out / "checkpoints" / "step-000002" / "state.json").read_text())
    assert manifest.values["run"]["key"] == state["run"]["key"]
    code, _, err = cli(capsys, "train", recipe, "--out", out, "--set", "train.max_steps=6")
    assert code == 2
    assert_one_line_error(err, "train", "train.max_steps 4 -> 6", "--resume-with-changes")
    code, stdout, err = cli(capsys, "train", recipe, "--out", out, "--set", "train.max_steps=6", "--resume-with-changes")
    assert code == 0 and "model saved" in stdout, err
    assert RunManifest.read(out).summary["steps"] == 6 and RunManifest.read(out).complete
    code, _, err = cli(capsys, "train", recipe, "--out", out, "--set", "train.max_steps=3", "--resume-with-changes")
    assert code == 2
    assert_one_line_error(err, "train", "train.max_steps = 3", "below step")


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@needs_identity
def test_a_finished_run_continues_from_its_last_step_and_records_no_machine_path(capsys, tiny_model_dir, tmp_path,
                                                                                 monkeypatch):
    """4 steps (checkpoints every 3, and at the end), the run folder moved, then continued to 6 with
    --resume-with-changes: it resumes at step 4 (the first run's metrics kept as they were), its
    weights equal an uninterrupted 6-step run's exactly, the manifest says 6, and neither
    ctrltok.json, metrics.jsonl nor a checkpoint names a path of this machine."""
    monkeypatch.setenv("CTRLTOK_DATA_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "chats.jsonl"
    shutil.copy(resource_path("instructions"), data)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, data=str(data), max_steps=4, save_every=3,
                          scheduler="constant")  # one lr throughout: a 4 + 2 run can equal a 6-step one
    run = tmp_path / "run"
    code, _, err = cli(capsys, "train", recipe, "--out", run)
    assert code == 0, err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000003", "step-000004"]
    recorded = [run / "ctrltok.json", run / "metrics.jsonl", *sorted(run.glob("checkpoints/*/state.json"))]
    for path in recorded:
        text = path.read_text()
        for machine in (str(tmp_path), str(tiny_model_dir)):
            assert machine not in text, f"{path.name} names {machine}"
    manifest = RunManifest.read(run)
    assert manifest.values["recipe_values"]["data"]["train"] == "../chats.jsonl"
    assert os.path.samefile(manifest.recipe().data.train, data)  # read back as a path from here
    first = (run / "metrics.jsonl").read_text().splitlines()

    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(run, moved)
    code, stdout, err = cli(capsys, "train", recipe, "--out", moved)  # moved, the run is still this recipe's
    assert code == 0 and "already trained" in stdout, err
    code, stdout, err = cli(capsys, "train", recipe, "--out", moved, "--set", "train.max_steps=6",
                            "--resume-with-changes")
    assert code == 0 and "model saved" in stdout, err
    after = (moved / "metrics.jsonl").read_text().splitlines()
    assert after[:len(first)] == first, "the continued run did not resume at step 4"
    assert [json.loads(line)["step"] for line in after[len(first):] if "tokens_per_s" in line] == [5, 6]
    assert RunManifest.read(moved).summary["steps"] == 6

    straight = tmp_path / "straight"
    code, _, err = cli(capsys, "train", recipe, "--out", straight, "--set", "train.max_steps=6")
    assert code == 0, err
    a, b = _tensors(straight), _tensors(moved)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


# -- check_run on unfinished folders (what each checkpoint records) ---------------------------------
def _checkpoint(out: Path, step: int, identity: RunIdentity | None) -> None:
    folder = out / "checkpoints" / f"step-{step:06d}"
    folder.mkdir(parents=True)
    state = {"step": step, "recipe": "r"} | ({"run": identity.to_dict()} if identity else {})
    (folder / "state.json").write_text(json.dumps(state))


def test_check_run_on_an_unfinished_folder(tmp_path):
    recipe = recipe_from_mapping({"data": DATA, "train": {"max_steps": 10, "save_every": 2}}, "r.yaml")
    identity = run_identity(recipe)
    out = tmp_path / "run"
    assert check_run(out, recipe, identity) == "fresh"
    _checkpoint(out, 4, identity)
    assert check_run(out, recipe, identity) == "resume"

    longer = recipe_from_mapping({"data": DATA, "train": {"max_steps": 20, "save_every": 2}}, "r.yaml")
    with pytest.raises(RunError, match=r"stopped at step 4.*train.max_steps 10 -> 20.*--resume-with-changes"):
        check_run(out, longer, run_identity(longer))
    assert check_run(out, longer, run_identity(longer), resume_with_changes=True) == "resume"

    shorter = recipe_from_mapping({"data": DATA, "train": {"max_steps": 3, "save_every": 2}}, "r.yaml")
    with pytest.raises(RunError, match=r"train.max_steps = 3 is below step 4"):
        check_run(out, shorter, run_identity(shorter), resume_with_changes=True)

    other = recipe_from_mapping({"data": DATA, "train": {"max_steps": 10, "save_every": 2, "lr": 0.05}}, "r.yaml")
    with pytest.raises(RunError, match=r"train.lr .*cannot change within a run"):
        check_run(out, other, run_identity(other), resume_with_changes=True)


def test_identity_ignores_what_does_not_change_training():
    a = recipe_from_mapping({"train": {"log_every": 1, "report_to": []}, "data": {**DATA, "workers": 1}}, "a.yaml")
    b = recipe_from_mapping({"name": "other", "train": {"log_every": 9, "report_to": ["tensorboard"],
                                                        "compile": True}, "data": {**DATA, "workers": 4}}, "b.yaml")
    assert run_identity(a).key == run_identity(b).key
    old = RunIdentity.of({k: v for k, v in recipe_values(a).items() if k != "model.liger"}, None)
    assert run_identity(a).differences(old) == []  # a field added later reads as its default


def test_recorded_paths_are_relative_to_the_run_and_compared_by_content(tmp_path, monkeypatch):
    """What a run records names no machine path; the recorded identity still matches the same file
    named another way (from another directory), and an edit of the file in place is a difference."""
    from ctrltok.training.checkpoint import portable_run

    data = tmp_path / "d" / "chats.jsonl"
    data.parent.mkdir()
    shutil.copy(resource_path("instructions"), data)
    recipe = recipe_from_mapping({"data": {"train": str(data)}, "model": {"name": "smollm2-135m"}}, "r.yaml")
    written = portable_run(run_identity(recipe).to_dict(), tmp_path / "runs" / "x")
    assert written["values"]["data.train"] == written["inputs"]["data.train"]["path"] == "../../d/chats.jsonl"
    assert written["values"]["model.name"] == "smollm2-135m"  # an alias is not a path
    assert str(tmp_path) not in json.dumps(written)
    monkeypatch.chdir(data.parent)
    same = recipe_from_mapping({"data": {"train": "chats.jsonl"}, "model": {"name": "smollm2-135m"}}, "r.yaml")
    assert run_identity(same).differences(RunIdentity.from_dict(written)) == []
    data.write_bytes(data.read_bytes().replace(b"a", b"b", 1))
    diff = run_identity(same).differences(RunIdentity.from_dict(written))
    assert [d[0] for d in diff] == ["data.train (contents)"]


# -- LoRA on every linear layer ----------------------------------------------------------------------
def test_lora_all_linear_and_a_typo(tiny_model_dir):
    from ctrltok.training.setup import apply_lora, prepare_model

    base = {"model": {"name": str(tiny_model_dir)}, "tokens": {"presets": ["eot"]},
            "data": {**DATA, "template": "eot"}, "lora": {"enabled": True, "target_modules": "all-linear"}}
    recipe = recipe_from_mapping(base, "r.yaml")
    prepared = prepare_model(recipe)
    peft_model = apply_lora(prepared.model, recipe, prepared.surgery)
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in peft_model.named_parameters() if ".lora_A" in n}
    assert {"q_proj", "v_proj", "gate_proj", "down_proj"} <= adapted
    typo = recipe_from_mapping({**base, "lora": {"enabled": True, "target_modules": ["q_proj", "vproj"]}}, "r.yaml")
    prepared = prepare_model(typo)
    with pytest.raises(ConfigError, match=r"lora.target_modules: \['vproj'\].*v_proj"):
        apply_lora(prepared.model, typo, prepared.surgery)
