"""The distributed engines behind the one loop: DDP (default), FSDP2, DeepSpeed ZeRO-2 and ZeRO-3.

Which engine runs: ``train.strategy`` (``ddp`` | ``fsdp2`` | ``deepspeed``), or the accelerate launch
config (``accelerate launch --config_file recipes/accelerate/fsdp2.yaml`` exports
``ACCELERATE_USE_FSDP`` and ``FSDP_VERSION``; a DeepSpeed config exports ``ACCELERATE_USE_DEEPSPEED``
and ``ACCELERATE_DEEPSPEED_CONFIG_FILE``). When both name one they must agree. The loop calls
:func:`make_engine`, :func:`shard`, :func:`prepare`, :func:`grad_norm`, :func:`eval_module` and
:func:`gathered`, and nothing engine-specific itself:

* **DDP**: ``accelerator.prepare`` wraps the :class:`~ctrltok.core.loss.LossModel` in
  ``DistributedDataParallel``; ``accelerator.accumulate`` puts every micro-batch but the step's last
  under ``no_sync``, so gradients are all-reduced once per optimizer step (counted in
  ``tests/test_engines.py``).
* **FSDP2**: ctrltok calls ``torch.distributed.fsdp.fully_shard`` itself, on every decoder layer
  (the model's ``_no_split_modules``, or ``fsdp_transformer_layer_cls_to_wrap``) and then on the
  root, which holds the embeddings, the LM head and EPE's constitution head; under LoRA PEFT's new
  token rows live in the root group and train as sharded parameters like any other. Not accelerate's
  FSDP plugin, because accelerate 1.15 turns that plugin on only for GPU-like distributed types
  (``accelerate/state.py``: ``MULTI_GPU``, ``MULTI_NPU``, ...): on CPU/gloo a run asking for it
  silently stays DDP, so it cannot be tested here. One code path that the CPU tests run, on CPU
  and GPU alike, beats two; the Accelerator is built as a plain multi-process one (the launcher's
  ``ACCELERATE_USE_FSDP`` is hidden while it is built) so that it does not wrap the model again.
  From a launch config ctrltok reads ``fsdp_version`` (must be 2), ``fsdp_reshard_after_forward``
  and ``fsdp_transformer_layer_cls_to_wrap``. ``bf16`` is FSDP2's ``MixedPrecisionPolicy`` (bf16
  parameters in compute, fp32 gradient reduction); fp16 is refused (it needs a sharded gradient
  scaler). Gradients are reduce-scattered on every micro-batch (``accelerator.no_sync`` finds no
  ``no_sync`` on a module accelerate did not wrap): skipping the sync would keep a full, unsharded
  copy of the gradients on every rank, the memory FSDP exists to save.
* **DeepSpeed**: accelerate's DeepSpeed plugin, built by ctrltok from ``train.deepspeed`` or the
  launch config's JSON. ctrltok has no torch ``DataLoader`` (each rank reads its rows of a step by
  :func:`ctrltok.data.loader.rank_rows`), so the JSON's ``"auto"`` values are filled from the recipe
  before ``accelerator.prepare`` (:func:`resolve_deepspeed_config`: micro-batch, accumulation,
  global batch, clipping, precision, bucket sizes), and an explicit value that contradicts the
  recipe is an error. accelerate's ``backward`` tells the engine where each step ends; the engine
  clips and steps. ZeRO-3 gathers the weights for the final save
  (``stage3_gather_16bit_weights_on_model_save``, turned on). On a machine without a GPU,
  accelerate 1.15 runs DeepSpeed only with ``cpu=False`` and then finds no process group
  (``state.py``'s ``_prepare_backend`` picks no backend without an accelerator): one process runs
  there, on DeepSpeed's CPU accelerator (tested); more processes need GPUs.

Sharded engines (FSDP2, ZeRO-3) hold each parameter in pieces, so every rank takes part in the
held-out forwards (in lockstep, the same batches) and in gathering the full state dict at the end;
the main process loads it into a freshly built, unsharded LossModel and saves that one
(:func:`gathered`). Checkpoints are :mod:`ctrltok.training.checkpoint`'s.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, broadcast_object_list
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers.integrations import unset_hf_deepspeed_config

from ctrltok.core.config import ConfigError, Recipe
from ctrltok.core.loss import base_model

PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
FSDP_ENV = "ACCELERATE_USE_FSDP"
DEEPSPEED_ENV = "ACCELERATE_USE_DEEPSPEED"


@dataclass
class Engine:
    """A run's engine: the strategy, its Accelerator, and what the strategy was configured with."""

    strategy: str
    accelerator: Accelerator
    recipe: Recipe
    fsdp: dict[str, Any] = field(default_factory=dict)  # reshard_after_forward, layer_classes, bf16
    deepspeed_config: dict[str, Any] | None = None  # the plugin's config, "auto" resolved at prepare

    @property
    def zero_stage(self) -> int | None:
        if self.deepspeed_config is None:
            return None
        return int(self.deepspeed_config.get("zero_optimization", {}).get("stage", 0))

    @property
    def sharded(self) -> bool:
        """Parameters live in pieces across ranks: evaluation and the final gather need every rank."""
        return self.strategy == "fsdp2" or self.zero_stage == 3

    @property
    def name(self) -> str:
        return f"deepspeed-zero{self.zero_stage}" if self.strategy == "deepspeed" else self.strategy


