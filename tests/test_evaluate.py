"""Evaluation: packed held-out loss == a per-conversation hand computation, in the run's rows;
stop-rate counting; `ctrltok eval`'s command layer (loading, the held-out split, dispatch by kind)."""

from __future__ import annotations

import io
import json
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from conftest import SMOL_TOKENIZER, make_tiny_llama

from ctrltok.cli.eval import eval_chat, eval_kind, print_comparison, write_json
from ctrltok.core.chat import encode_chat
from ctrltok.core.config import DataConfig
from ctrltok.core.example import IGNORE, Example
from ctrltok.core.templates import install_templates
from ctrltok.core.tokens import add_tokens, apply_generation_config, resolve_tokens
from ctrltok.evaluation.evaluate import (
    compare,
    evaluate_model,
    generation_prompts,
    heldout_conversations,
    heldout_loss,
    stop_counts,
)
from ctrltok.training.checkpoint import RunManifest

CONVS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Two plus two?"},
     {"role": "assistant", "content": "Four."}, {"role": "user", "content": "And times three?"},
     {"role": "assistant", "content": "Twelve, if you mean four times three."}],
    [{"role": "user", "content": "Say <EOT> please"}, {"role": "assistant", "content": "You typed <EOT> as text."}],
    [{"role": "user", "content": "No reply yet"}],
]


@pytest.fixture(scope="module")
def eot_model():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SMOL_TOKENIZER)
    tok.pad_token = tok.eos_token
    model = make_tiny_llama(len(tok))
    surgery = add_tokens(model, tok, resolve_tokens(["eot"]), pad_to_multiple_of=64)
    apply_generation_config(model, surgery, surgery.ids["<EOT>"])
    install_templates(tok)
    return model, tok, surgery


