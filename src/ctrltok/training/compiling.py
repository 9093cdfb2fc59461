"""Regional ``torch.compile`` of a decoder's layers for training (``train.compile: true``).

What is compiled. In every decoder layer, each child module except the attention: for Llama-
shaped models that is the MLP (gate/up/down projections and the SwiGLU product) and the two
RMSNorms. Attention stays eager because it is where ctrltok's masks live: the per-document path
(``ctrltok_varlen``) cuts each row by data-dependent document lengths, which a compiled graph would
either break on or recompile for at every new set of lengths. What inductor buys here is fusion of
the elementwise chains around the matrix products (norm, scale, SiLU, product, and their backward),
which run as separate passes over memory in eager mode (the gain, measured interleaved against
eager on the same rows, is in ``bench/README.md``).

Why per module and not the whole model. All layers share one compiled graph (torch inlines
``nn.Module`` instances, so layer 7's MLP reuses layer 0's code with its own weights): one
compilation, once per process and grad mode (training, then no-grad eval).
Shapes are compiled dynamic, so rows of any length reuse it.

What it leaves alone. Only the bound ``forward`` of each module is replaced, as an instance
attribute; parameters, names and the ``state_dict`` are untouched, so checkpoints, resume and
the saved model are the same as without it. :func:`uncompile_blocks` removes the attribute again
(``save_final`` calls it before merging LoRA and saving).

Use::

    reason = compile_unavailable()        # None when inductor works here
    n = compile_blocks(model)             # the number of modules compiled
    ...train...
    uncompile_blocks(model)
"""

from __future__ import annotations

import functools

import torch

_MARK = "_ctrltok_compiled"


@functools.cache
def compile_unavailable() -> str | None:
    """None when ``torch.compile`` (inductor) compiles and runs a small function in this process,
    else the reason (for example no C++ compiler on a CPU-only machine). Checked once per process."""
    try:
        fn = torch.compile(lambda x: torch.nn.functional.silu(x) * x + 1.0, dynamic=False)
        x = torch.linspace(-1.0, 1.0, 8)
        if not torch.allclose(fn(x), torch.nn.functional.silu(x) * x + 1.0):
            return "a compiled probe function gave a different result than eager"
    except Exception as exc:  # noqa: BLE001 - any failure means "do not compile", with the reason shown
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return None


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a causal LM (PEFT-wrapped or not): ``get_decoder().layers``."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = core.get_decoder() if hasattr(core, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"{type(core).__name__} exposes no decoder layers (get_decoder().layers) to compile; "
                         "set train.compile: false")
    return list(layers)


def compile_blocks(model: torch.nn.Module) -> int:
    """Compile every non-attention child of every decoder layer in place; returns how many."""
    n = 0
    for layer in decoder_layers(model):
        for child in layer.children():
            if "Attention" in type(child).__name__ or getattr(child, _MARK, False):
                continue
            if not any(True for _ in child.parameters()):
                continue  # parameter-free helpers (rotary tables, dropout) gain nothing
            child.forward = torch.compile(child.forward, dynamic=True)
            setattr(child, _MARK, True)
            n += 1
    return n


def uncompile_blocks(model: torch.nn.Module) -> int:
    """Undo :func:`compile_blocks`: the modules' class ``forward`` is used again; returns how many."""
    n = 0
    for module in model.modules():
        if module.__dict__.get(_MARK):
            del module.forward
            del module.__dict__[_MARK]
            n += 1
    return n
