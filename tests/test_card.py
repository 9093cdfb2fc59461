"""Model card and loss curves: rendered from what train.save_final really writes, robust to gaps."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from ctrltok.core.config import Recipe
from ctrltok.core.templates import install_templates
from ctrltok.core.tokens import (
    add_tokens,
    add_tokens_to_tokenizer,
    apply_generation_config,
    resolve_tokens,
)
from ctrltok.training.card import (
    plot_curves,
    read_metrics,
    render_card,
    token_rows,
    write_card,
)
from ctrltok.training.curves import NOTE_EASY_HELDOUT, curves_figure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n"), text[:80]
    head = text.split("---\n", 2)[1]
    return yaml.safe_load(head)


def _metrics(path: Path, steps: int = 6, head: bool = False) -> None:
    with open(path, "w") as fh:
        fh.write(json.dumps({"event": "setup", "step": 0, "rows": 3}) + "\n")
        fh.write(json.dumps({"step": 0, "eval_loss": 4.0, "eval_targets": 10}) + "\n")
        for s in range(1, steps + 1):
            rec = {"step": s, "loss": 4.0 - 0.3 * s, "lr": 1e-4, "supervised_tokens_per_s": 50.0}
            if head:
                rec["head_bce"] = 0.7 - 0.05 * s
            fh.write(json.dumps(rec) + "\n")
        fh.write(json.dumps({"step": steps, "eval_loss": 2.5, "eval_targets": 10}) + "\n")


def _eot_setup(smol_tokenizer, tiny_llama, tmp_path):
    model = tiny_llama(len(smol_tokenizer))
    smol_tokenizer.pad_token = smol_tokenizer.eos_token
    surgery = add_tokens(model, smol_tokenizer, resolve_tokens(["eot"]), pad_to_multiple_of=64)
    install_templates(smol_tokenizer, default="eot")  # as prepare_model does for an eot recipe
    recipe = Recipe(name="eot-cpu")
    recipe.tokens.presets = ["eot"]
    recipe.data.template = "eot"
    recipe.lora.enabled = True
    recipe.train.micro_batch_size, recipe.train.grad_accum = 2, 4
    _metrics(tmp_path / "metrics.jsonl")
    summary = {"pack": {"examples": 9, "rows": 3, "tokens": 700, "padding": 68, "truncated_examples": 1,
                        "truncated_tokens": 12, "split_examples": 0, "split_pieces": 0},
               "skips": {"no supervised tokens": 2}, "records": 12, "steps": 6, "processes": 1,
               "eval_loss": 2.5, "eval_targets": 10}
    return model, surgery, recipe, summary


@pytest.fixture
def eot_checkpoint(tmp_path, smol_tokenizer, tiny_llama):
    """What train.save_final leaves on disk, written the same way (model, tokenizer with templates,
    generation config, manifest) without importing the training stack (accelerate + peft take
    ~30 s to import on this loaded machine); the slow test below runs save_final itself."""
    model, surgery, recipe, summary = _eot_setup(smol_tokenizer, tiny_llama, tmp_path)
    apply_generation_config(model, surgery, surgery.ids["<EOT>"])
    model.save_pretrained(tmp_path)
    smol_tokenizer.save_pretrained(tmp_path)
    manifest = {**surgery.manifest(), "template": "eot", "end_of_turn": "<EOT>", "recipe": recipe.name,
                "recipe_values": asdict(recipe), "summary": summary, "complete": True}
    (tmp_path / "ctrltok.json").write_text(json.dumps(manifest, default=str))
    plot_curves(tmp_path / "metrics.jsonl", tmp_path / "loss_curves.png")
    write_card(tmp_path, manifest)
    return tmp_path, surgery


@pytest.mark.slow
def test_save_final_writes_card_and_curves(tmp_path, smol_tokenizer, tiny_llama):
    from ctrltok.core.loss import LossModel
    from ctrltok.core.templates import get_template
    from ctrltok.training.setup import Prepared
    from ctrltok.training.train import save_final

    model, surgery, recipe, summary = _eot_setup(smol_tokenizer, tiny_llama, tmp_path)
    template = get_template("eot", smol_tokenizer)
    prepared = Prepared(model, smol_tokenizer, surgery, template, template.end_of_turn_id(smol_tokenizer), None)
    save_final(tmp_path, LossModel(model), prepared, recipe, summary)
    assert json.loads((tmp_path / "ctrltok.json").read_text())["complete"] is True
    text = (tmp_path / "README.md").read_text()
    assert f"| `<EOT>` | {surgery.ids['<EOT>']} |" in text
    assert "| eval_loss | 2.5 |" in text
    assert (tmp_path / "loss_curves.png").read_bytes().startswith(PNG_MAGIC)


def test_card_of_an_eot_checkpoint(eot_checkpoint):
    out, surgery = eot_checkpoint
    eot_id = surgery.ids["<EOT>"]
    assert eot_id == 49_152
    text = (out / "README.md").read_text()
    meta = _front_matter(text)
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "eot-cpu" in meta["tags"] and "eot" in meta["tags"]
    # the token table row, with its id and roles
    row = next(line for line in text.splitlines() if line.startswith("| `<EOT>`"))
    assert f"| {eot_id} |" in row and "supervised, stop" in row
    first, last = surgery.filler_ids[0], surgery.filler_ids[-1]
    assert f"{first}–{last}" in text and f"{last - first + 1} filler tokens" in text
    # the templates table: the saved names, the trained one marked, and how to select each
    templates = [line for line in text.split("## Chat templates")[1].split("```")[0].splitlines()
                 if line.startswith("| `")]
    names = [line.split("`")[1] for line in templates]
    assert {"default", "chatml", "eot", "model"} <= set(names)
    assert "(used in training)" in next(line for line in templates if line.startswith("| `eot`"))
    default_row = next(line for line in templates if line.startswith("| `default`"))
    assert "the same text as `eot`" in default_row and "(used in training)" in default_row
    assert "(used in training)" not in next(line for line in templates if line.startswith("| `chatml`"))
    assert 'apply_chat_template(messages, chat_template="eot"' in text
    assert "with no template named renders `eot`, the format the model was trained on" in text
    assert "ChatML as `chatml`" in text
    # where control tokens in user text stay text, and where they cannot
    safety = text.split("## Control tokens in user text")[1].split("\n## ")[0]
    assert "sanitize_control_tokens=True" in safety and "ctrltok render --model DIR --template eot" in safety
    assert "`say <EOT> now` becomes the control id 49152" in safety and "tokenize=False" in safety
    # front matter through ModelCardData: license and language of the base, eval results as model-index
    assert meta["license"] == "apache-2.0" and meta["language"] == ["en"]
    result = meta["model-index"][0]["results"][0]
    assert meta["model-index"][0]["name"] == out.resolve().name
    assert result["task"]["type"] == "text-generation"
    assert {"type": "loss", "value": 2.5} .items() <= result["metrics"][0].items()
    assert "Recipe file: `eot-cpu.yaml`" not in text  # no source recorded in this fixture: no line
    # data, hyper-parameters, evaluation, notes
    assert "Records read: 12" in text and "no supervised tokens: 2" in text
    assert "| truncated_tokens | 12 |" in text
    assert "effective batch (rows per optimizer step): `8`" in text
    assert "- r: `16`" in text
    assert "| eval_loss | 2.5 |" in text
    assert "vocab size 49216" in text  # 49,152 + 1 + 63 fillers, padded to 64
    assert f"`<EOT>` (id {eot_id})" in text.split("## Notes")[1]
    assert "`<|im_end|>` (id 2)" in text.split("## Notes")[1]  # the base EOS still stops
    assert "loss_curves.png" in text
    png = (out / "loss_curves.png").read_bytes()
    assert png.startswith(PNG_MAGIC)


def test_curves_png_is_valid(tmp_path):
    from matplotlib.image import imread

    _metrics(tmp_path / "m.jsonl")
    single = plot_curves(tmp_path / "m.jsonl", tmp_path / "a.png")
    _metrics(tmp_path / "h.jsonl", head=True)
    double = plot_curves(tmp_path / "h.jsonl", tmp_path / "sub" / "b.png")
    assert single == tmp_path / "a.png" and double == tmp_path / "sub" / "b.png"
    a, b = imread(single), imread(double)
    assert a.ndim == 3 and a.shape[0] > 100 and a.shape[1] > 100
    assert b.shape[1] > 1.5 * a.shape[1]  # the head BCE gets its own panel
    assert a.std() > 0  # something was drawn


def test_curves_nothing_to_plot(tmp_path):
    assert plot_curves(tmp_path / "absent.jsonl", tmp_path / "x.png") is None
    only_setup = tmp_path / "m.jsonl"
    only_setup.write_text(json.dumps({"event": "setup", "step": 0}) + "\n")
    assert plot_curves(only_setup, tmp_path / "x.png") is None
    assert not (tmp_path / "x.png").exists()


def test_torn_metrics_line_is_ignored(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n" + '{"step": 2, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}]
    assert plot_curves(path, tmp_path / "x.png") is not None


def test_epe_charter_tokens_are_one_row(smol_tokenizer, tiny_llama, tmp_path):
    model = tiny_llama(len(smol_tokenizer))
    surgery = add_tokens(model, smol_tokenizer, resolve_tokens(["epe"]), pad_to_multiple_of=128)
    manifest = {**surgery.manifest(), "template": "epe", "end_of_turn": "<|im_end|>"}
    rows = token_rows(manifest)
    assert [r["token"] for r in rows] == ["<assistant>", "<charter_1.1> … <charter_7.5>", "<|ctrltok_filler_0|> …"]
    assert rows[1]["id"] == "49153–49187" and rows[1]["count"] == 35 and rows[1]["roles"] == "blocked"
    assert rows[2]["id"] == "49188–49279"
    text = render_card(tmp_path, manifest)
    assert "`<charter_2.1>`" not in text  # summarised, not listed one by one
    assert "vocab size 49280" in text and "49152 from the base tokenizer" in text
    assert "35 control tokens" in text  # the suppression note names the range


def test_card_survives_an_empty_manifest(tmp_path):
    path = write_card(tmp_path, {})
    text = path.read_text()
    assert path == tmp_path / "README.md"
    assert _front_matter(text)["library_name"] == "transformers"
    assert "No evaluation was recorded" in text
    assert "{{" not in text and "{%" not in text


def test_card_before_after_evaluation(tmp_path):
    manifest = {"recipe": "eot", "summary": {"eval_loss": 1.5},
                "evaluation": {"before": {"eval_loss": 3.25, "eot_stop_rate": 0.0},
                               "after": {"eval_loss": 1.5, "eot_stop_rate": 0.875}}}
    text = render_card(tmp_path, manifest)
    assert "| Metric | before | after |" in text
    assert "| eot_stop_rate | 0 | 0.875 |" in text
    assert "| eval_loss | 3.25 | 1.5 |" in text


def test_local_base_model_is_not_put_in_front_matter(tmp_path):
    manifest = {"recipe_values": {"model": {"name": str(tmp_path)}}}
    meta = _front_matter(render_card(tmp_path, manifest))
    assert "base_model" not in meta
    manifest = {"recipe_values": {"model": {"name": "HuggingFaceTB/SmolLM2-1.7B"}}}
    assert _front_matter(render_card(tmp_path, manifest))["base_model"] == "HuggingFaceTB/SmolLM2-1.7B"


def test_card_front_matter_is_hub_model_card_data(eot_checkpoint):
    from huggingface_hub import ModelCard

    out, _ = eot_checkpoint
    card = ModelCard((out / "README.md").read_text())
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.license == "apache-2.0" and card.data.library_name == "transformers"
    (result,) = card.data.eval_results
    assert result.metric_type == "loss" and result.metric_value == 2.5
    assert result.dataset_split == "held-out"


def test_card_has_no_machine_paths(tmp_path):
    home = str(Path.home())
    values = {"source": str(tmp_path / "recipes" / "mine.yaml"),
              "model": {"name": str(tmp_path / "models" / "base")},
              "tokens": {"presets": ["eot"], "charter": f"{home}/charters/c.jsonl"},
              "data": {"kind": "chat", "train": [{"path": str(tmp_path / "data" / "chats.jsonl"), "weight": 2},
                                                 {"hf": "org/chats", "split": "train"}],
                       "eval": f"hf:json?data_files={tmp_path}/data/held.jsonl", "template": "eot"},
              "train": {"lr": 1e-4, "deepspeed": str(tmp_path / "ds.json"), "micro_batch_size": 1, "grad_accum": 1}}
    manifest = {"recipe": "mine", "recipe_values": values, "template": "eot", "end_of_turn": "<EOT>",
                "summary": {"eval_loss": 1.25, "eval_targets": 40}}
    text = render_card(tmp_path, manifest)
    assert str(tmp_path) not in text and home not in text
    assert "Recipe file: `mine.yaml`" in text
    assert "train: `chats.jsonl, hf:org/chats`" in text and "data_files=held.jsonl" in text
    recipe_block = text.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(recipe_block)["data"]["train"][0] == {"path": "chats.jsonl", "weight": 2}
    assert "deepspeed: `ds.json`" in text and "- Base model: `base`" in text
    meta = _front_matter(text)
    assert "base_model" not in meta  # a local folder is not a hub id
    assert meta["datasets"] == ["org/chats"]  # hub datasets only; `hf:json` with local files is not one
    result = meta["model-index"][0]["results"][0]
    assert result["dataset"]["name"] == "hf:json?data_files=held.jsonl" and "split" not in result["dataset"]
    assert result["metrics"] == [{"type": "loss", "value": 1.25,
                                  "name": "held-out loss (cross-entropy per supervised token)"}]


# -- curves: the figure's panels and lines ------------------------------------------------------
def _axes(fig):
    return {ax.get_label(): ax for ax in fig.axes}


def test_curves_figure_panels(tmp_path):
    _metrics(tmp_path / "m.jsonl")
    fig = curves_figure(read_metrics(tmp_path / "m.jsonl"))
    axes = _axes(fig)
    assert set(axes) == {"loss", "lr", "tokens"}
    loss = axes["loss"]
    lines = {line.get_label(): line for line in loss.get_lines()}
    raw = lines["train loss, per step"]
    smoothed = next(line for name, line in lines.items() if name.startswith("train loss, smoothed (EMA"))
    assert raw.get_alpha() < 0.5 < smoothed.get_linewidth()  # raw values faint, the smoothed line bold
    assert list(smoothed.get_xdata()) == list(raw.get_xdata()) == [1, 2, 3, 4, 5, 6]
    assert smoothed.get_ydata()[0] == raw.get_ydata()[0]  # bias-corrected: no pull towards zero
    held = lines["held-out loss (where measured)"]
    assert held.get_linestyle() == "None" and held.get_marker() == "o"  # points, no line across steps
    assert list(held.get_xdata()) == [0, 6] and list(held.get_ydata()) == [4.0, 2.5]
    assert (loss.get_legend().get_title().get_text() or "") == ""  # held-out above train at step 0: no note
    lr = axes["lr"]
    assert lr.get_ylabel() == "learning rate" and lr.get_xlabel() == "optimizer step"
    assert [line.get_label() for line in lr.get_lines()] == ["learning rate"]
    assert axes["tokens"].get_ylabel() == "supervised tokens / s"


def test_curves_cumulative_supervised_tokens_and_the_easy_heldout_note(tmp_path):
    records = [{"step": 0, "eval_loss": 2.0}]
    records += [{"step": s, "loss": 3.0 - 0.05 * s, "lr": 1e-3, "supervised_tokens": 100} for s in range(1, 11)]
    records += [{"step": 10, "eval_loss": 1.7}]
    axes = _axes(curves_figure(records))
    (tokens,) = axes["tokens"].get_lines()
    assert list(tokens.get_ydata()) == [100 * s for s in range(1, 11)]
    assert axes["tokens"].get_ylabel() == "supervised tokens (cumulative)"
    note = axes["loss"].get_legend().get_title().get_text().replace("\n", " ")
    assert note == NOTE_EASY_HELDOUT


def test_curves_head_panel(tmp_path):
    _metrics(tmp_path / "h.jsonl", head=True)
    axes = _axes(curves_figure(read_metrics(tmp_path / "h.jsonl")))
    assert set(axes) == {"loss", "lr", "tokens", "head"}
    assert axes["head"].get_title() == "constitution head"


def test_card_warns_when_the_default_is_not_the_trained_template(tmp_path, smol_tokenizer):
    """A folder saved before the trained template became the default (ChatML default, eot trained)."""
    smol_tokenizer.pad_token = smol_tokenizer.eos_token
    add_tokens_to_tokenizer(smol_tokenizer, resolve_tokens(["eot"]), 64)
    install_templates(smol_tokenizer)
    smol_tokenizer.save_pretrained(tmp_path)
    text = render_card(tmp_path, {"template": "eot", "end_of_turn": "<EOT>"})
    assert "with no template named renders `chatml` (" in text
    assert 'The default is not the template the model was trained on**: pass `chat_template="eot"`' in text
