"""What a run shares: the LoRA adapter beside the merged model (loadable with PEFT on the base with the
tokens added, same logits as the merged model), or alone (`save.merged: false`: the folder still
generates and evaluates, loaded onto its base), TensorBoard through accelerate, `lora.target_modules:
all-linear` end to end. W&B and trackio: test_trackers.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from ctrltok.cli.main import main
from ctrltok.core.config import ConfigError, recipe_from_mapping
from ctrltok.core.models import adapter_base, adapter_only, load_model
from ctrltok.evaluation.doctor import inspect_checkpoint
from ctrltok.generation.generate import generate, load_for_generation
from ctrltok.training import train as train_module
from ctrltok.training.publish import upload_files
from ctrltok.training.setup import prepare_model
from ctrltok.training.train import ADAPTER, train

PROBE = torch.tensor([[1, 5, 9, 49152, 20, 7]])  # includes the new <EOT> row the adapter trained
CHATS = [[{"role": "user", "content": "Name a colour."}], [{"role": "user", "content": "Say hi <EOT> twice."}]]


def _mapping(model, targets=("q_proj", "v_proj"), save=None, **train):
    return {"model": {"name": str(model)}, "tokens": {"presets": ["eot"]},
            "data": {"train": "ctrltok:instructions", "template": "eot", "max_length": 128, "limit": 24},
            "lora": {"enabled": True, "r": 4, "alpha": 8,
                     "target_modules": targets if isinstance(targets, str) else list(targets)},
            "save": save or {},
            "train": {"max_steps": 2, "lr": 1e-2, "micro_batch_size": 2, **train}}


@pytest.fixture(scope="module")
def all_linear_runs(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """Two identical LoRA runs on every linear layer: one saves the merged weights and the adapter,
    the other the adapter alone."""
    root = tmp_path_factory.mktemp("all-linear")
    runs = {"merged": root / "merged", "adapter": root / "adapter-only"}
    train(recipe_from_mapping(_mapping(tiny_model_dir, "all-linear")), runs["merged"], progress=False)
    train(recipe_from_mapping(_mapping(tiny_model_dir, "all-linear", save={"merged": False})), runs["adapter"],
          progress=False)
    return runs


@pytest.mark.slow
def test_lora_adapter_is_saved_beside_the_merged_model_and_tensorboard_logs(tmp_path, tiny_model_dir):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    recipe = recipe_from_mapping(_mapping(tiny_model_dir, report_to=["tensorboard"]))
    train(recipe, out, progress=False)
    assert (out / ADAPTER / "adapter_config.json").is_file() and (out / ADAPTER / "adapter_model.safetensors").is_file()
    assert list(out.rglob("events.out.tfevents.*")), "TensorBoard wrote no event file"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / recipe.name))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("loss")}
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == pytest.approx({r["step"]: r["loss"] for r in lines if "loss" in r})  # metrics.jsonl's values
    assert [e.step for e in events.Scalars("eval_loss")] == [0, 2]  # where the held-out loss was measured
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    base = prepare_model(recipe_from_mapping(_mapping(tiny_model_dir))).model  # the base with the tokens added
    adapted = PeftModel.from_pretrained(base, out / ADAPTER).eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=PROBE).logits, merged(input_ids=PROBE).logits, atol=1e-4,
                                   rtol=1e-4)
    # its base by the recipe's name (a local folder: its absolute path); PEFT's blank card (with that path) is gone
    assert adapter_base(out) == str(Path(tiny_model_dir).resolve()) and not (out / ADAPTER / "README.md").exists()


def _cli_json(argv: list[str], capsys) -> dict:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_an_adapter_only_folder_generates_and_evaluates_like_the_merged_one(all_linear_runs, capsys):
    merged_dir, alone = all_linear_runs["merged"], all_linear_runs["adapter"]
    assert not (alone / "config.json").exists() and not list(alone.glob("*.safetensors")), "merged weights saved"
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "tokenizer.json",
                 "chat_template.jinja", "generation_config.json", "ctrltok.json", "README.md"):
        assert (alone / name).is_file(), name
    assert adapter_only(alone) and not adapter_only(merged_dir)
    # `ctrltok inspect`: the adapter's embedding stands for the model's rows, and nothing is amiss
    report, merged_report = inspect_checkpoint(alone), inspect_checkpoint(merged_dir)
    assert report.model_rows == merged_report.model_rows == report.tokenizer_length
    assert not report.problems, report.problems
    # all-linear: the MLP's linear layers carry LoRA factors too, in both runs' adapters
    for run in (merged_dir, alone):
        config = json.loads((run / ADAPTER / "adapter_config.json").read_text())
        targets = {name.rsplit(".", 1)[-1] for name in config["target_modules"]}  # PEFT saves the resolved names
        assert {"q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"} <= targets

    (m1, _), (m2, _) = load_model(merged_dir), load_model(alone)  # the second: base + resize + adapter, merged
    with torch.no_grad():
        torch.testing.assert_close(m2(input_ids=PROBE).logits, m1(input_ids=PROBE).logits, atol=1e-5, rtol=1e-5)
    assert m2.generation_config.eos_token_id == m1.generation_config.eos_token_id
    assert m2.generation_config.suppress_tokens == m1.generation_config.suppress_tokens
    replies = []
    for run in (merged_dir, alone):
        model, tokenizer, template = load_for_generation(run)
        assert template == "eot"
        replies.append([r["ids"] for r in generate(model, tokenizer, CHATS, template, max_new_tokens=12)])
    assert replies[0] == replies[1] and all(replies[0])  # the same greedy tokens

    # the commands read it like the merged folder: ctrltok eval and ctrltok generate
    argv = ["eval", "--max-prompts", "2", "--max-new-tokens", "6", "--json", "--model"]
    after, before = _cli_json(argv + [str(alone)], capsys), _cli_json(argv + [str(merged_dir)], capsys)
    assert after["eval_loss"] == pytest.approx(before["eval_loss"], rel=1e-6)
    assert [g["text"] for g in after["generations"]] == [g["text"] for g in before["generations"]]
    assert main(["generate", "--model", str(alone), "--prompt", "Hi", "--max-new-tokens", "4"]) == 0

    card = (alone / "README.md").read_text()
    assert "no merged weights" in card and "## LoRA adapter" in card and "not merged" in card
    assert "merged into the saved weights" in (merged_dir / "README.md").read_text()
    sent = upload_files(alone)  # what `ctrltok push` would send: the adapter is the model
    assert "adapter/adapter_model.safetensors" in sent and "model.safetensors" not in sent


@pytest.mark.slow
def test_save_adapter_false_writes_no_adapter(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    train(recipe_from_mapping(_mapping(tiny_model_dir, save={"adapter": False}, max_steps=1)), out, progress=False)
    assert not (out / ADAPTER).exists() and (out / "model.safetensors").is_file()
    assert "## LoRA adapter" not in (out / "README.md").read_text()


def test_the_adapter_alone_needs_a_base_rebuilt_by_name(tmp_path, tiny_model_dir, monkeypatch):
    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the save check")

    monkeypatch.setattr(train_module, "prepare_model", no_loading)
    overrides = _mapping(tiny_model_dir, save={"merged": False})
    overrides["model"]["config"] = {"rope_theta": 20000.0}
    with pytest.raises(ConfigError, match=r"save.merged = false with model.config overrides.*set save.merged: true"):
        train(recipe_from_mapping(overrides), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
