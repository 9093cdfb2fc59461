"""Distributed engines on CPU (gloo): FSDP2 equals one process (full fine-tuning; LoRA with new rows
and the EPE head) and resumes after SIGKILL; DDP synchronises gradients once per optimizer step
(counted); two simulated nodes resume after SIGKILL; DeepSpeed's "auto" values resolve and its
engine (ZeRO-2 and ZeRO-3, one CPU process: the most accelerate allows without a GPU) equals one
plain process and resumes; the shipped accelerate configs pick the engine they name.

Tolerances (float32, CPU): runs with another number of processes or another engine sum the same
gradients in another order, so weights agree to ``atol=1e-5, rtol=1e-4`` (observed: <= 2.5e-6 over
4 steps) but for a few elements where Adam divides by a gradient near its eps (``_same_weights``),
and logged losses to a relative 1e-6; a resumed run on the same processes as the
uninterrupted one repeats its arithmetic (``atol=1e-6``; observed: equal).

Every multi-process run is a tiny random Llama, 4 optimizer steps of 8 rows (micro-batch 1).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils.launch import prepare_multi_gpu_env
from safetensors.torch import load_file

from ctrltok.core.config import ConfigError, recipe_from_mapping
from ctrltok.core.records import resource_path
from ctrltok.training.engines import (
    launcher_strategy,
    resolve_deepspeed_config,
    resolve_strategy,
)

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = ROOT / "recipes" / "accelerate"
DEEPSPEED = ROOT / "recipes" / "deepspeed"
STEPS, ACCUM = 4, 4  # two processes x micro-batch 1 x ACCUM = 8 rows a step; one process: 2 * ACCUM
LR = {"chat": 1e-3, "epe": 1e-2}
OUTLIERS = 1e-3  # the share of a tensor's elements allowed past the tolerance (_same_weights)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mapping(tiny_dir: Path, kind: str = "chat", **train) -> dict:
    if kind == "chat":
        mapping = {"tokens": {"presets": ["eot"], "pad_to_multiple_of": 64},
                   "data": {"train": "ctrltok:instructions", "template": "eot", "max_length": 96, "limit": 32,
                            "eval_fraction": 0.1}}
    else:  # EPE with LoRA: reflections, the hole mask, the constitution head, PEFT's new-row adapter
        mapping = {"tokens": {"presets": ["epe"], "init": "mean", "pad_to_multiple_of": 128},
                   "data": {"kind": "epe", "train": str(resource_path("epe_corpus")), "template": "epe",
                            "max_length": 256, "limit": 12, "eval_fraction": 0.15},
                   "epe": {"sidecar": str(resource_path("epe_sidecar"))},
                   "lora": {"enabled": True, "r": 4}}
    mapping["model"] = {"name": str(tiny_dir)}
    mapping["train"] = {"lr": LR[kind], "max_steps": STEPS, "micro_batch_size": 1,
                        "grad_accum": ACCUM, "warmup_steps": 0, "save_every": 1, "save_total_limit": 2, **train}
    return mapping


def _write(path: Path, mapping: dict) -> Path:
    path.write_text("# test recipe: ctrltok train THIS.yaml\n" + yaml.safe_dump(mapping))
    return path


def _env(**extra) -> dict:
    env = {**os.environ, "CTRLTOK_PROGRESS": "0", **extra}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "ACCELERATE_USE_CPU", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        env.pop(k, None)
    return env


def _run(cmd: list[str], env_extra: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=_env(**(env_extra or {})), cwd=ROOT, capture_output=True, text=True, timeout=900)
    if check:
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


def _torchrun(n: int, recipe: Path, out: Path, *sets: str, env_extra: dict | None = None, check: bool = True):
    return _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
                 str(_free_port()), "-m", "ctrltok", "train", str(recipe), "--out", str(out), *sets],
                env_extra, check)


def _single(recipe: Path, out: Path, *sets: str, env_extra: dict | None = None, check: bool = True):
    return _run([sys.executable, "-m", "ctrltok", "train", str(recipe), "--out", str(out), *sets], env_extra, check)


def _weights(d: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(Path(d) / name)


def _metrics(d: Path, key: str) -> list[float]:
    return [r[key] for r in map(json.loads, (Path(d) / "metrics.jsonl").read_text().splitlines()) if key in r]


def _summary(d: Path) -> dict:
    return json.loads((Path(d) / "ctrltok.json").read_text())["summary"]


def _same_weights(a: Path, b: Path, atol: float = 1e-5, rtol: float = 1e-4, name: str = "model.safetensors",
                  outliers: float = OUTLIERS, lr: float = LR["chat"]):
    """Every tensor within ``atol + rtol * |a|``, except at most ``outliers`` of its elements, and
    those within Adam's reach of each other (2 lr a step). Why the exception: where an element's
    gradient is near Adam's eps, its update divides a rounding difference by a number as small, so
    two correct runs that sum in another order can part there by up to ~lr a step (observed: one
    element of 8192 at 1.2e-6 here, past 1e-5 on another CPU). A broken sync or a lost micro-batch
    moves most elements by ~lr, which this still fails, and the logged losses are compared too."""
    wa, wb = _weights(a, name), _weights(b, name)
    assert wa.keys() == wb.keys()
    for k in wa:
        diff = (wb[k].float() - wa[k].float()).abs()
        past = diff > atol + rtol * wa[k].float().abs()
        worst = float(diff.max()) if diff.numel() else 0.0
        detail = f"{k}: {int(past.sum())} of {diff.numel()} elements past atol={atol}, rtol={rtol}; largest difference {worst:.3g}"
        assert int(past.sum()) <= outliers * diff.numel(), detail
        assert worst <= 2 * lr * STEPS, detail


def _same_losses(a: Path, b: Path, key: str = "loss"):
    la, lb = _metrics(a, key), _metrics(b, key)
    assert len(la) == len(lb) > 0, (la, lb)
    assert lb == pytest.approx(la, rel=1e-6), key


class Runs:
    """The recipes (chat: full fine-tuning; epe: LoRA + head) and their one-process reference runs,
    each made once for the whole module."""

    def __init__(self, root: Path, tiny_dir: Path):
        self.root, self.tiny_dir, self.made = root, tiny_dir, {}

    def recipe(self, kind: str) -> Path:
        path = self.root / f"{kind}.yaml"
        if not path.exists():
            _write(path, _mapping(self.tiny_dir, kind, eval_every=2))
        return path

    def one(self, kind: str) -> Path:
        """One process, the same global batch as two processes with ACCUM micro-batches each."""
        out = self.root / f"{kind}-one"
        if not (out / "ctrltok.json").exists():
            _single(self.recipe(kind), out, "--set", f"train.grad_accum={2 * ACCUM}")
        return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> Runs:
    return Runs(tmp_path_factory.mktemp("engines"), tiny_model_dir)


# -- configuration: no processes --------------------------------------------------------------
def test_deepspeed_auto_values_resolve_from_the_recipe(tiny_model_dir):
    recipe = recipe_from_mapping(_mapping(tiny_model_dir, micro_batch_size=4, grad_accum=2, max_grad_norm=0.5,
                                          precision="bf16"))
    zero2 = json.loads((DEEPSPEED / "zero2.json").read_text())
    out = resolve_deepspeed_config(zero2, recipe, world=8, hidden_size=64)
    assert (out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"], out["train_batch_size"],
            out["gradient_clipping"]) == (4, 2, 64, 0.5)
    assert out["bf16"]["enabled"] is True and out["fp16"]["enabled"] is False
    assert out["zero_optimization"]["stage"] == 2 and "auto" not in json.dumps(out)
    assert resolve_deepspeed_config(out, recipe, world=8, hidden_size=64) == out  # idempotent
    zero3 = resolve_deepspeed_config(json.loads((DEEPSPEED / "zero3.json").read_text()), recipe, 8, 64)
    z = zero3["zero_optimization"]
    assert z["stage"] == 3 and z["stage3_gather_16bit_weights_on_model_save"] is True
    assert (z["reduce_bucket_size"], z["stage3_param_persistence_threshold"]) == (64 * 64, 640)
    assert "auto" not in json.dumps(zero3)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps = 4 but the recipe gives 2"):
        resolve_deepspeed_config({**zero2, "gradient_accumulation_steps": 4}, recipe, 8)
    with pytest.raises(ConfigError, match="remove its 'optimizer' section"):
        resolve_deepspeed_config({**zero2, "optimizer": {"type": "AdamW"}}, recipe, 8)


def test_strategy_from_the_recipe_or_the_launcher(tiny_model_dir):
    fsdp_env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false",
                "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer"}
    assert launcher_strategy(fsdp_env) == ("fsdp2", {"reshard_after_forward": False,
                                                     "layer_classes": ["LlamaDecoderLayer"]})
    with pytest.raises(ConfigError, match="FSDP2 only"):
        launcher_strategy({**fsdp_env, "FSDP_VERSION": "1"})
    ds_env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "recipes/deepspeed/zero2.json"}
    assert launcher_strategy(ds_env)[0] == "deepspeed"
    ddp = recipe_from_mapping(_mapping(tiny_model_dir))
    assert resolve_strategy(ddp, {})[0] == "ddp" and resolve_strategy(ddp, fsdp_env)[0] == "fsdp2"
    fsdp = recipe_from_mapping(_mapping(tiny_model_dir, strategy="fsdp2"))
    with pytest.raises(ConfigError, match="asks for deepspeed"):
        resolve_strategy(fsdp, ds_env)
    with pytest.raises(ConfigError, match="set train.strategy: deepspeed"):
        recipe_from_mapping(_mapping(tiny_model_dir, deepspeed="recipes/deepspeed/zero2.json"))
    with pytest.raises(ConfigError, match="fp16"):
        recipe_from_mapping(_mapping(tiny_model_dir, strategy="fsdp2", precision="fp16"))
    with pytest.raises(ConfigError, match="train.save_total_limit"):
        recipe_from_mapping(_mapping(tiny_model_dir, save_total_limit=0))


@pytest.mark.parametrize("name, strategy", [("ddp", None), ("fsdp2", "fsdp2"), ("multinode", "fsdp2"),
                                            ("deepspeed-zero2", "deepspeed"), ("deepspeed-zero3", "deepspeed")])
def test_shipped_accelerate_configs(name, strategy):
    """Each config parses with accelerate's own loader, says how to run it, and (DDP, FSDP2) gives
    the environment from which ctrltok picks the engine it names."""
    path = ACCELERATE / f"{name}.yaml"
    text = path.read_text()
    assert text.startswith("#") and "accelerate launch --config_file recipes/accelerate/" in text
    config = load_config_from_file(str(path))
    if strategy == "deepspeed":
        json_path = ROOT / config.deepspeed_config["deepspeed_config_file"]
        assert json_path.is_file() and config.deepspeed_config["zero3_init_flag"] is False
        stage = json.loads(json_path.read_text())["zero_optimization"]["stage"]
        assert f"zero{stage}" in name
        return
    args = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(path), "x.py"]))[0]
    assert launcher_strategy(prepare_multi_gpu_env(args))[0] == strategy
    if name == "multinode":  # seed 000: 20 nodes x 8 GPUs
        assert (args.num_machines, args.num_processes) == (20, 160) and args.main_process_ip


# -- FSDP2 ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fsdp2_two_processes_equal_one(runs):
    """`torchrun --nproc_per_node 2 -m ctrltok train R --set train.strategy=fsdp2`: the same losses
    (every step, and the held-out ones) and final weights as one process with the same global batch;
    each rank wrote its own shard of every checkpoint; the final model is one plain checkpoint."""
    one = runs.one("chat")
    two = runs.root / "chat-fsdp2"
    _torchrun(2, runs.recipe("chat"), two, "--set", "train.strategy=fsdp2")
    summary = _summary(two)
    assert (summary["strategy"], summary["processes"]) == ("fsdp2", 2)
    _same_losses(one, two)
    _same_losses(one, two, "eval_loss")
    _same_weights(one, two)
    shards = sorted(p.name for p in (two / "checkpoints" / "step-000003" / "model").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"], shards


@pytest.mark.slow
def test_fsdp2_lora_new_rows_and_constitution_head_equal_one(runs):
    """LoRA with PEFT's trainable new rows and EPE's constitution head under FSDP2, launched through
    the shipped accelerate config: same losses (CE and head BCE), merged weights and head weights."""
    one = runs.one("epe")
    two = runs.root / "epe-fsdp2"
    _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / "fsdp2.yaml"),
          "--num_processes", "2", "--main_process_port", str(_free_port()), "-m", "ctrltok", "train",
          str(runs.recipe("epe")), "--out", str(two)])
    assert _summary(two)["strategy"] == "fsdp2"
    _same_losses(one, two)
    _same_losses(one, two, "head_bce")
    _same_weights(one, two, lr=LR["epe"])
    _same_weights(one, two, name="constitution_head.safetensors", lr=LR["epe"])
    assert not any("lora" in k for k in _weights(two))


@pytest.mark.slow
def test_fsdp2_resumes_after_sigkill_to_the_uninterrupted_run(runs):
    """Killed (SIGKILL, both ranks) after step 3, with checkpoints at every step, and rerun: the
    same weights and metrics as the uninterrupted FSDP2 run; save_total_limit kept 2 checkpoints."""
    straight = runs.root / "chat-fsdp2"
    if not (straight / "ctrltok.json").exists():
        _torchrun(2, runs.recipe("chat"), straight, "--set", "train.strategy=fsdp2")
    resumed = runs.root / "chat-fsdp2-resumed"
    killed = _torchrun(2, runs.recipe("chat"), resumed, "--set", "train.strategy=fsdp2",
                       env_extra={"CTRLTOK_FAULT_KILL_AFTER_STEP": "3"}, check=False)
    assert killed.returncode != 0 and not (resumed / "ctrltok.json").exists()
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    _torchrun(2, runs.recipe("chat"), resumed, "--set", "train.strategy=fsdp2")
    _same_weights(straight, resumed, atol=1e-6, rtol=0, outliers=0)
    assert _metrics(resumed, "loss") == pytest.approx(_metrics(straight, "loss"), rel=1e-9)
    assert len(_metrics(resumed, "loss")) == STEPS, "metrics lost or duplicated across the resume"


# -- DDP --------------------------------------------------------------------------------------
COUNT_SYNCS = """
import json, os, sys
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from ctrltok.core.config import load_recipe
from ctrltok.training import engines
from ctrltok.training.train import train