# -- which engine -------------------------------------------------------------------------------
def _flag(env: Mapping[str, str], key: str) -> bool:
    return env.get(key, "").strip().lower() in ("1", "true", "yes")


def launcher_strategy(env: Mapping[str, str]) -> tuple[str | None, dict[str, Any]]:
    """The engine an ``accelerate launch --config_file`` asked for, and its options (None: it named none)."""
    if _flag(env, DEEPSPEED_ENV):
        path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
        return "deepspeed", {"config": None if path in ("", "none") else path,
                             "stage": int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))}
    if _flag(env, FSDP_ENV):
        version = env.get("FSDP_VERSION", "1")
        if version != "2":
            raise ConfigError(f"the accelerate launch config asks for FSDP version {version}; ctrltok runs FSDP2 only "
                              "(set fsdp_version: 2, as recipes/accelerate/fsdp2.yaml does)")
        classes = env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
        return "fsdp2", {"reshard_after_forward": env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false",
                         "layer_classes": [c.strip() for c in classes.split(",") if c.strip()]}
    return None, {}


def resolve_strategy(recipe: Recipe, env: Mapping[str, str]) -> tuple[str, dict[str, Any]]:
    """``train.strategy`` or the launcher's choice (which must agree when the recipe names one)."""
    launched, options = launcher_strategy(env)
    chosen = recipe.train.strategy
    if launched is None:
        return chosen, {"reshard_after_forward": True, "layer_classes": []} if chosen == "fsdp2" else {}
    if chosen not in ("ddp", launched):
        raise ConfigError(f"{recipe.source}: train.strategy = {chosen!r} but the accelerate launch config asks for "
                          f"{launched}; use one of them (drop train.strategy, or launch without that config)")
    if launched == "fsdp2" and recipe.train.precision == "fp16":
        raise ConfigError(f"{recipe.source}: FSDP2 with train.precision = fp16 needs a sharded gradient scaler, which "
                          "ctrltok does not run; use bf16 (or fp32)")
    return launched, options


