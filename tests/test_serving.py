"""What a run shares: the LoRA adapter beside the merged model (loadable with PEFT on the base with the
tokens added, same logits as the merged model), and experiment tracking through accelerate."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from ctrltok.core.config import ConfigError, recipe_from_mapping
from ctrltok.training.setup import prepare_model
from ctrltok.training.train import ADAPTER, train


def _mapping(model, **train):
    return {"model": {"name": str(model)}, "tokens": {"presets": ["eot"]},
            "data": {"train": "ctrltok:instructions", "template": "eot", "max_length": 128, "limit": 24},
            "lora": {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            "train": {"max_steps": 2, "lr": 1e-2, "micro_batch_size": 2, **train}}


@pytest.mark.slow
def test_lora_adapter_is_saved_beside_the_merged_model_and_tensorboard_logs(tmp_path, tiny_model_dir):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    recipe = recipe_from_mapping(_mapping(tiny_model_dir, report_to=["tensorboard"]))
    train(recipe, out, progress=False)
    assert (out / ADAPTER / "adapter_config.json").is_file() and (out / ADAPTER / "adapter_model.safetensors").is_file()
    assert list(out.rglob("events.out.tfevents.*")), "TensorBoard wrote no event file"
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    base = prepare_model(recipe_from_mapping(_mapping(tiny_model_dir))).model  # the base with the tokens added
    adapted = PeftModel.from_pretrained(base, out / ADAPTER).eval()
    ids = torch.tensor([[1, 5, 9, 49152, 20, 7]])  # includes the new <EOT> row the adapter trained
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_a_missing_tracker_package_is_an_error_at_startup(tmp_path, tiny_model_dir):
    recipe = recipe_from_mapping(_mapping(tiny_model_dir, report_to=["wandb"]))
    with pytest.raises(ConfigError, match="train.report_to: 'wandb' needs the `wandb` package"):
        train(recipe, tmp_path / "run", progress=False)
    recipe = recipe_from_mapping(_mapping(tiny_model_dir, report_to=["nosuch"]))
    with pytest.raises(ConfigError, match="not a tracker accelerate knows"):
        train(recipe, tmp_path / "run2", progress=False)