@contextmanager
def boosted(model, ids: list[int], amount: float = 1e4):
    def hook(_module, _inputs, output):
        output = output.clone()
        output[..., ids] += amount
        return output

    handle = model.get_output_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _hand_loss(model, tok, convs, template, loss_on="assistant"):
    """Each conversation alone, full logits, shift by hand: sum CE over supervised targets / count."""
    total, n = 0.0, 0
    with torch.no_grad():
        for conv in convs:
            ex = encode_chat(conv, tok, template, loss_on)
            logits = model(torch.tensor([ex.input_ids])).logits[0, :-1]
            labels = torch.tensor(ex.labels[1:])
            keep = labels != IGNORE
            if keep.any():
                total += float(F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum"))
                n += int(keep.sum())
    return total / n, n


@pytest.mark.parametrize("template,loss_on", [("eot", "assistant"), ("default", "assistant"), ("eot", "all")])
def test_eval_loss_equals_hand_computation(eot_model, template, loss_on):
    model, tok, _ = eot_model
    got = evaluate_model(model, tok, CONVS, template, n_generate=0, loss_on=loss_on, data=DataConfig(max_length=256))
    want, n = _hand_loss(model, tok, CONVS, template, loss_on)
    assert got["eval_targets"] == n
    assert got["eval_loss"] == pytest.approx(want, abs=1e-5)
    assert got["skipped_no_targets"] == (1 if loss_on == "assistant" else 0)  # the conversation with no reply
    assert got["truncated_tokens"] == 0


def test_eval_loss_packs_several_conversations_per_row(eot_model):
    """Packing is what is being checked: the conversations share one row, and the result is unchanged."""
    model, tok, _ = eot_model
    from ctrltok.core.packing import pack

    examples = [encode_chat(c, tok, "eot") for c in CONVS[:3]]
    assert len(pack(examples, 256).rows) == 1
    one_row = evaluate_model(model, tok, CONVS[:3], "eot", n_generate=0, data=DataConfig(max_length=256))
    each_alone = evaluate_model(model, tok, CONVS[:3], "eot", n_generate=0, rows_per_batch=1, examples=examples,
                                data=DataConfig(max_length=256, packing=False))
    assert one_row["eval_loss"] == pytest.approx(_hand_loss(model, tok, CONVS[:3], "eot")[0], abs=1e-5)
    assert one_row["eval_loss"] == pytest.approx(each_alone["eval_loss"], abs=1e-5)  # float32 sums in another order


def test_truncation_is_counted(eot_model):
    model, tok, _ = eot_model
    got = evaluate_model(model, tok, CONVS[1:2], "default", n_generate=0, data=DataConfig(max_length=20))
    assert got["truncated_examples"] == 1 and got["truncated_tokens"] > 0
    assert got["max_length"] == 20 and got["overlong"] == "truncate"


def test_the_runs_overlong_rule_applies(eot_model):
    """Not a fixed truncation: the run's data.overlong decides (split keeps every target, error refuses)."""
    model, tok, _ = eot_model
    whole = evaluate_model(model, tok, CONVS[1:2], "default", n_generate=0, data=DataConfig(max_length=256))
    split = evaluate_model(model, tok, CONVS[1:2], "default", n_generate=0,
                           data=DataConfig(max_length=20, overlong="split"))
    assert split["truncated_examples"] == 0 and split["split_examples"] == 1
    assert 0 < split["eval_targets"] <= whole["eval_targets"]
    with pytest.raises(ValueError, match="max_length"):
        evaluate_model(model, tok, CONVS[1:2], "default", n_generate=0, data=DataConfig(max_length=20, overlong="error"))


def test_generation_prompts():
    prompts = generation_prompts(CONVS, 10)
    assert [i for i, _ in prompts] == [0, 1, 2]  # the last conversation has no reply to compare with
    assert prompts[1][1] == CONVS[1][:4]  # everything before the last assistant turn
    assert generation_prompts(CONVS, 2) == prompts[:2]


def test_stop_counts():
    eot = 7
    results = [{"ids": [1, 2, eot], "stopped": True, "n_tokens": 3},
               {"ids": [1, 9], "stopped": True, "n_tokens": 2},  # another stop id (e.g. the base EOS)
               {"ids": [1, 1, 1, 1], "stopped": False, "n_tokens": 4},
               {"ids": [eot], "stopped": True, "n_tokens": 1}]
    c = stop_counts(results, eot)
    assert (c["n_generated"], c["eot_stops"], c["any_stops"]) == (4, 2, 3)
    assert c["eot_stop_rate"] == 0.5 and c["any_stop_rate"] == 0.75 and c["mean_new_tokens"] == 2.5
    assert stop_counts([], eot)["eot_stop_rate"] is None


def test_stop_rate_on_a_model(eot_model):
    model, tok, surgery = eot_model
    eot = surgery.ids["<EOT>"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    with boosted(model, [eot]):
        always = evaluate_model(model, tok, CONVS, "eot", n_generate=2, max_new_tokens=4)
    assert always["n_generated"] == 2 and always["eot_stop_rate"] == 1.0 and always["mean_new_tokens"] == 1
    assert all(g["ended_with_eot"] and g["text"] == "" for g in always["generations"])
    with boosted(model, [im_end]):  # stops, but at the base EOS: not an end-of-turn stop
        other = evaluate_model(model, tok, CONVS, "eot", n_generate=3, max_new_tokens=4)
    assert other["n_generated"] == 3 and other["eot_stop_rate"] == 0.0 and other["any_stop_rate"] == 1.0
    with boosted(model, [eot, im_end], amount=-1e4):
        never = evaluate_model(model, tok, CONVS, "eot", n_generate=3, max_new_tokens=3)
    assert never["eot_stop_rate"] == 0.0 and never["any_stop_rate"] == 0.0 and never["mean_new_tokens"] == 3


def test_template_token_missing_is_a_clear_error(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SMOL_TOKENIZER)
    model = tiny_llama(len(tok))
    with pytest.raises(ValueError, match=r"<EOT>.*preset"):
        evaluate_model(model, tok, CONVS, "eot", n_generate=0)


def test_compare_and_table(tmp_path):
    before = {"eval_loss": 3.0, "eot_stop_rate": 0.0, "n_generated": 4, "template": "eot", "generations": [
        {"prompt": "hi", "text": "rambling", "stopped": False, "ended_with_eot": False, "n_tokens": 8}]}
    after = {"eval_loss": 1.5, "eot_stop_rate": 0.75, "n_generated": 4, "template": "eot", "generations": [
        {"prompt": "hi", "text": "Hello!", "stopped": True, "ended_with_eot": True, "n_tokens": 3}]}
    c = compare(before, after)
    assert c["eval_loss"] == {"before": 3.0, "after": 1.5, "delta": -1.5}
    assert c["eot_stop_rate"]["delta"] == 0.75 and c["n_generated"]["delta"] == 0
    assert "template" not in c and "generations" not in c
    from rich.console import Console

    buf = io.StringIO()
    print_comparison(before, after, Console(file=buf, width=120), samples=1)
    text = buf.getvalue()
    assert "eval_loss" in text and "-1.5000" in text and "better" in text and "Hello!" in text
    path = write_json({"before": before, "after": after, "comparison": c}, tmp_path / "r" / "eval.json")
    assert json.loads(path.read_text())["comparison"]["eval_loss"]["after"] == 1.5


def _quiet():
    from rich.console import Console

    return Console(file=io.StringIO())


def test_evaluate_a_checkpoint_folder(eot_model, tmp_path):
    model, tok, surgery = eot_model
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    (tmp_path / "ctrltok.json").write_text(json.dumps({**surgery.manifest(), "template": "eot"}))
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVS[:3])
                    + json.dumps({"prompt": "Alpaca style?", "response": "Also read."}) + "\n")
    got = eval_chat(tmp_path, str(data), n_generate=2, max_new_tokens=3, limit=3, console=_quiet())
    assert got["template"] == "eot" and got["conversations"] == 3 and got["n_generated"] == 2
    assert got["max_length"] == DataConfig().max_length  # no recipe in the manifest: DataConfig's defaults
    direct = evaluate_model(model, tok, CONVS[:3], "eot", n_generate=0)
    assert got["eval_loss"] == pytest.approx(direct["eval_loss"], abs=1e-6)
    assert eval_chat(tmp_path, str(data), n_generate=0, console=_quiet())["conversations"] == 4


