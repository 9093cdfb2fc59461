"""Auxiliary heads at chosen tokens: EPE's constitution head (seed 000).

A :class:`ConstitutionHead` is one linear layer from the model's final hidden state (after the
final norm, what the LM head reads) to one logit per charter item. It is trained with a
multi-label binary cross-entropy at the ``<assistant>`` positions that the encoders record in
``Example.head_positions`` and ``packing.collate`` gathers into ``Batch.head_index``. The loss
model (:mod:`ctrltok.core.loss`) adds it to the LM loss, for training and every held-out loss::

    loss = ce_sum / n_targets + head_weight * constitution_loss(head, hidden, index, targets, "sum") / n_head

It is saved *beside* a checkpoint, never inside the model's weights, so the Hugging Face model
still loads with plain ``transformers``::

    out/model.safetensors, config.json, ...   # the plain HF model
    out/constitution_head.safetensors          # weight [C, H], bias [C]
    out/constitution_head.json                 # {"hidden_size": H, "labels": [charter ids], ...}

Readout: :func:`ctrltok.evaluation.epe.read_constitution` returns, for each assistant turn,
``{charter id: probability}`` read at the ``<assistant>`` token that opens it; ``ctrltok
constitution --model DIR --input chats.jsonl [--json]`` prints them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS = "constitution_head.safetensors"
CONFIG = "constitution_head.json"
FORMAT = 1


class ConstitutionHead(nn.Module):
    """A linear multi-label head: hidden state ``[..., H]`` -> logits ``[..., C]``."""

    def __init__(self, hidden_size: int, n_labels: int = 35, labels: list[str] | None = None):
        super().__init__()
        if labels is not None and len(labels) != n_labels:
            raise ValueError(f"{len(labels)} labels for a head with {n_labels} outputs")
        self.hidden_size = hidden_size
        self.n_labels = n_labels
        self.labels = list(labels) if labels is not None else [str(i) for i in range(n_labels)]
        self.proj = nn.Linear(hidden_size, n_labels)
        # Small weights and a zero bias: every item starts at probability 0.5 with a gentle gradient.
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.to(self.proj.weight.dtype))


def constitution_loss(
    head: ConstitutionHead,
    hidden: torch.Tensor,
    head_index: torch.Tensor,
    head_targets: torch.Tensor,
    reduction: str = "mean",
) -> torch.Tensor:
    """BCE of the head at ``head_index`` (``[K, 2]`` rows/cols into ``hidden [B, T, H]``).

    ``reduction="mean"`` averages over positions and labels; ``"sum"`` sums over positions and
    averages over labels (for normalising across gradient accumulation by the number of positions).
    With no head position the loss is a zero that still depends on the head (a complete graph for DDP).
    """
    if head_index.numel() == 0:
        return 0.0 * sum(p.sum() for p in head.parameters())
    h = hidden[head_index[:, 0], head_index[:, 1]]
    logits = head(h.float())
    per_pos = F.binary_cross_entropy_with_logits(logits, head_targets.to(logits), reduction="none").mean(dim=1)
    if reduction == "mean":
        return per_pos.mean()
    if reduction == "sum":
        return per_pos.sum()
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def save_head(head: ConstitutionHead, out_dir: str | Path, labels: list[str] | None = None) -> Path:
    """Write the head beside a checkpoint (``constitution_head.safetensors`` + ``.json``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = list(labels) if labels is not None else head.labels
    if len(labels) != head.n_labels:
        raise ValueError(f"{len(labels)} labels for a head with {head.n_labels} outputs")
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in head.proj.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS), metadata={"format": str(FORMAT)})
    config = {"format": FORMAT, "kind": "constitution", "hidden_size": head.hidden_size, "n_labels": head.n_labels,
              "labels": labels}
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out / WEIGHTS


def has_head(model_dir: str | Path) -> bool:
    return (Path(model_dir) / WEIGHTS).exists() and (Path(model_dir) / CONFIG).exists()


def load_head(model_dir: str | Path) -> ConstitutionHead:
    """Read the head saved beside a checkpoint by :func:`save_head`."""
    d = Path(model_dir)
    if not has_head(d):
        raise FileNotFoundError(
            f"{d}: no constitution head ({WEIGHTS} + {CONFIG}); it is written by an `epe` training run"
        )
    try:
        config = json.loads((d / CONFIG).read_text(encoding="utf-8"))
        hidden, labels = int(config["hidden_size"]), [str(x) for x in config["labels"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{d / CONFIG}: expected hidden_size and labels ({exc})") from exc
    head = ConstitutionHead(hidden, len(labels), labels)
    state = load_file(str(d / WEIGHTS))
    expected = {"weight": (len(labels), hidden), "bias": (len(labels),)}
    for key, shape in expected.items():
        if key not in state or tuple(state[key].shape) != shape:
            found = None if key not in state else tuple(state[key].shape)
            raise ValueError(f"{d / WEIGHTS}: `{key}` should have shape {shape} per {CONFIG}, found {found}")
    head.proj.load_state_dict(state)
    return head.eval()