# -- DeepSpeed configuration --------------------------------------------------------------------
def _deepspeed_path(recipe: Recipe, path: str) -> Path:
    """A DeepSpeed JSON path as given (from the working directory), else beside the recipe file."""
    candidates = [Path(path), Path(recipe.source).parent / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{recipe.source}: the DeepSpeed config {path} does not exist (looked for "
                      f"{', '.join(str(c) for c in candidates)})")


def read_deepspeed_config(recipe: Recipe, launcher: dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed JSON of the launch config or ``train.deepspeed`` (the same file when both name one);
    a launch config that gives only a ZeRO stage gets a config of "auto" values with that stage."""
    given = [p for p in (launcher.get("config"), recipe.train.deepspeed) if p]
    paths = {_deepspeed_path(recipe, p).resolve() for p in given}
    if len(paths) > 1:
        raise ConfigError(f"{recipe.source}: train.deepspeed ({recipe.train.deepspeed}) and the accelerate launch "
                          f"config's deepspeed_config_file ({launcher['config']}) differ; name one")
    if not paths:
        if "stage" not in launcher:
            raise ConfigError(f"{recipe.source}: train.strategy = deepspeed needs a DeepSpeed JSON: train.deepspeed "
                              "(recipes/deepspeed/zero2.json) or accelerate launch --config_file "
                              "recipes/accelerate/deepspeed-zero2.yaml")
        return {"zero_optimization": {"stage": launcher["stage"]}}
    path = paths.pop()
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict) or not isinstance(config.get("zero_optimization"), dict):
        raise ConfigError(f"{path}: a DeepSpeed config needs a zero_optimization section")
    return config


def _fill(config: dict, dotted: str, value: Any, source: str) -> None:
    """Set ``dotted`` when missing or "auto"; an explicit value must equal the recipe's."""
    *parents, key = dotted.split(".")
    node = config
    for p in parents:
        node = node.setdefault(p, {})
    have = node.get(key, "auto")
    if have == "auto":
        node[key] = value
    elif have != value and not (isinstance(have, (int, float)) and isinstance(value, (int, float))
                                and float(have) == float(value)):
        raise ConfigError(f"{source}: {dotted} = {have!r} but the recipe gives {value!r}; set it to \"auto\" (ctrltok "
                          "fills it from the recipe) or change the recipe")


def resolve_deepspeed_config(config: dict[str, Any], recipe: Recipe, world: int,
                             hidden_size: int | None = None, source: str = "DeepSpeed config") -> dict[str, Any]:
    """``config`` with its "auto" values filled from the recipe (a new dict; idempotent).

    Batch sizes: the recipe's ``micro_batch_size`` rows per forward, ``grad_accum`` forwards per step,
    ``world`` processes; clipping: ``max_grad_norm``; precision: ``train.precision``; the bucket sizes
    accelerate would derive from ``model.config`` (which a LossModel does not have) from
    ``hidden_size``. ctrltok brings its own optimizer and scheduler, so the config must not name one.
    ZeRO-3 gathers the weights for the final save.
    """
    out = json.loads(json.dumps(config))
    for own in ("optimizer", "scheduler"):
        if own in out:
            raise ConfigError(f"{source}: remove its {own!r} section; ctrltok builds the {own} from the recipe "
                              f"(train.lr, train.scheduler, ...)")
    t = recipe.train
    _fill(out, "train_micro_batch_size_per_gpu", t.micro_batch_size, source)
    _fill(out, "gradient_accumulation_steps", t.grad_accum, source)
    _fill(out, "train_batch_size", t.micro_batch_size * t.grad_accum * world, source)
    _fill(out, "gradient_clipping", float(t.max_grad_norm), source)
    for kind in ("fp16", "bf16"):
        _fill(out, f"{kind}.enabled", t.precision == kind, source)
    zero = out["zero_optimization"]
    if int(zero.get("stage", 0)) == 3:
        if zero.get("stage3_gather_16bit_weights_on_model_save") is False:
            raise ConfigError(f"{source}: zero_optimization.stage3_gather_16bit_weights_on_model_save is false, but "
                              "ctrltok gathers the ZeRO-3 weights once to save the final model; set it to true")
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if hidden_size:
        for key, value in (("reduce_bucket_size", hidden_size * hidden_size),
                           ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
                           ("stage3_param_persistence_threshold", 10 * hidden_size)):
            if zero.get(key) == "auto":
                zero[key] = value
    return out


# -- the Accelerator ----------------------------------------------------------------------------
@contextmanager
def _hidden(*keys: str):
    saved = {k: os.environ.pop(k) for k in keys if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deepspeed_plugin(recipe: Recipe, launcher: dict[str, Any]) -> DeepSpeedPlugin:
    """accelerate's DeepSpeed plugin over the resolved JSON (one CPU process gets its process group here)."""
    try:
        import deepspeed  # noqa: F401  (optional: only DeepSpeed runs need it)
    except ImportError as exc:
        raise ConfigError(f"{recipe.source}: train.strategy = deepspeed needs the deepspeed package "
                          f"(pip install deepspeed): {exc}") from exc
    if not torch.cuda.is_available():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            raise ConfigError(f"{recipe.source}: DeepSpeed on a machine without a GPU runs one process only (accelerate "
                              f"1.15 gives it no process group there); this launch has {world}. Use "
                              "train.strategy: fsdp2 or ddp on CPU, DeepSpeed on GPUs")
        if "RANK" not in os.environ:  # DeepSpeed wants a process group even for one process (else it tries MPI)
            os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})
    source = recipe.train.deepspeed or launcher.get("config") or "the launch config"
    config = resolve_deepspeed_config(read_deepspeed_config(recipe, launcher), recipe,
                                      int(os.environ.get("WORLD_SIZE", "1")), source=str(source))
    # zero3_init_flag off: ctrltok loads the full model, adds its token rows, then the engine partitions it.
    return DeepSpeedPlugin(hf_ds_config=config, gradient_accumulation_steps=recipe.train.grad_accum,
                           gradient_clipping=float(recipe.train.max_grad_norm), zero3_init_flag=False)


def make_engine(recipe: Recipe, out_dir: str | Path, env: Mapping[str, str] | None = None) -> Engine:
    """The run's Accelerator, set up for the strategy the recipe and the launcher ask for."""
    strategy, options = resolve_strategy(recipe, os.environ if env is None else env)
    t = recipe.train
    kwargs = dict(log_with=t.report_to or None, project_dir=str(out_dir), gradient_accumulation_steps=t.grad_accum,
                  mixed_precision=PRECISION[t.precision], cpu=not torch.cuda.is_available())
    if strategy == "deepspeed":
        plugin = _deepspeed_plugin(recipe, options)
        accelerator = Accelerator(**{**kwargs, "cpu": False}, deepspeed_plugin=plugin)
        return Engine(strategy, accelerator, recipe, deepspeed_config=plugin.deepspeed_config)
    if strategy == "fsdp2":  # FSDP2's own MixedPrecisionPolicy, not autocast; see the module docstring
        with _hidden(FSDP_ENV):
            accelerator = Accelerator(**{**kwargs, "mixed_precision": "no"})
        return Engine(strategy, accelerator, recipe, fsdp={**options, "bf16": t.precision == "bf16"})
    return Engine(strategy, Accelerator(**kwargs), recipe)


# -- wrapping -----------------------------------------------------------------------------------
@contextmanager
def whole_model(engine: Engine):
    """Load and build the model whole. Under ZeRO-3, transformers reads accelerate's DeepSpeed config
    and would load the weights already partitioned (``zero.Init``), before ctrltok adds its token
    rows and LoRA; the config is hidden meanwhile, and the engine partitions the model at prepare."""
    if engine.zero_stage != 3:
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        engine.accelerator.state.deepspeed_plugin.set_deepspeed_weakref()  # PEFT and transformers see ZeRO-3 again


def decoder_layers(module: torch.nn.Module, classes: list[str]) -> list[torch.nn.Module]:
    """The modules FSDP2 shards one by one: ``classes`` (class names), else the model's ``_no_split_modules``."""
    names = set(classes) or set(getattr(base_model(module.model), "_no_split_modules", None) or [])
    return [m for m in module.modules() if type(m).__name__ in names]


def shard(engine: Engine, loss_model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` every decoder layer, then the root (in place). Other engines: unchanged.
    Build the optimizer after this: sharding replaces the parameters."""
    if engine.strategy != "fsdp2":
        return loss_model
    acc = engine.accelerator
    mesh = init_device_mesh(acc.device.type, (acc.num_processes,))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if engine.fsdp.get("bf16") else MixedPrecisionPolicy())
    layers = decoder_layers(loss_model, engine.fsdp.get("layer_classes", []))
    if not layers:
        raise ConfigError("FSDP2: found no decoder layers to shard (the model names no _no_split_modules); set "
                          "fsdp_transformer_layer_cls_to_wrap in the accelerate launch config")
    reshard = engine.fsdp.get("reshard_after_forward", True)
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
    fully_shard(loss_model, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
    return loss_model


def prepare(engine: Engine, loss_model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """DDP and DeepSpeed: ``accelerator.prepare`` (DeepSpeed's "auto" values filled first). FSDP2:
    already sharded by :func:`shard`; nothing more to wrap."""
    acc = engine.accelerator
    if engine.strategy == "fsdp2":
        return loss_model, optimizer
    if engine.strategy == "deepspeed":
        hidden = getattr(base_model(loss_model.model).config, "hidden_size", None)
        resolved = resolve_deepspeed_config(engine.deepspeed_config, engine.recipe, acc.num_processes, hidden)
        engine.deepspeed_config.clear()
        engine.deepspeed_config.update(resolved)  # the plugin's own dict, read by accelerator.prepare
    return acc.prepare(loss_model, optimizer)


def grad_norm(engine: Engine, loss_model: torch.nn.Module, max_norm: float) -> float | None:
    """Clip to ``max_norm`` and return the total norm before clipping (DeepSpeed: the engine clipped
    inside its step; its norm). None when clipping is off."""
    if not max_norm:
        return None
    norm = engine.accelerator.clip_grad_norm_(loss_model.parameters(), max_norm)
    if norm is None:
        return None
    if hasattr(norm, "full_tensor"):  # FSDP2: a replicated DTensor
        norm = norm.full_tensor()
    return float(norm)


# -- evaluation and the final model -------------------------------------------------------------
def eval_module(engine: Engine, loss_model: torch.nn.Module) -> torch.nn.Module | None:
    """What runs the held-out forwards on this rank: the unwrapped module on the main process (DDP,
    ZeRO-2: a DDP forward on one rank alone would wait for the others), the sharded module on every
    rank (FSDP2, ZeRO-3: each forward gathers parameters from all ranks). None: this rank sits out."""
    if engine.sharded:
        return engine.accelerator.unwrap_model(loss_model)
    return engine.accelerator.unwrap_model(loss_model) if engine.accelerator.is_main_process else None


def gathered(engine: Engine, loss_model: torch.nn.Module, rebuild: Callable[[], torch.nn.Module]):
    """The trained LossModel with whole tensors, on the main process (None on the others).

    DDP, ZeRO-2, one process: the unwrapped module itself. FSDP2 and ZeRO-3: every rank takes part in
    gathering the full state dict (FSDP2: DCP's ``get_model_state_dict(full_state_dict=True)``;
    ZeRO-3: ``accelerator.get_state_dict``), which the main process loads into ``rebuild()``, a
    fresh unsharded LossModel of the same structure.
    """
    acc = engine.accelerator
    if not engine.sharded:
        return acc.unwrap_model(loss_model) if acc.is_main_process else None
    if engine.strategy == "fsdp2":
        state = get_model_state_dict(loss_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = acc.get_state_dict(loss_model)
    if not acc.is_main_process:
        return None
    with whole_model(engine):
        plain = rebuild()
    plain.load_state_dict(state, strict=True)  # 16-bit ZeRO-3 tensors are cast to the model's dtype
    return plain


def check_shared_output(accelerator: Accelerator, out_dir: Path) -> None:
    """Checkpoints are written by every rank into one folder and renamed by the main process: every
    node must see the same ``out_dir``. A file the main process writes must be visible to all."""
    if accelerator.num_processes == 1:
        return
    token = [uuid.uuid4().hex if accelerator.is_main_process else None]
    broadcast_object_list(token)
    marker = Path(out_dir) / f".shared-{token[0]}"
    if accelerator.is_main_process:
        marker.write_text("")
    accelerator.wait_for_everyone()
    seen = torch.tensor([1.0 if marker.exists() else 0.0], device=accelerator.device)
    missing = accelerator.num_processes - int(accelerator.reduce(seen, "sum").item())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        marker.unlink(missing_ok=True)
    if missing:
        raise ConfigError(f"{out_dir}: {missing} of {accelerator.num_processes} processes do not see the main "
                          "process's files there; checkpoints need --out on a filesystem every node shares (NFS, "
                          "Lustre, a mounted bucket), or train.save_every: 0")