def test_heldout_split_is_the_trainers(smol_tokenizer, tmp_path):
    """Without --data, eval uses exactly the records training.data.build_examples held out of training."""
    from dataclasses import asdict

    from ctrltok.core.config import Recipe
    from ctrltok.data.encode import build_examples, heldout_indices

    recipe = Recipe(name="split")
    recipe.train.seed = 7
    recipe.data.eval_fraction = 0.2
    recipe.data.limit = 60
    (tmp_path / "ctrltok.json").write_text(json.dumps({"recipe_values": asdict(recipe)}))
    manifest = RunManifest.read(tmp_path)
    convs, wheres, described = heldout_conversations(manifest)
    encoded = build_examples(recipe, smol_tokenizer)
    assert sorted(wheres) == sorted(ex.source for ex in encoded.eval)
    assert len(convs) == len(heldout_indices(60, 0.2, 7)) > 0
    assert "held-out 0.2" in described
    assert len(heldout_conversations(manifest, limit=5)[0]) == 5


def _checkpoint(model, tok, surgery, path, recipe_values=None):
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "ctrltok.json").write_text(json.dumps({**surgery.manifest(), "template": "eot",
                                                   **({"recipe_values": recipe_values} if recipe_values else {})}))
    return path


def test_evaluate_cli_prints_a_table_and_returns_json(eot_model, tmp_path):
    from rich.console import Console

    model, tok, surgery = eot_model
    ckpt = _checkpoint(model, tok, surgery, tmp_path / "ckpt")
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVS))
    buf = io.StringIO()
    got = eval_chat(ckpt, str(data), n_generate=1, max_new_tokens=2, console=Console(file=buf, width=150))
    assert got["template"] == "eot" and got["n_generated"] == 1
    assert "eval_loss" in buf.getvalue() and "eot_stop_rate" in buf.getvalue()
    json.dumps(got)  # serialisable as it is


@pytest.mark.slow
def test_evaluate_cli_before_and_after(eot_model, tmp_path):
    """--before: a base checkpoint without <EOT> is given the run's tokens by training.setup.prepare_model."""
    from dataclasses import asdict

    from rich.console import Console

    from ctrltok.core.config import Recipe

    model, tok, surgery = eot_model
    recipe = Recipe(name="eot-test")
    recipe.tokens.presets = ["eot"]
    recipe.data.template = "eot"
    ckpt = _checkpoint(model, tok, surgery, tmp_path / "ckpt", asdict(recipe))
    base_tok = type(tok).from_pretrained(SMOL_TOKENIZER)
    make_tiny_llama(len(base_tok), seed=1).save_pretrained(tmp_path / "base")
    base_tok.save_pretrained(tmp_path / "base")
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVS))
    buf = io.StringIO()
    got = eval_chat(ckpt, str(data), before=tmp_path / "base", n_generate=2, max_new_tokens=2,
                       console=Console(file=buf, width=150))
    assert set(got) == {"before", "after", "comparison"}
    assert got["before"]["eval_targets"] == got["after"]["eval_targets"] > 0  # same tokens, same targets
    assert got["before"]["eval_loss"] != got["after"]["eval_loss"]  # different weights
    assert "before vs after" in buf.getvalue()


