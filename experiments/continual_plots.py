"""Plots of the continual-learning sweep (``experiments/continual_sweep.py``): PNG + TensorBoard.

Input is the sweep's summary: one dict per (method, λ) with the mean and ``*_std`` over seeds of
``acc`` and ``retention`` (definition: ``nl_lightning.metrics.continual``); methods
that do not take λ have ``lam=None``. The use-case presets carry their own λ (``PRESET_LAMBDA``)
and are drawn at it.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# λ = reg of the NestedOptimizer presets (nl_lightning/optim/presets.py), for placing them on the λ axis.
PRESET_LAMBDA = {"adaptability": 0.1, "balanced": 3.0, "retention": 10.0}
UPPER_BOUND = "joint"  # all tasks at once: a reference line, not a continual method


def _ok(summary: list[dict]) -> list[dict]:
    return [e for e in summary if not math.isnan(e["acc"])]


# Fixed colours so every plot (and the docs) shows a method in the same colour.
COLORS = {
    "finetune": "#555555", "replay": "#2ca02c", "ewc": "#8c564b", "si": "#bcbd22", "google3": "#1f77b4",
    "collab5": "#d62728", "collab5_adjacent": "#ff7f0e", "collab5_fixed": "#9467bd", "cms": "#17becf",
    "adaptability": "#e377c2", "balanced": "#7f3f98", "retention": "#000080", "joint": "#000000",
}


def _colors(methods: list[str]) -> dict[str, str]:
    spare = iter(plt.get_cmap("tab10").colors)
    return {m: COLORS.get(m) or next(spare, "#999999") for m in methods}


def plot_accuracy_vs_lambda(summary: list[dict], path: Path, title: str = "") -> Path:
    """Final average accuracy vs λ (log axis), mean ± std over seeds; λ-free methods as bands."""
    entries = _ok(summary)
    methods = list(dict.fromkeys(e["method"] for e in entries))
    colors = _colors(methods)
    lambdas = sorted({e["lam"] for e in entries if e["lam"] is not None}) or [0.1, 20.0]
    span = [min(lambdas + [0.1]) / 1.3, max(lambdas + [20.0]) * 1.3]
    figure, axes = plt.subplots(figsize=(9.5, 5), dpi=100)
    for method in methods:
        mine = [e for e in entries if e["method"] == method]
        color = colors[method]
        if mine[0]["lam"] is not None:
            mine.sort(key=lambda e: e["lam"])
            axes.errorbar([e["lam"] for e in mine], [e["acc"] for e in mine],
                          yerr=[e["acc_std"] for e in mine], marker="o", capsize=3, color=color, label=method)
        elif method in PRESET_LAMBDA:
            e = mine[0]
            axes.errorbar([PRESET_LAMBDA[method]], [e["acc"]], yerr=[e["acc_std"]],
                          marker="*", markersize=12, capsize=3, linestyle="none", color=color,
                          label=f"{method} preset (λ={PRESET_LAMBDA[method]:g})")
        else:
            e = mine[0]
            mean, std = e["acc"], e["acc_std"]
            axes.axhline(mean, color=color, linestyle="--", label=f"{method} (no λ)")
            axes.axhspan(mean - std, mean + std, color=color, alpha=0.12)
    axes.set_xscale("log")
    axes.set_xlim(*span)
    axes.set_xlabel("regularisation strength λ (NestedOptimizer reg; EWC / SI penalty strength)")
    axes.set_ylabel("final average accuracy over all tasks")
    axes.set_title(f"Accuracy vs λ (mean ± std over seeds){': ' + title if title else ''}")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Non-dominated (retention, accuracy) points (both maximised), sorted by retention."""
    return sorted({p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)})


def _staircase(front: list[tuple[float, float]], x_min: float):
    """x, y of the region a frontier dominates: up to retention r_i, accuracy a_i is reachable."""
    xs = [x_min] + [r for r, _ in front]
    ys = [front[0][1]] + [a for _, a in front]
    return xs, ys


def plot_pareto(summary: list[dict], path: Path, title: str = "") -> Path:
    """Accuracy–retention plane: every (method, λ) mean, the Pareto frontier of the continual
    methods, and the region it dominates shaded; google3's and collab5's own frontiers drawn to
    compare (seed 000's claim). The joint-training upper bound is drawn but stays off the frontier:
    it sees every task at once, so it would dominate everything and hide the trade-off."""
    entries = _ok(summary)
    methods = list(dict.fromkeys(e["method"] for e in entries))
    colors = _colors(methods)
    figure, axes = plt.subplots(figsize=(9.5, 5.5), dpi=100)
    points = [(e["retention"], e["acc"]) for e in entries if e["method"] != UPPER_BOUND]
    x_min = min(e["retention"] for e in entries) - 0.05  # the joint bound is drawn too
    front = pareto_front(points)
    xs, ys = _staircase(front, x_min)
    axes.fill_between(xs, ys, min(a for _, a in points) - 0.05, step="pre", color="0.6", alpha=0.25,
                      label="dominated by the frontier")
    axes.step(xs, ys, where="pre", color="black", linewidth=1.2, label="Pareto frontier (continual methods)")
    for method, style in (("google3", ":"), ("collab5", "-.")):
        mine = [(e["retention"], e["acc"]) for e in entries if e["method"] == method]
        if len(mine) > 1:
            own = pareto_front(mine)
            fx, fy = _staircase(own, x_min)
            axes.step(fx, fy, where="pre", color=colors[method], linestyle=style, linewidth=1.5,
                      label=f"{method} frontier")
    for method in methods:
        mine = [e for e in entries if e["method"] == method]
        axes.errorbar([e["retention"] for e in mine], [e["acc"] for e in mine],
                      xerr=[e["retention_std"] for e in mine], yerr=[e["acc_std"] for e in mine],
                      marker="*" if method in PRESET_LAMBDA else "o", markersize=11 if method in PRESET_LAMBDA else 5,
                      linestyle="none", capsize=2, elinewidth=0.6, color=colors[method], label=method)
        if method in PRESET_LAMBDA:
            axes.annotate(method, (mine[0]["retention"], mine[0]["acc"]), fontsize=8,
                          xytext=(5, 5), textcoords="offset points")
    axes.set_xlabel("retention  Σ_{j<T-1} R[T-1, j] / Σ_{j<T-1} R[j, j]")
    axes.set_ylabel("final average accuracy")
    axes.set_title(f"Accuracy–retention trade-off (means over seeds; bars: std){': ' + title if title else ''}")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def write_tensorboard(log_dir: Path, images: dict[str, Path], texts: dict[str, str]) -> None:
    """The PNGs as TensorBoard images (``continual_sweep/<name>``) and the tables as text."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    try:
        for name, png in images.items():
            pixels = plt.imread(png)[..., :3]
            writer.add_image(f"continual_sweep/{name}", np.asarray(pixels * 255, dtype=np.uint8), 0, dataformats="HWC")
        for name, text in texts.items():
            writer.add_text(f"continual_sweep/{name}", text, 0)
    finally:
        writer.close()
