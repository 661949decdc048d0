"""The demo's results: one table (methods x k with 95% intervals), results.json, the "aha" curve
and accuracy vs compute as PNG. Everything is computed from the candidate pools and beam results
of `pipeline.evaluate_policies`; nothing here samples."""

from __future__ import annotations

import json
import os

import numpy as np

from metastone_jax import files, optional
from metastone_jax.demo.diagnose import diagnose, format_diagnosis
from metastone_jax.evaluate.metrics import method_accuracy, summarize, tokens_per_question
from metastone_jax.train.stamps import write_text

# (key, label, pool method); "beam" rows come from beam search with the main head, "ablation"
# from the head trained with `spr.ablation_form` (its label names the form).
ROWS = (
    ("random", "random single candidate", "random"),
    ("vote", "majority vote", "vote"),
    ("sprm_geomean", "SPRM best-of-k (geomean)", "sprm_geomean"),
    ("weighted_vote", "SPRM-weighted vote", "weighted_vote"),
    ("sprm_last", "SPRM last step only", "sprm_last"),
    ("sprm_product", "SPRM product", "sprm_product"),
    ("beam", "SPRM beam search", None),
    ("ablation", "SPRM best-of-k, {form} head (ablation)", "sprm_geomean"),
    ("oracle", "oracle pass@k", "oracle"),
)
MODE_OF_K = {2: "low", 8: "medium", 32: "high"}


def _beam_metric(results: list[dict], n_candidates: int) -> dict:
    out = summarize([float(r["correct"]) for r in results])
    out["tokens_per_question"] = float(np.mean([r["tokens"] for r in results]))
    out["n_groups"] = len(results)
    out["candidates"] = n_candidates
    return out


def build_results(cfg, run: dict) -> dict:
    """{"table": {row: {k: metric}}, "tokens_per_question": {k: n}, "heads": {form: last aha},
    "rollouts": {...}, "config": {...}} from `pipeline.run`'s output."""
    ev = run["eval"]
    main_pool = ev["pools"][cfg.spr.form]
    ablation = ev["pools"].get(cfg.spr.ablation_form)
    ks = [int(k) for k in cfg.eval.ks]
    table: dict[str, dict] = {}
    for key, _, method in ROWS:
        table[key] = {}
        for k in ks:
            if key == "beam":
                if k == 1:  # width = beams = 1 is best-of-1 (tested in test_search)
                    table[key][k] = method_accuracy(main_pool, 1, "sprm_geomean")
                elif k in ev["beam"]:
                    table[key][k] = _beam_metric(ev["beam"][k], k)
            elif key == "ablation":
                if ablation is not None:
                    table[key][k] = method_accuracy(ablation, k, method)
            else:
                table[key][k] = method_accuracy(main_pool, k, method)
    rows = run["rollouts"]
    return {
        "table": table,
        "tokens_per_question": {k: tokens_per_question(main_pool, k) for k in ks},
        "forms": {"main": cfg.spr.form, "ablation": cfg.spr.ablation_form or None},
        "per_sample_accuracy": table["random"][ks[0]]["mean"],
        "heads": {form: h["history"][-1] for form, h in run["heads"].items()},
        # What each head's best-of-k picks, by the task's exact step labels (demo/diagnose.py).
        "diagnosis": {form: diagnose(pool, ks) for form, pool in ev["pools"].items()},
        "rollouts": {"n": int(len(rows["labels"])), "accuracy": float(rows["labels"].mean())},
        "questions": len(ev["records"]),
        "samples": int(cfg.eval.samples),
        "config": json.loads(cfg.to_json_best_effort()),
    }


def format_table(results: dict) -> str:
    """The table as text: one row per method, one column per k (mode names for 2/8/32)."""
    ks = sorted(results["tokens_per_question"], key=int)
    head = [f"k={k}" + (f" ({MODE_OF_K[int(k)]})" if int(k) in MODE_OF_K else "") for k in ks]
    width = 42
    lines = [f"{'method':<{width}}" + "".join(f"{h:>22}" for h in head)]
    lines.append("-" * len(lines[0]))
    for key, label, _ in ROWS:
        label = row_label(results, key, label)
        cells = []
        for k in ks:
            m = results["table"][key].get(k)
            if m is None:
                cells.append(f"{'-':>22}")
            else:
                lo, hi = m["ci95"]
                cells.append(f"{100 * m['mean']:>8.1f} [{100 * lo:4.1f},{100 * hi:5.1f}]")
        lines.append(f"{label:<{width}}" + "".join(cells))
    tokens = "".join(f"{results['tokens_per_question'][k]:>22.0f}" for k in ks)
    lines.append(f"{'generated tokens per question':<{width}}" + tokens)
    return "\n".join(lines)