def test_the_loss_uses_the_runs_max_length(eot_model, tmp_path):
    """The rows of `ctrltok eval`'s loss follow the recipe in ctrltok.json, not a fixed length."""
    from dataclasses import asdict

    from ctrltok.core.config import Recipe

    model, tok, surgery = eot_model
    recipe = Recipe(name="short")
    recipe.data.template = "eot"
    recipe.data.max_length = 20
    ckpt = _checkpoint(model, tok, surgery, tmp_path / "ckpt", asdict(recipe))
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVS))
    got = eval_chat(ckpt, str(data), n_generate=0, console=_quiet())
    assert got["max_length"] == 20 and got["truncated_examples"] > 0
    want = evaluate_model(model, tok, CONVS, "eot", n_generate=0, data=DataConfig(max_length=20))
    assert got["eval_loss"] == pytest.approx(want["eval_loss"], abs=1e-6)


@pytest.mark.parametrize("kind,flags,want", [
    ("chat", {}, "chat"), ("epe", {}, "epe"), ("labelled", {}, "labelled"), (None, {}, "chat"),
    ("chat", {"epe": True}, "epe"), ("epe", {"conditional": True}, "labelled"),
])
def test_eval_dispatches_on_the_recipe_kind(tmp_path, kind, flags, want):
    from dataclasses import asdict

    from ctrltok.core.config import EpeConfig, Recipe

    values = {}
    if kind is not None:
        recipe = Recipe(name=kind, epe=EpeConfig(sidecar="notes.jsonl") if kind == "epe" else None)
        recipe.data.kind = kind
        values["recipe_values"] = asdict(recipe)
    (tmp_path / "ctrltok.json").write_text(json.dumps(values))
    assert eval_kind(tmp_path, **flags) == want
    with pytest.raises(ValueError, match="exclude"):
        eval_kind(tmp_path, epe=True, conditional=True)