forwards, syncs, kinds = [0], [], []
plain_prepare = engines.prepare

def prepare(engine, loss_model, optimizer):
    loss_model, optimizer = plain_prepare(engine, loss_model, optimizer)
    kinds.append(type(loss_model).__name__)

    def count_forward(module, args, kwargs):
        forwards[0] += 1

    def count_sync(state, bucket):  # DDP calls its comm hook once per gradient bucket it all-reduces
        syncs.append(forwards[0])
        return allreduce_hook(state, bucket)

    loss_model.register_forward_pre_hook(count_forward, with_kwargs=True)
    loss_model.register_comm_hook(None, count_sync)
    return loss_model, optimizer

engines.prepare = prepare
out = sys.argv[2]
train(load_recipe(sys.argv[1]), out, progress=False)
with open(os.path.join(out, "syncs-" + os.environ["RANK"] + ".json"), "w") as fh:
    json.dump({"forwards": forwards[0], "syncs": syncs, "kinds": kinds}, fh)
"""


@pytest.mark.slow
def test_ddp_accumulation_syncs_gradients_once_per_optimizer_step(runs):
    """Accumulation 4 on 2 gloo processes: DDP's gradient all-reduce (counted by a comm hook, once per
    bucket) runs only on the last micro-batch of each step, every bucket once; the weights equal one
    process with the same global batch."""
    one = runs.one("chat")
    out = runs.root / "chat-ddp"
    script = runs.root / "count_syncs.py"
    script.write_text(textwrap.dedent(COUNT_SYNCS))
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
          str(script), str(runs.recipe("chat")), str(out)])
    for rank in (0, 1):
        seen = json.loads((out / f"syncs-{rank}.json").read_text())
        assert seen["kinds"] == ["DistributedDataParallel"]
        assert seen["forwards"] == STEPS * ACCUM
        assert sorted(set(seen["syncs"])) == [ACCUM * (s + 1) for s in range(STEPS)], seen["syncs"]
        buckets = seen["syncs"].count(ACCUM)
        assert buckets >= 1 and len(seen["syncs"]) == STEPS * buckets
    _same_weights(one, out)
    _same_losses(one, out)


@pytest.mark.slow
def test_accelerate_cpu_launch_starts_both_processes(runs):
    """`accelerate launch --cpu --num_processes 2` starts one process (it needs mpirun for more);
    ctrltok starts the second (ctrltok.training.launch) and the run equals one process."""
    one = runs.one("chat")
    two = runs.root / "chat-accelerate-cpu"
    run = _run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines",
                "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
                "-m", "ctrltok", "train", str(runs.recipe("chat")), "--out", str(two), "--set", "train.save_every=0"])
    assert "starting 2 through torch.distributed.run" in run.stdout + run.stderr
    assert (_summary(two)["processes"], _summary(two)["strategy"]) == (2, "ddp")
    _same_weights(one, two)


@pytest.mark.slow
def test_two_simulated_nodes_resume_after_sigkill(runs):
    """`torchrun --nnodes 2 --nproc_per_node 1 --node_rank r` on 127.0.0.1 (DDP, the checkpoints in
    one shared folder): killed after step 3 on both nodes, rerun, and equal to one process."""
    one = runs.one("chat")
    out = runs.root / "chat-two-nodes"

    def both(kill: bool) -> list[int]:
        port = _free_port()
        env = _env(**({"CTRLTOK_FAULT_KILL_AFTER_STEP": "3"} if kill else {}))
        procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
                                   "1", "--node_rank", str(r), "--master_addr", "127.0.0.1", "--master_port", str(port),
                                   "-m", "ctrltok", "train", str(runs.recipe("chat")), "--out", str(out)],
                                  env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for r in (0, 1)]
        outs = [p.communicate(timeout=900)[0] for p in procs]
        if not kill:
            assert all(p.returncode == 0 for p in procs), [o[-3000:] for o in outs]
        return [p.returncode for p in procs]

    assert all(code != 0 for code in both(kill=True))
    assert not (out / "ctrltok.json").exists() and (out / "checkpoints" / "step-000003" / "state.json").exists()
    both(kill=False)
    assert _summary(out)["processes"] == 2
    _same_weights(one, out)
    _same_losses(one, out)


# -- DeepSpeed --------------------------------------------------------------------------------
def _needs_deepspeed():
    try:
        import deepspeed  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"deepspeed is not installed ({exc}); its runs belong to the GPU device check")


@pytest.mark.slow
def test_deepspeed_zero2_runs_on_cpu_and_resumes(runs):
    """`train.strategy: deepspeed` with seed 002's ZeRO-2 JSON, one process on DeepSpeed's CPU
    accelerator (without a GPU accelerate gives DeepSpeed no process group for more): killed after
    step 3, rerun from the engine's own checkpoint, and equal to the plain one-process run."""
    _needs_deepspeed()
    one = runs.one("chat")
    out = runs.root / "chat-zero2"
    sets = ["--set", f"train.grad_accum={2 * ACCUM}", "--set", "train.strategy=deepspeed",
            "--set", f"train.deepspeed={DEEPSPEED / 'zero2.json'}"]
    killed = _single(runs.recipe("chat"), out, *sets, env_extra={"CTRLTOK_FAULT_KILL_AFTER_STEP": "3"}, check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (out / "checkpoints" / "step-000003" / "deepspeed").is_dir()
    _single(runs.recipe("chat"), out, *sets)
    assert _summary(out)["strategy"] == "deepspeed-zero2"
    _same_weights(one, out)
    _same_losses(one, out)


@pytest.mark.slow
def test_deepspeed_zero3_through_the_shipped_launch_config(runs):
    """`accelerate launch --config_file recipes/accelerate/deepspeed-zero3.yaml` (one CPU process):
    the model is loaded whole, partitioned by the engine, gathered once for the final save, and
    equals the plain one-process run."""
    _needs_deepspeed()
    one = runs.one("chat")
    out = runs.root / "chat-zero3"
    _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / "deepspeed-zero3.yaml"),
          "--num_processes", "1", "--main_process_port", str(_free_port()), "-m", "ctrltok", "train",
          str(runs.recipe("chat")), "--out", str(out), "--set", f"train.grad_accum={2 * ACCUM}"])
    assert _summary(out)["strategy"] == "deepspeed-zero3"
    _same_weights(one, out)
    _same_losses(one, out)
