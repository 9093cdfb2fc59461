"""The training loop: accumulation invariance, every parameter trained, LoRA with new rows,
resume after SIGKILL == uninterrupted, plain-transformers reload. Several processes and engines
(DDP, FSDP2, DeepSpeed, two nodes): tests/test_engines.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from ctrltok.core.config import recipe_from_mapping
from ctrltok.core.loss import LossModel
from ctrltok.data.encode import make_rows, to_batch
from ctrltok.training.setup import prepare_model
from ctrltok.training.train import accumulate, train


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir) -> Path:
    return tiny_model_dir


def recipe(tiny_dir, **train):
    mapping = {
        "model": {"name": str(tiny_dir)},
        "tokens": {"presets": ["eot"], "pad_to_multiple_of": 64},
        "data": {"train": "ctrltok:instructions", "template": "eot", "max_length": 96, "limit": 32,
                 "eval_fraction": 0.1},
        "train": {"lr": 1e-3, "max_steps": 3, "micro_batch_size": 2, "grad_accum": 2, "warmup_steps": 0,
                  **train},
    }
    return mapping


def test_accumulation_1x8_equals_8x1(tiny_dir):
    from accelerate import Accelerator

    r = recipe_from_mapping(recipe(tiny_dir))
    prepared = prepare_model(r)
    model, tok = prepared.model, prepared.tokenizer
    from ctrltok.data.encode import build_examples

    rows, _ = make_rows(build_examples(r, tok).train, r.data)
    rows = rows[:8]
    n = sum(ex.n_supervised for row in rows for ex in row)
    lm = LossModel(model).train()
    acc = Accelerator(cpu=True)
    impl = model.config._attn_implementation

    def grads(batches):
        lm.zero_grad(set_to_none=True)
        accumulate(lm, acc, batches, impl, torch.device("cpu"), float(n), 1.0)
        return {k: p.grad.clone() for k, p in lm.named_parameters() if p.grad is not None}

    one = grads([to_batch(rows, tok.pad_token_id, True)])
    eight = grads([to_batch([row], tok.pad_token_id, True) for row in rows])
    assert one.keys() == eight.keys() and len(one) > 0
    for k in one:
        torch.testing.assert_close(one[k], eight[k], rtol=1e-4, atol=1e-6, msg=k)


def _weights(d: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(d) / "model.safetensors")


def test_full_finetune_trains_every_parameter_and_reloads(tiny_dir, tmp_path):
    r = recipe_from_mapping(recipe(tiny_dir))
    out = train(r, tmp_path / "run", progress=False)
    before = _weights(tiny_dir)
    after = _weights(out)
    unchanged = [k for k in before if k in after and before[k].shape == after[k].shape and torch.equal(before[k], after[k])]
    assert not unchanged, f"parameters that did not change: {unchanged}"
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    eot = tok.convert_tokens_to_ids("<EOT>")
    assert eot == 49152 and len(tok) == model.get_input_embeddings().weight.shape[0]
    assert eot in model.generation_config.eos_token_id
    assert "eot" in tok.chat_template
    for name in ("README.md", "metrics.jsonl", "ctrltok.json", "loss_curves.png"):
        assert (out / name).exists(), name
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    # each logged step says how many targets it trained on (the curves' supervised-tokens panel sums them)
    assert steps and all(isinstance(s["supervised_tokens"], int) and s["supervised_tokens"] > 0 for s in steps)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], chat_template="eot", return_tensors="pt",
                                  return_dict=True)
    model.generate(**ids, max_new_tokens=3)


def test_default_attention_trains_per_document_and_equals_the_dense_mask(tiny_dir, tmp_path):
    """model.attn auto = per-document SDPA for packed training on CPU: same weights as one SDPA call
    behind the dense mask, and the saved model is a standard sdpa checkpoint."""
    fast = train(recipe_from_mapping(recipe(tiny_dir)), tmp_path / "auto", progress=False)
    dense = train(recipe_from_mapping(recipe(tiny_dir), overrides=["model.attn=sdpa"]), tmp_path / "sdpa", progress=False)
    used = [json.loads((d / "ctrltok.json").read_text())["summary"]["attention"] for d in (fast, dense)]
    assert used == ["ctrltok_varlen", "sdpa"]
    a, b = _weights(fast), _weights(dense)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    assert AutoModelForCausalLM.from_pretrained(fast).config._attn_implementation == "sdpa"


def _needs_compile():
    from ctrltok.training.compiling import compile_unavailable

    if compile_unavailable():
        pytest.skip(f"torch.compile does not work here: {compile_unavailable()}")


def test_compiled_blocks_give_the_eager_loss_and_gradients(tiny_dir):
    """compile_blocks: the same loss and gradients as eager on a packed batch (float tolerance: fused
    kernels round differently), state_dict names unchanged, and uncompile_blocks restores eager."""
    from accelerate import Accelerator

    from ctrltok.data.encode import build_examples
    from ctrltok.training.compiling import compile_blocks, uncompile_blocks

    _needs_compile()
    r = recipe_from_mapping(recipe(tiny_dir))
    prepared = prepare_model(r)
    model, tok = prepared.model, prepared.tokenizer
    rows, _ = make_rows(build_examples(r, tok).train, r.data)
    batch = to_batch(rows[:3], tok.pad_token_id, True)
    lm = LossModel(model).train()
    impl = model.config._attn_implementation

    def grads():
        lm.zero_grad(set_to_none=True)
        accumulate(lm, Accelerator(cpu=True), [batch], impl, torch.device("cpu"), float(batch.n_targets), 1.0)
        return {k: p.grad.clone() for k, p in lm.named_parameters()}

    names = list(lm.state_dict())
    eager = grads()
    assert compile_blocks(model) == 6  # 2 layers x (MLP + 2 norms); attention stays eager
    compiled = grads()
    assert list(lm.state_dict()) == names
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-4, atol=1e-6, msg=k)
    assert uncompile_blocks(model) == 6 and not any("_ctrltok_compiled" in vars(m) for m in model.modules())


def test_compiled_lora_training_run(tiny_dir, tmp_path):
    """train.compile with LoRA on the MLP: recorded in the summary, same weights as the eager run,
    merged into a plain checkpoint that reloads."""
    _needs_compile()
    overrides = ["lora.enabled=true", "lora.r=4", "lora.target_modules=[q_proj,gate_proj,down_proj]",
                 "data.eval_fraction=0"]  # no no-grad eval: one compilation, not two
    eager = train(recipe_from_mapping(recipe(tiny_dir), overrides=overrides), tmp_path / "eager", progress=False)
    fused = train(recipe_from_mapping(recipe(tiny_dir, compile=True), overrides=overrides), tmp_path / "compiled",
                  progress=False)
    summary = json.loads((fused / "ctrltok.json").read_text())["summary"]
    assert summary["compile"].startswith("6 modules"), summary["compile"]
    a, b = _weights(eager), _weights(fused)
    assert a.keys() == b.keys() and not any("lora" in k for k in b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)
    AutoModelForCausalLM.from_pretrained(fused)


def test_lora_trains_new_rows_and_merges(tiny_dir, tmp_path):
    r = recipe_from_mapping(recipe(tiny_dir, lr=1e-2), overrides=["lora.enabled=true", "lora.r=4",
                                                                  "train.new_token_lr=2e-2"])
    out = train(r, tmp_path / "lora", progress=False)
    base = _weights(tiny_dir)
    after = _weights(out)
    emb = "model.embed_tokens.weight"
    rows = base[emb].shape[0]
    assert torch.equal(after[emb][:rows], base[emb])  # old rows frozen under LoRA
    # The new EOT row moved away from its initial value (init is mean + noise: compare to the mean).
    init_mean = base[emb].mean(0)
    assert (after[emb][49152] - init_mean).abs().max() > 1e-3
    assert not torch.equal(after["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert not any("lora" in k for k in after), "LoRA was not merged into a plain checkpoint"


def test_new_token_lr_without_lora_is_refused(tiny_dir, tmp_path):
    from ctrltok.core.config import ConfigError

    r = recipe_from_mapping(recipe(tiny_dir, new_token_lr=1e-2))
    with pytest.raises(ConfigError, match="new_token_lr needs lora.enabled"):
        train(r, tmp_path / "x", progress=False)


def _cli(args, env_extra=None, check=True):
    env = {**os.environ, "CTRLTOK_PROGRESS": "0", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "ctrltok", *args], env=env, capture_output=True, text=True,
                          check=check, timeout=600)


def _write_recipe(tmp_path, tiny_dir, **train):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text("# test recipe: ctrltok train r.yaml\n" + yaml.safe_dump(recipe(tiny_dir, **train)))
    return path


def test_resume_after_sigkill_equals_uninterrupted(tiny_dir, tmp_path):
    # log_every 3 with save_every 2: the checkpoint at step 4 falls between logged lines
    path = _write_recipe(tmp_path, tiny_dir, max_steps=6, save_every=2, log_every=3, micro_batch_size=1, grad_accum=2)
    _cli(["train", str(path), "--out", str(tmp_path / "straight")])
    killed = _cli(["train", str(path), "--out", str(tmp_path / "resumed")],
                  env_extra={"CTRLTOK_FAULT_KILL_AFTER_STEP": "5"}, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "resumed" / "ctrltok.json").exists()
    assert (tmp_path / "resumed" / "checkpoints" / "step-000004").exists()
    _cli(["train", str(path), "--out", str(tmp_path / "resumed")])
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    for k in a:  # stated tolerance: exact up to float reassociation (CPU, same thread count)
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    def logged(run: str) -> list[dict]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines if '"loss"' in line]

    assert [r["step"] for r in logged("resumed")] == [3, 6], "metrics lost or duplicated across the resume"
    # the supervised targets logged since the previous line survive the checkpoint between lines
    assert [r["supervised_tokens"] for r in logged("resumed")] == [r["supervised_tokens"] for r in logged("straight")]


def test_partial_checkpoint_is_ignored(tmp_path):
    from ctrltok.training.checkpoint import clean_partial, latest_checkpoint

    root = tmp_path / "checkpoints"
    (root / "step-000002").mkdir(parents=True)
    (root / "step-000002" / "state.json").write_text("{}")
    (root / "step-000004.tmp-123").mkdir()
    assert latest_checkpoint(tmp_path).name == "step-000002"
    clean_partial(tmp_path)
    assert not (root / "step-000004.tmp-123").exists()