# -- the report of each kind: role tokens, caps, the batched backend, JSON alone on stdout -----
def _strict_json(text: str):
    """json.loads that refuses NaN / Infinity (not JSON, though Python writes them)."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_role_tokens_are_counted_and_never_forged(eot_model):
    from ctrltok.evaluation.evaluate import control_spellings, forged_tokens

    model, tok, _ = eot_model
    got = evaluate_model(model, tok, CONVS, "eot", n_generate=3, max_new_tokens=2)["role_tokens"]
    # CONVS[2]: the user and the assistant both type <EOT>; its prompt (the user turn) is generated for.
    assert got["spelled_in_messages"] == 2 and got["spellings"] == {"<EOT>": 2}
    assert got["spelled_in_prompts"] == 1
    assert got["forged_in_training"] == 0 and got["forged_in_prompts"] == 0
    # The count can fail: a rendered string tokenized afterwards turns both spellings into the id.
    spellings = control_spellings(tok)
    assert "<EOT>" in spellings and not any(s.startswith("<|ctrltok_filler") for s in spellings)
    unsafe = forged_tokens(CONVS, lambda c: tok(tok.apply_chat_template(c, tokenize=False, chat_template="eot"),
                                                add_special_tokens=False)["input_ids"], spellings)
    assert unsafe == {"spelled": 2, "forged": 2, "by_token": {"<EOT>": 2}}


def test_replies_come_from_one_batched_call(eot_model):
    """The stop rate's prompts go through `ctrltok generate`'s function, batched with a shared
    prefix: one model.generate call for all of them (batch 32), the same greedy replies and stops
    as one prompt at a time."""
    from ctrltok.core.config import DecodingConfig
    from ctrltok.generation.generate import generate

    model, tok, _ = eot_model
    calls = []
    original = model.generate

    def spy(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    model.generate = spy
    try:
        got = evaluate_model(model, tok, CONVS, "eot", n_generate=3, decoding=DecodingConfig(max_new_tokens=4))
    finally:
        del model.generate
    assert calls == [3]
    prompts = generation_prompts(CONVS, 3)
    alone = [generate(model, tok, [p], "eot", max_new_tokens=4, temperature=0)[0] for _, p in prompts]
    assert [g["text"] for g in got["generations"]] == [a["text"] for a in alone]
    assert [g["n_tokens"] for g in got["generations"]] == [a["n_tokens"] for a in alone]
    assert [g["stopped"] for g in got["generations"]] == [a["stopped"] for a in alone]
    assert got["decoding"]["max_new_tokens"] == got["max_new_tokens"] == 4


def test_to_json_is_strict():
    from ctrltok.cli.eval import to_json

    text = to_json({"a": float("nan"), "table": "printed", "b": [1.5, float("inf")], "c": {"d": None, "table": 1}})
    assert _strict_json(text) == {"a": None, "b": [1.5, None], "c": {"d": None, "table": 1}}  # only the printed one


def test_chat_eval_json_alone_on_stdout_with_its_caps(eot_model, tmp_path, capfd):
    from dataclasses import asdict

    from ctrltok.cli.main import main
    from ctrltok.core.config import Recipe

    model, tok, surgery = eot_model
    recipe = Recipe(name="chat")
    recipe.data.template = "eot"
    recipe.data.max_length = 24
    recipe.data.overlong = "truncate"
    ckpt = _checkpoint(model, tok, surgery, tmp_path / "ckpt", asdict(recipe))
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVS))
    capfd.readouterr()  # the first save_pretrained of a process imports DeepSpeed, which prints to stdout
    assert main(["eval", "--model", str(ckpt), "--data", str(data), "--json", "--max-prompts", "2",
                 "--max-new-tokens", "2", "--max-conversations", "3"]) == 0
    out, err = capfd.readouterr()
    got = _strict_json(out)
    assert got["caps"]["max_prompts"] == 2 and got["n_generated"] == 2 and got["conversations"] == 3
    assert got["caps"]["max_length"] == got["max_length"] == 24 and got["caps"]["overlong"] == "truncate"
    assert got["role_tokens"]["forged_in_training"] == 0
    assert "--max-prompts 2" in err and "max_length 24" in err and "role tokens" in err and "eval_loss" in err
    assert main(["eval", "--model", str(ckpt), "--data", str(data), "--json", "--max-prompts", "0"]) == 0
    got = _strict_json(capfd.readouterr()[0])  # the loss and role-token counts alone, nothing generated
    assert got["n_generated"] == 0 and got["eval_targets"] > 0 and got["role_tokens"]["forged_in_training"] == 0


@pytest.fixture(scope="module")
def conditional_checkpoint(tmp_path_factory):
    from dataclasses import asdict

    from transformers import AutoTokenizer

    from ctrltok.core.config import ConditionalConfig, Recipe

    tok = AutoTokenizer.from_pretrained(SMOL_TOKENIZER)
    tok.pad_token = tok.eos_token
    model = make_tiny_llama(len(tok))
    surgery = add_tokens(model, tok, resolve_tokens(["conditional"]))
    apply_generation_config(model, surgery)
    recipe = Recipe(name="cond", conditional=ConditionalConfig(threshold=0.5))
    recipe.data.kind = "labelled"
    out = tmp_path_factory.mktemp("cond")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "ctrltok.json").write_text(json.dumps({**surgery.manifest(), "recipe_values": asdict(recipe)}))
    return out


def test_conditional_eval_json_alone_on_stdout_with_its_caps(conditional_checkpoint, tmp_path, capfd):
    from ctrltok.cli.main import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": {"text": f"Prompt number {i} says"}}) + "\n" for i in range(5)))
    capfd.readouterr()  # what saving the checkpoint printed
    assert main(["eval", "--model", str(conditional_checkpoint), "--data", str(prompts), "--json",
                 "--max-prompts", "3", "--samples", "2", "--max-new-tokens", "2"]) == 0
    out, err = capfd.readouterr()
    got = _strict_json(out)
    assert "table" not in got and got["threshold"] == 0.5  # the run's threshold, from its recipe
    assert got["caps"]["prompts"].startswith("3 of 5 prompts") and got["caps"]["samples"] == 2
    for cond in ("unconditional", "aligned", "misaligned"):
        assert got["conditions"][cond]["all"]["samples"] == (3 + 1) * 2  # the prompts and the empty one
    assert set(got["direction"]) == {"aligned<unconditional", "unconditional<misaligned"}
    assert got["leaked_total"] == 0
    assert "3 of 5 prompts" in err and "--samples" in err and "direction aligned < unconditional < misaligned" in err
    assert main(["eval", "--model", str(conditional_checkpoint), "--greedy", "--json"]) == 2  # samples need sampling
    assert "needs sampling" in capfd.readouterr().err


def test_backtranslation_eval_reports_stages_and_ablation(eot_model, tmp_path, capfd):
    from dataclasses import asdict

    from ctrltok.cli.main import main
    from ctrltok.core.config import BacktranslateConfig, Recipe

    model, tok, surgery = eot_model
    run = tmp_path / "bt"
    run.mkdir()
    recipe = Recipe(name="bt-model-1", backtranslate=BacktranslateConfig())
    recipe.data.template = "eot"
    _checkpoint(model, tok, surgery, run / "model-1", asdict(recipe))
    stages = [{"stage": "segments", "in": 4, "kept": 3, "dropped": {"too_short": 1}, "complete": True},
              {"stage": "curated-1", "in": 3, "kept": 2, "dropped": {"unparsed": 1}, "complete": True}]
    report = {"out_dir": str(run), "gold_pairs": 2, "stages": stages, "keep_score": 4, "score_aggregate": "median",
              "training": {"backward": {"model": str(run / "backward"), "examples": 2},
                           "model-1": {"model": str(run / "model-1"), "examples": 4}},
              "curation": {"curated-1": {"samples": 3, "parsed": 2, "unparsed": 1, "out_of_range": 0,
                                         "parse_failure_rate": 0.3333, "out_of_range_rate": 0.0,
                                         "histogram": {s: 0 for s in range(1, 6)}},
                           "curated-2": {"samples": 0, "unparsed": 0, "keep_threshold": 0.25,
                                         "histogram": {s: 0 for s in range(1, 6)},
                                         "pmi": {"pairs": 2, "min": 0.1, "median": 0.3, "max": 0.5}}},
              "samples": {"kept": [], "dropped": []}, "models": {}}
    (run / "report.json").write_text(json.dumps(report))
    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVS[:3]))
    assert eval_kind(run) == "backtranslate"
    assert eval_kind(run / "model-1") == "chat"  # a model in the folder is evaluated as itself
    capfd.readouterr()  # what saving the checkpoint printed
    assert main(["eval", "--model", str(run), "--data", str(data), "--json"]) == 0
    out, err = capfd.readouterr()
    got = _strict_json(out)
    assert got["kind"] == "backtranslate" and got["stages"] == stages
    assert got["curation"]["curated-1"]["parse_failure_rate"] == 0.3333
    assert got["curation"]["curated-2"]["pmi"] == report["curation"]["curated-2"]["pmi"]  # under its scoring's name
    assert set(got["ablation"]["models"]) == {"model-1"}  # the backward model answers another task
    direct = evaluate_model(model, tok, CONVS[:3], "eot", n_generate=0, data=recipe.data)
    assert got["ablation"]["models"]["model-1"]["eval_loss"] == pytest.approx(direct["eval_loss"], abs=1e-6)
    assert "curated-1" in err and "ablation" in err
    # The model alone, with the chat flags honoured (not the folder's report again).
    assert main(["eval", "--model", str(run / "model-1"), "--data", str(data), "--json", "--max-prompts", "1",
                 "--max-new-tokens", "2"]) == 0
    got = _strict_json(capfd.readouterr().out)
    assert "stages" not in got and got["model"] == str(run / "model-1")
    assert got["caps"]["max_prompts"] == 1 and got["n_generated"] == 1
    assert got["eval_loss"] == pytest.approx(direct["eval_loss"], abs=1e-6)


def test_heldout_loss_counts_every_document_of_a_chunked_row_with_or_without_packing():
    """``overlong: chunk`` lays documents end to end whatever ``packing`` says: rows hold several
    documents either way, so the loss must see all of them (it once padded only each row's first)."""
    torch.manual_seed(0)
    model = make_tiny_llama(300)
    examples = [Example(input_ids=ids, labels=list(ids), source=f"d{i}")
                for i, ids in enumerate(torch.randint(3, 300, (5, 40)).tolist())]
    packed = heldout_loss(model, examples, 0, DataConfig(kind="text", overlong="chunk", max_length=64, packing=True))
    unpacked = heldout_loss(model, examples, 0, DataConfig(kind="text", overlong="chunk", max_length=64, packing=False))
    assert unpacked == packed
