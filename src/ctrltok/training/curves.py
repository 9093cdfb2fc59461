"""The loss-curve PNG written beside a saved checkpoint (``loss_curves.png``), from ``metrics.jsonl``.

Drawn for a person reading it at a glance:

- train loss smoothed (a bias-corrected exponential moving average, its span printed in the legend)
  over the raw per-step values drawn faint;
- held-out loss as points where it was measured, never a line across the steps nobody measured;
- a learning-rate panel, with the supervised tokens on its second axis (cumulative when the
  records carry the per-step ``supervised_tokens`` count, else the ``supervised_tokens_per_s``
  throughput the loop logs);
- a note in the legend when the held-out loss sits below the train loss from step 0, before any
  update: the held-out set is small and easier than the training rows, not a bug;
- the constitution head's BCE in its own panel when the run has one (EPE).

:func:`curves_figure` builds the matplotlib :class:`~matplotlib.figure.Figure` (object API: Agg,
no global state; tests inspect its axes), :func:`plot_curves` writes it as a PNG.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from matplotlib.figure import Figure

TRAIN, EVAL, LR, TOKENS, HEAD = "tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:red"
NOTE_EASY_HELDOUT = ("held-out loss is below train loss from step 0, before any update: the held-out set is small "
                     "and easier than the training rows (not overfitting, not a bug)")


def read_metrics(metrics_jsonl: Path) -> list[dict]:
    """The metric records of a run; a torn last line (a killed run) is ignored."""
    out = []
    try:
        lines = Path(metrics_jsonl).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "event" not in rec and isinstance(rec.get("step"), (int, float)):
            out.append(rec)
    return out


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(float(r["step"]), float(r[key])) for r in records
           if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return [p[0] for p in pts], [p[1] for p in pts]


def smoothing_span(n: int) -> int:
    """The EMA span (in logged points) for a series of ``n``: about an eighth of the run, 2 to 50."""
    return min(50, max(2, n // 8))


def smooth(values: list[float], span: int) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard draws it): the first points are
    not pulled towards zero."""
    alpha = 2.0 / (span + 1)
    out, mean, weight = [], 0.0, 0.0
    for v in values:
        mean = (1 - alpha) * mean + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(mean / weight)
    return out


def heldout_easier(loss: tuple[list[float], list[float]], eval_loss: tuple[list[float], list[float]]) -> bool:
    """Whether the held-out loss sits below the train loss from step 0: measured before the first
    logged train step, already lower than it, and lower than the smoothed train loss wherever both exist."""
    if not loss[0] or not eval_loss[0] or eval_loss[0][0] > loss[0][0]:
        return False
    if eval_loss[1][0] >= loss[1][0]:
        return False
    smoothed = smooth(loss[1], smoothing_span(len(loss[1])))
    for step, value in zip(*eval_loss):
        before = [s for s, x in zip(loss[0], smoothed) if x is not None and s <= step]
        if before and value >= smoothed[len(before) - 1]:
            return False
    return True


def _train_lines(ax, series: tuple[list[float], list[float]], color: str, what: str) -> None:
    steps, values = series
    span = smoothing_span(len(values))
    ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8, label=f"{what}, per step")
    ax.plot(steps, smooth(values, span), color=color, linewidth=2.0, label=f"{what}, smoothed (EMA, span {span})")


def _eval_points(ax, series: tuple[list[float], list[float]], color: str, what: str) -> None:
    steps, values = series
    ax.plot(steps, values, linestyle="none", marker="o", markersize=6, color=color, label=f"{what} (where measured)")
    if len(values) <= 12:
        for s, v in zip(steps, values):
            ax.annotate(f"{v:.3g}", (s, v), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=7,
                        color=color)


def curves_figure(records: list[dict]) -> Figure | None:
    """The figure for a run's metric records, or None when they hold no loss to plot.

    Axes by label: ``loss`` (train raw + smoothed, held-out points), ``lr`` (learning rate),
    ``tokens`` (its twin: supervised tokens, when logged), ``head`` (constitution head BCE, EPE runs only)."""
    loss, eval_loss = _series(records, "loss"), _series(records, "eval_loss")
    head, eval_head = _series(records, "head_bce"), _series(records, "eval_head_bce")
    lr = _series(records, "lr")
    if not loss[0] and not eval_loss[0]:
        return None
    per_step = _series(records, "supervised_tokens")
    if per_step[0]:
        total, cumulative = 0.0, []
        for v in per_step[1]:
            total += v
            cumulative.append(total)
        tokens, tokens_label = (per_step[0], cumulative), "supervised tokens (cumulative)"
    else:
        tokens, tokens_label = _series(records, "supervised_tokens_per_s"), "supervised tokens / s"
    has_head = bool(head[0] or eval_head[0])
    mosaic = [["loss", "head"], ["lr", "head"]] if has_head else [["loss"], ["lr"]]
    fig = Figure(figsize=(6.8 * (2 if has_head else 1), 6.4), layout="constrained")
    axes = fig.subplot_mosaic(mosaic, height_ratios=[3, 2], sharex=False)

    ax = axes["loss"]
    ax.set_label("loss")
    if loss[0]:
        _train_lines(ax, loss, TRAIN, "train loss")
    if eval_loss[0]:
        _eval_points(ax, eval_loss, EVAL, "held-out loss")
    ax.set(ylabel="cross-entropy per supervised token", title="language-model loss")
    ax.margins(y=0.12)  # room for the held-out values printed above their points
    ax.grid(alpha=0.3)
    note = NOTE_EASY_HELDOUT if heldout_easier(loss, eval_loss) else None
    legend = ax.legend(fontsize=8, title="\n".join(textwrap.wrap(note, 58)) if note else None, title_fontsize=7)
    legend.set_label("loss legend")

    bx = axes["lr"]
    bx.set_label("lr")
    bx.sharex(ax)
    handles = []
    if lr[0]:
        handles += bx.plot(*lr, color=LR, linewidth=1.5, label="learning rate")
    else:
        bx.text(0.5, 0.5, "no learning rate logged", transform=bx.transAxes, ha="center", va="center", fontsize=8)
    bx.set(xlabel="optimizer step", ylabel="learning rate", title="learning rate and supervised tokens")
    bx.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    bx.grid(alpha=0.3)
    if tokens[0]:
        tx = bx.twinx()
        tx.set_label("tokens")
        handles += tx.plot(*tokens, color=TOKENS, linewidth=1.2, linestyle="--", label=tokens_label)
        tx.set_ylabel(tokens_label)
    if handles:
        bx.legend(handles=handles, labels=[h.get_label() for h in handles], fontsize=8, loc="best")
    ax.set_xlabel("optimizer step")

    if has_head:
        hx = axes["head"]
        hx.set_label("head")
        if head[0]:
            _train_lines(hx, head, HEAD, "train head BCE")
        if eval_head[0]:
            _eval_points(hx, eval_head, EVAL, "held-out head BCE")
        hx.set(xlabel="optimizer step", ylabel="BCE per head position", title="constitution head")
        hx.margins(y=0.12)
        hx.grid(alpha=0.3)
        hx.legend(fontsize=8)
    return fig


def plot_curves(metrics_jsonl: Path, png: Path) -> Path | None:
    """Write the loss curves of ``metrics_jsonl`` to ``png`` (see :func:`curves_figure`); None, and
    no file, when the metrics hold nothing to plot."""
    fig = curves_figure(read_metrics(metrics_jsonl))
    if fig is None:
        return None
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100, format="png")
    return png
