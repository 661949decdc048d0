"""The SPR loss inside GRPO, on a finished demo workdir: `metastone-jax demo --grpo-study`.

`spr_study` trains heads on fresh rollouts of a frozen policy. In the released recipe the head
learns inside GRPO, from each step's on-policy rollouts, while the policy moves under it. Here,
from the demo's SFT policy and its main head (a sound start for the filter), one GRPO + SPR run
per SPR loss form in `grpo_study.forms`: `steps` steps of `prompts` training prompts x `spr.k`
rollouts at the demo's sampling, one policy update and one head update per step. The SPR
gradient is kept out of the backbone (`spr.grad_scale=0`; the released 1e-4 barely moves it), so
the runs differ in their heads only and end with the same policy (checked, bit for bit). One
pool of that policy's candidates on the evaluation problems is scored by every run's head: the
comparison is paired, as in the demo's table.

Writes WORKDIR/grpo_study.json, .txt and .png (score of correct vs incorrect rollouts over the
GRPO steps); the runs are WORKDIR/grpo-study/<form>/ (`metastone-jax train` workdirs, resumable)
and the pools WORKDIR/grpo-study/pool-<form>.jsonl.
"""

from __future__ import annotations

import json
import os

import numpy as np

from metastone_jax.demo.pipeline import held_out_records, shared_pool
from metastone_jax.demo.report import plot_aha
from metastone_jax.evaluate.metrics import method_accuracy
from metastone_jax.train import stamps
from metastone_jax.train.loop import train
from metastone_jax.train.metrics import read_metrics
from metastone_jax.train.policy_and_heads import log_stage, train_config, write_result_json

STUDY_DIR, STUDY_FILE = "grpo-study", "grpo_study"
HEAD_INITS = ("main", "random")
SMOOTH = 20  # GRPO steps per point of the curves and of the first/last summaries


