"""Compute accounting, the log-linear scaling law fit, and its table and plot
(docs/method.md section 6).

Compute per question (FLOPs, multiply-add = 2 FLOPs), summed over the k candidates of a group:

    C = 2 * N * (generated tokens) + sprm_head_flops(D) * (scored steps)

N is the policy's matmul parameter count: every parameter except the input embedding table
(a lookup, no FLOPs) and the SPRM head (counted per scored step instead); the LM head counts
(a tied table counts once, as the head). This is the usual 2N-per-token forward estimate, as
in the paper's C ~ parameters x tokens: the attention score/value products over the context
(2 * 2 * L * T * H * head_dim per token at context T) are left out (about 5-15% more at the CPU
sweep's lengths). Prompt (prefill) tokens are not counted: the law relates accuracy to the
compute spent on *generated* (thinking) tokens.

The SPRM head counts once per scored step (a sampled step token): Linear(D, 2D) -> ReLU ->
Linear(2D, 1) is 2 * (D * 2D) + 2 * (2D * 1) = 4D^2 + 4D FLOPs; biases and the sigmoid are
left out. (The batched sampler evaluates the head on every row at every decode step and keeps
the step tokens' scores; the accounting counts the method's cost, not that padding.)

Pure numpy + matplotlib (Agg): no JAX.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from metastone_jax import files, optional


def sprm_head_flops(d_model: int) -> int:
    """FLOPs of one SPRM head evaluation (one scored step): 2*(D*2D) + 2*(2D*1) = 4D^2 + 4D."""
    if d_model < 1:
        raise ValueError(f"d_model must be >= 1, got {d_model}")
    return 2 * (d_model * 2 * d_model) + 2 * (2 * d_model * 1)


def question_compute(
    n_params: int, d_model: int, generated_tokens: Sequence[int] | int, scored_steps=0
) -> float:
    """FLOPs spent on one question: 2 * n_params * sum(generated_tokens) + sprm_head_flops(D) *
    sum(scored_steps). Pass per-candidate counts of the k candidates (or their sums).

    n_params: policy matmul parameters (module docstring: no input embedding, no SPRM head).
    """
    tokens = float(np.sum(generated_tokens))
    steps = float(np.sum(scored_steps))
    if n_params < 0 or tokens < 0 or steps < 0:
        raise ValueError(
            f"question_compute: counts must be >= 0, got n_params={n_params}, tokens={tokens}, "
            f"steps={steps}"
        )
    return 2.0 * n_params * tokens + float(sprm_head_flops(d_model)) * steps


class LawFit(NamedTuple):
    """accuracy = a * log10(compute) + b over n points; r2 = 1 - SS_res / SS_tot."""

    a: float
    b: float
    r2: float
    n: int

    def equation(self) -> str:
        sign = "+" if self.b >= 0 else "-"
        return f"acc = {self.a:.4f} log10(C) {sign} {abs(self.b):.4f} (R² = {self.r2:.3f})"


def fit_log_law(compute: Sequence[float], accuracy: Sequence[float]) -> LawFit:
    """Least squares of accuracy = a * log10(compute) + b.

    R^2 = 1 - SS_res / SS_tot. When every accuracy is equal (SS_tot = 0) the fitted line is
    that constant (a = 0), through every point, and r2 is 1.0. Raises ValueError with fewer
    than 2 distinct compute values, non-positive compute, or non-finite values.
    """
    c = np.asarray(compute, np.float64).ravel()
    y = np.asarray(accuracy, np.float64).ravel()
    if c.shape != y.shape:
        raise ValueError(f"fit_log_law: {c.size} compute values but {y.size} accuracies")
    if not (np.all(np.isfinite(c)) and np.all(np.isfinite(y))):
        raise ValueError("fit_log_law: compute and accuracy must be finite")
    if np.any(c <= 0):
        raise ValueError(f"fit_log_law: compute must be > 0 (log10), got min {c.min()}")
    if np.unique(c).size < 2:
        raise ValueError(
            f"fit_log_law: needs at least 2 distinct compute values, got {np.unique(c).size} "
            f"({c.size} points)"
        )
    x = np.log10(c)
    xm, ym = x.mean(), y.mean()
    a = float(np.sum((x - xm) * (y - ym)) / np.sum((x - xm) ** 2))
    b = float(ym - a * xm)
    ss_res = float(np.sum((y - (a * x + b)) ** 2))
    ss_tot = float(np.sum((y - ym) ** 2))
    r2 = 1.0 if ss_tot == 0.0 else 1.0 - ss_res / ss_tot
    return LawFit(a, b, r2, int(c.size))


def atomic_write(path: str, write) -> None:
    """Calls write(tmp_path) for a local temporary file that then becomes `path` (local or
    gs://; files.staged_file): no half-written file at `path`."""
    with files.staged_file(path) as tmp:
        write(tmp)


def _budget(p: Mapping) -> str:
    return "none" if p.get("budget") is None else str(p["budget"])


def format_table(points: Sequence[Mapping], fit: LawFit | None = None) -> str:
    """A markdown table of the points (sorted by size, budget, k) and the fit below it."""
    head = ("| point | params | k | budget | accuracy | random | pass@k | compute (FLOPs) "
            "| wall s / question | tokens / question |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for p in sort_points(points):
        lines.append(
            f"| {p['point_id']} | {p['n_params']:,} | {p['k']} | {_budget(p)} "
            f"| {p['accuracy']:.4f} | {p['random_accuracy']:.4f} | {p['pass_at_k']:.4f} "
            f"| {p['compute']:.4g} | {p['wall_s']:.4g} | {p['tokens']:.1f} |"
        )
    lines.append("")
    if fit is None:
        lines.append("fit: not enough points (needs at least 2 distinct compute values)")
    else:
        lines.append(f"fit over {fit.n} points: {fit.equation()}")
        lines.append(f"a = {fit.a!r}, b = {fit.b!r}, R^2 = {fit.r2!r}")
    return "\n".join(lines) + "\n"


def sort_points(points: Sequence[Mapping]) -> list[Mapping]:
    """By model size (parameters), then thinking budget (none first), then k."""

    def key(p):
        budget = p.get("budget")
        return (p["n_params"], p["size"], budget is not None, budget or 0, p["k"])

    return sorted(points, key=key)


def write_table(points: Sequence[Mapping], path: str, fit: LawFit | None = None) -> None:
    """Writes format_table(points, fit) to `path` (temporary name, then rename)."""
    text = format_table(points, fit)

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def plot_scaling(points: Sequence[Mapping], fit: LawFit | None, path: str) -> None:
    """PNG: accuracy vs compute per question (log x; one series per model size (colour and
    marker) and thinking budget (line style), each point annotated with its k; the fitted law
    with R^2 in the legend), and accuracy vs measured wall time per question."""
    plt = optional.pyplot(force=True)
    series: dict[tuple, list[Mapping]] = {}
    for p in sort_points(points):
        series.setdefault((p["size"], _budget(p)), []).append(p)
    sizes = list(dict.fromkeys(size for size, _ in series))
    budgets = list(dict.fromkeys(b for _, b in series))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, (ax_c, ax_t) = plt.subplots(1, 2, figsize=(13, 5))
    for (size, budget), pts in series.items():
        i, j = sizes.index(size), budgets.index(budget)
        style = dict(color=colors[i % len(colors)], marker="osD^v<>ph*"[i % 10],
                     linestyle=("-", "--", ":", "-.")[j % 4],
                     label=size if len(budgets) == 1 else f"{size}, budget {budget}")  # fmt: skip
        acc = [p["accuracy"] for p in pts]
        ax_c.plot([p["compute"] for p in pts], acc, **style)
        ax_t.plot([p["wall_s"] for p in pts], acc, **style)
        for p in pts:
            for ax, x in ((ax_c, p["compute"]), (ax_t, p["wall_s"])):
                ax.annotate(str(p["k"]), (x, p["accuracy"]), textcoords="offset points",
                            xytext=(3, 3), fontsize=6, color=style["color"])  # fmt: skip
    if fit is not None and points:
        c = np.array([p["compute"] for p in points], np.float64)
        xs = np.logspace(np.log10(c.min()), np.log10(c.max()), 50)
        ax_c.plot(xs, fit.a * np.log10(xs) + fit.b, "k--", label=f"fit: {fit.equation()}")
    ax_c.set_xscale("log")
    ax_c.set_xlabel("compute per question (FLOPs, k candidates)")
    ax_c.set_title("accuracy vs thinking compute (points labelled with k)")
    ax_t.set_xscale("log")
    ax_t.set_xlabel("measured sampling wall time per question (s, k candidates)")
    ax_t.set_title("accuracy vs wall time")
    for ax in (ax_c, ax_t):
        ax.set_ylabel("accuracy (SPRM best-of-k)")
        ax.grid(True, which="both", alpha=0.3)
        if points:
            ax.legend(fontsize=8)
    fig.tight_layout()

    def write(tmp):
        fig.savefig(tmp, format="png", dpi=110)

    try:
        atomic_write(path, write)
    finally:
        plt.close(fig)


def _fit_or_none(records: Sequence[Mapping]) -> LawFit | None:
    try:
        return fit_log_law([r["compute"] for r in records], [r["accuracy"] for r in records])
    except ValueError:
        return None


def _fit_json(fit: LawFit | None, n: int) -> dict:
    """a, b, r2 (None for NaN: strict JSON), n and the equation; all None without a fit."""
    if fit is None:
        return {"a": None, "b": None, "r2": None, "n": n, "equation": None}
    r2 = None if math.isnan(fit.r2) else fit.r2
    return {"a": fit.a, "b": fit.b, "r2": r2, "n": fit.n, "equation": fit.equation()}


def write_report(records: Sequence[Mapping], workdir: str) -> LawFit | None:
    """WORKDIR/table.md, scaling.png and fit.json (the fit over all records, and per size)
    over the point records; the fit is None with fewer than 2 distinct compute values."""
    fit = _fit_or_none(records)
    sizes = dict.fromkeys(r["size"] for r in records)
    per_size = {}
    for size in sizes:
        rs = [r for r in records if r["size"] == size]
        per_size[size] = _fit_json(_fit_or_none(rs), len(rs))
    write_table(records, os.path.join(workdir, "table.md"), fit)
    plot_scaling(records, fit, os.path.join(workdir, "scaling.png"))
    out = {**_fit_json(fit, len(records)), "per_size": per_size}

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
            f.write("\n")

    atomic_write(os.path.join(workdir, "fit.json"), write)
    return fit