def row_label(results: dict, key: str, label: str) -> str:
    """The table label of row `key`: the ablation row names its SPR loss form."""
    return label.format(form=results["forms"]["ablation"] or "-") if key == "ablation" else label


def format_diagnoses(results: dict) -> str:
    return "\n\n".join(f"SPRM head trained with the {form} SPR loss\n{format_diagnosis(d)}"
                       for form, d in results["diagnosis"].items())  # fmt: skip


def _finish(fig, ax, path: str, xlabel: str, ylabel: str, title: str) -> None:
    """Labels, legend and grid, then the PNG, atomically (files.staged_file)."""
    plt = optional.pyplot()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    try:
        with files.staged_file(path) as tmp:
            fig.savefig(tmp, dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)


def plot_aha(
    heads: dict[str, dict], path: str, warmup: int = 0, *,
    xlabel: str = "SPRM head updates",
    title: str = "SPRM on held-out rollouts: correct vs incorrect (the 'aha' gap)",
) -> None:  # fmt: skip
    """Mean held-out trajectory score of correct vs incorrect rollouts over head training
    (`heads`: {form: {"history": [{step, score_correct, score_incorrect}]}}); a vertical line
    where the filtered form's BCE warm-up ends."""
    plt = optional.pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    styles = ["-", "--", ":"]
    for (form, head), style in zip(heads.items(), styles, strict=False):
        h = head["history"]
        steps = [r["step"] for r in h]
        ax.plot(steps, [r["score_correct"] for r in h], style, color="tab:green",
                label=f"correct ({form})")  # fmt: skip
        ax.plot(steps, [r["score_incorrect"] for r in h], style, color="tab:red",
                label=f"incorrect ({form})")  # fmt: skip
    if warmup:
        ax.axvline(warmup, color="gray", lw=0.8, ls=":")
        ax.annotate("filter on", (warmup, ax.get_ylim()[0]), fontsize=7, color="gray",
                    xytext=(3, 3), textcoords="offset points")  # fmt: skip
    _finish(fig, ax, path, xlabel, "mean trajectory score (geomean of step scores)", title)


def plot_compute(results: dict, path: str) -> None:
    """Accuracy vs generated tokens per question, one line per selection method."""
    plt = optional.pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    tokens = results["tokens_per_question"]
    for key, label, _ in ROWS:
        if key in ("sprm_last", "sprm_product"):
            continue
        ks = sorted(k for k in results["table"][key])
        if not ks:
            continue
        x = [results["table"][key][k].get("tokens_per_question", tokens[k]) for k in ks]
        y = [100 * results["table"][key][k]["mean"] for k in ks]
        ax.plot(x, y, "o-", label=row_label(results, key, label))
        for xi, yi, k in zip(x, y, ks, strict=True):
            ax.annotate(f"k={k}", (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    _finish(fig, ax, path, "generated tokens per question (log)", "accuracy (%)",
            "Test-time scaling on held-out problems")  # fmt: skip


def write(results: dict, run: dict, workdir: str) -> dict[str, str]:
    """results.json, table.txt, diagnosis.txt, aha.png, compute.png in WORKDIR -> their paths."""
    paths = {
        "results": os.path.join(workdir, "results.json"),
        "table": os.path.join(workdir, "table.txt"),
        "diagnosis": os.path.join(workdir, "diagnosis.txt"),
        "aha": os.path.join(workdir, "aha.png"),
        "compute": os.path.join(workdir, "compute.png"),
    }
    texts = (("results", json.dumps(results, indent=1)), ("table", format_table(results)),
             ("diagnosis", format_diagnoses(results)))  # fmt: skip
    for key, text in texts:
        write_text(paths[key], text)
    plot_aha(run["heads"], paths["aha"], int(results["config"]["spr"]["warmup_bce_steps"]))
    plot_compute(results, paths["compute"])
    return paths