def grpo_config(cfg, form: str, init_ckpt: str):
    """configs/train.py:demo-grpo on the demo's task and sampling, from `init_ckpt`."""
    s, st = cfg.sampling, cfg.grpo_study
    if float(s.repetition_penalty) != 1.0:
        raise ValueError(
            "demo --grpo-study: GRPO rollouts have no repetition penalty; "
            f"sampling.repetition_penalty={s.repetition_penalty} must be 1.0"
        )
    config = train_config(cfg, "demo-grpo")
    config.init_ckpt = init_ckpt
    config.data.batch_size = int(st.prompts)
    config.rl.update(k=int(cfg.spr.k), temperature=float(s.temperature), top_p=float(s.top_p),
                     top_k=int(s.top_k), max_new_tokens=int(s.max_new_tokens),
                     entropy_coef=float(st.entropy_coef),
                     logprob_support=str(st.logprob_support))  # fmt: skip
    config.optim.update(lr=float(st.lr), sprm_lr=float(st.head_lr))
    config.spr.update(form=form, grad_scale=0.0, scope=str(st.spr_scope),
                      ranks=int(st.spr_ranks))  # fmt: skip
    config.data.grad_accum = int(st.grad_accum)
    steps = int(st.steps)
    config.train.update(steps=steps, save_every=max(steps // 4, 1))
    return config


def study_paths(cfg, workdir: str) -> tuple[str, str]:
    """(the runs' directory, the results' path without extension) for `grpo_study.tag`."""
    tag = str(cfg.grpo_study.tag)
    suffix = f"-{tag}" if tag else ""
    if tag and not tag.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"grpo_study.tag={tag!r}: letters, digits, '-' and '_' only")
    return os.path.join(workdir, STUDY_DIR + suffix), os.path.join(workdir, STUDY_FILE + suffix)


def initial_head(cfg, run: dict) -> str:
    """The checkpoint both runs start from: the SFT policy with the main head or its own
    untrained (randomly initialised) one."""
    head_init = str(cfg.grpo_study.head_init)
    if head_init not in HEAD_INITS:
        raise ValueError(f"grpo_study.head_init={head_init!r}; expected one of {HEAD_INITS}")
    return run["heads"][cfg.spr.form]["ckpt"] if head_init == "main" else run["policy"]


def study_settings(cfg) -> dict:
    e = cfg.eval
    return {
        **stamps.head_settings(cfg, cfg.spr.form),
        "grpo_study": stamps.plain(cfg.grpo_study),
        "eval": {"questions": int(e.questions), "samples": int(e.samples)},
    }


def run_grpo(cfg, form: str, init_ckpt: str, workdir: str) -> str:
    """One GRPO + SPR run (resumed if started) -> its export."""
    export = os.path.join(workdir, "export")
    step_file = os.path.join(export, "train_step.json")
    steps = int(cfg.grpo_study.steps)
    if os.path.exists(step_file) and json.load(open(step_file))["step"] == steps:
        log_stage(f"GRPO + SPR ({form}): reusing {export}")
        return export
    log_stage(f"GRPO + SPR ({form}): {steps} steps of {cfg.grpo_study.prompts} prompts x "
         f"{cfg.spr.k} rollouts -> {workdir}")  # fmt: skip
    train(grpo_config(cfg, form, init_ckpt), workdir)
    return export


def curve(metrics_path: str) -> list[dict]:
    """Per-step metrics of a run, averaged over windows of SMOOTH steps -> [{step, reward_mean,
    score_correct, score_incorrect, score_gap, kl, spr_kept_fraction}] (step: the window's last)."""
    rows = read_metrics(metrics_path)
    keys = ("reward_mean", "score_correct", "score_incorrect", "score_gap", "kl",
            "spr_kept_fraction")  # fmt: skip
    out = []
    for i in range(0, len(rows), SMOOTH):
        win = rows[i : i + SMOOTH]
        out.append({"step": int(win[-1]["step"]),
                    **{k: float(np.mean([r[k] for r in win])) for k in keys}})  # fmt: skip
    return out


def run_grpo_study(cfg, run: dict, workdir: str) -> dict:
    """Both runs, the shared pool, every head's best-of-k -> results (also written to
    WORKDIR/grpo_study.*)."""
    st, e = cfg.grpo_study, cfg.eval
    forms = [str(f) for f in st.forms]
    if len(forms) != len(set(forms)) or not forms:
        raise ValueError(f"grpo_study.forms must name distinct SPR forms, got {forms}")
    study_dir, path = study_paths(cfg, workdir)
    started = os.path.isdir(study_dir) and bool(os.listdir(study_dir))
    stamps.claim(study_dir, study_settings(cfg), output_exists=started)
    init = initial_head(cfg, run)
    exports = {f: run_grpo(cfg, f, init, os.path.join(study_dir, f)) for f in forms}

    main = forms[0]
    records = held_out_records(cfg)
    log_stage(f"GRPO study evaluation: {len(records)} questions x {e.samples} candidates of the "
         "GRPO policy, scored by every run's head")  # fmt: skip
    pools, _ = shared_pool(cfg, exports, main, study_dir, records)

    ks = [int(k) for k in e.ks]
    sft_pools = run["eval"]["pools"]

    def accuracy(pool, method):
        return {str(k): 100 * method_accuracy(pool, k, method)["mean"] for k in ks}

    rows = [{"policy": "SFT", "selector": f"{f} head (the demo's)", "form": f,
             "accuracy": accuracy(pool, "sprm_geomean")}
            for f, pool in sft_pools.items()]  # fmt: skip
    sft_main = sft_pools[cfg.spr.form]
    rows += [{"policy": "SFT", "selector": name, "accuracy": accuracy(sft_main, method)}
             for name, method in (("majority vote", "vote"), ("oracle", "oracle"))]  # fmt: skip
    curves = {}
    for f in forms:
        curves[f] = curve(os.path.join(study_dir, f, "metrics.jsonl"))
        rows.append({"policy": "GRPO", "selector": f"{f} head (trained in GRPO)", "form": f,
                     "accuracy": accuracy(pools[f], "sprm_geomean")})  # fmt: skip
    rows += [{"policy": "GRPO", "selector": name, "accuracy": accuracy(pools[main], method)}
             for name, method in (("majority vote", "vote"), ("oracle", "oracle"))]  # fmt: skip
    out = {
        "rows": rows, "ks": ks, "curves": curves, "smooth": SMOOTH,
        "settings": {**stamps.plain(st), "k": int(cfg.spr.k), "init": init},
        "questions": len(records), "samples": int(e.samples),
    }  # fmt: skip
    write_result_json(f"{path}.json", out)
    stamps.write_text(f"{path}.txt", format_grpo_study(out))
    plot_aha({f: {"history": c} for f, c in curves.items()}, f"{path}.png",
             xlabel=f"GRPO steps (one head update each; means over {SMOOTH} steps)",
             title="SPRM trained inside GRPO: correct vs incorrect rollouts")  # fmt: skip
    return out


def format_grpo_study(out: dict) -> str:
    st, ks = out["settings"], out["ks"]
    head = f"{'policy':7s} {'selector':30s} " + " ".join(f"{f'k={k}':>6s}" for k in ks)
    lines = [
        f"Accuracy in % on the evaluation problems ({out['questions']} x {out['samples']}; "
        f"k = 1: a random candidate, k > 1: best-of-k by geomean for a head). GRPO: "
        f"{st['steps']} steps of {st['prompts']} prompts x {st['k']} rollouts from the SFT "
        f"policy and {_HEAD_TEXT[st.get('head_init', 'main')]}, policy LR {st['lr']:g}, head LR "
        f"{st['head_lr']:g}, SPR normalisation {_scope_text(st)}, the SPR gradient kept out of "
        "the backbone; one policy, every head scoring its candidates.",
        head, "-" * len(head),
    ]  # fmt: skip
    for r in out["rows"]:
        cells = " ".join(f"{r['accuracy'][str(k)]:6.1f}" for k in ks)
        lines.append(f"{r['policy']:7s} {r['selector']:30s} {cells}")
    n = out["smooth"]
    lines.append("")
    lines.append(
        f"Over the GRPO steps (means of the first and last {n}): reward, score of "
        "correct - incorrect rollouts, SPR kept fraction, KL to the SFT policy"
    )
    for form, c in out["curves"].items():
        a, b = c[0], c[-1]
        lines.append(f"  {form:9s} reward {a['reward_mean']:.3f} -> {b['reward_mean']:.3f}, "
                     f"gap {a['score_gap']:+.3f} -> {b['score_gap']:+.3f}, kept "
                     f"{a['spr_kept_fraction']:.2f} -> {b['spr_kept_fraction']:.2f}, "
                     f"kl {b['kl']:.4f}")  # fmt: skip
    return "\n".join(lines)


_HEAD_TEXT = {"main": "its main head", "random": "a random head"}


def _scope_text(st: dict) -> str:
    if st.get("spr_scope", "batch") == "batch":
        return "over the whole batch"
    return (f"per micro-batch ({st['grad_accum']} per update) and rank ({st['spr_ranks']} "
            "ranks), as released")  # fmt: skip
