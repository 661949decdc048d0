"""A policy and its SPRM heads on the synthetic task, from a demo config (configs/demo.py): SFT
policy -> its own rollouts -> SPRM heads, one per SPR loss form. These are the demo's stages 1-3
(demo/pipeline.py adds the evaluation) and the scaling sweep's trainer (`train_for_sweep`). Every
stage is resumable in WORKDIR:

    WORKDIR/sft/                 `metastone-jax train` run (dataset, tokenizer, checkpoints,
                                 metrics.jsonl, export/)
    WORKDIR/spr/rollouts.npz     SFT-policy rollouts on training prompts, graded
                                 (fresh-rollouts.npz: later prompts, for `--spr-study`)
    WORKDIR/spr/<form>/          the policy with the head trained by that SPR loss form, and
                                 history.json (the "aha" curve)
    WORKDIR/<stage>.stage.json   the settings each stage was made with (train/stamps.py):
                                 reusing a stage under other settings is an error naming it

Why SFT then SPR on the policy's own rollouts (not GRPO + SPR): see docs/demo.md.
"""

from __future__ import annotations

import json
import os

import numpy as np
from flax import nnx

from metastone_jax import configs, files
from metastone_jax.checkpoint import HF_FILES_DIR, load_policy, write_policy
from metastone_jax.data import synthetic
from metastone_jax.data.pipeline import pad_id
from metastone_jax.evaluate.harness import encode_question
from metastone_jax.sample.processors import SamplingParams
from metastone_jax.train import stamps
from metastone_jax.train.head_only import HeadFitConfig, fit_head, step_features
from metastone_jax.train.loop import train
from metastone_jax.train.rollout import grade_rollouts, pack_rollouts, sample_rollouts

SFT_DIR, SPR_DIR = "sft", "spr"


def log_stage(msg: str) -> None:
    """A stage's progress line, as the demo and the sweep print it."""
    print(f"[demo] {msg}", flush=True)


def write_result_json(path: str, obj) -> None:
    """A stage's JSON result (history, study tables), written atomically (files.py)."""
    files.write_json(path, obj, indent=1)


def train_config(cfg, preset: str):
    """configs/train.py:`preset` with the demo's seed, task, model and training prompts."""
    config = configs.load("train.py", preset)
    config.seed = int(cfg.seed)
    config.data.task.update(dict(cfg.task))
    for key, value in dict(cfg.model).items():
        if key not in config.model:
            raise ValueError(f"demo config.model: unknown ModelConfig field {key!r}")
        config.model[key] = value
    s = cfg.sft
    config.data.update(max_prompt_len=int(s.max_prompt_len),
                       synthetic_size=int(s.synthetic_size))  # fmt: skip
    config.train.progress = bool(cfg.progress)
    return config


def sft_config(cfg):
    """configs/train.py:demo-sft with the demo's task, model and SFT settings."""
    config = train_config(cfg, "demo-sft")
    s = cfg.sft
    config.data.update(batch_size=int(s.batch_size), seq_len=int(s.seq_len),
                       unlearned_slips=bool(s.unlearned_slips))  # fmt: skip
    config.optim.lr = float(s.lr)
    config.train.update(steps=int(s.steps), save_every=max(int(s.steps) // 4, 1))
    return config


def train_policy(cfg, workdir: str) -> str:
    """Stage 1: SFT (resumable). -> the exported params checkpoint with its tokenizer."""
    run = os.path.join(workdir, SFT_DIR)
    export = os.path.join(run, "export")
    step_file = os.path.join(export, "train_step.json")
    started = os.path.isdir(run) and bool(os.listdir(run))
    stamps.claim(run, stamps.sft_settings(cfg), output_exists=started)
    if os.path.exists(step_file) and json.load(open(step_file))["step"] == int(cfg.sft.steps):
        log_stage(f"SFT policy: reusing {export}")
        return export
    log_stage(f"SFT: {cfg.sft.steps} steps of {cfg.sft.batch_size} problems -> {run}")
    train(sft_config(cfg), run)
    return export


def sampling_params(cfg, tokenizer):
    s = cfg.sampling
    return SamplingParams(
        temperature=float(s.temperature), top_p=float(s.top_p), top_k=int(s.top_k),
        repetition_penalty=float(s.repetition_penalty), max_new_tokens=int(s.max_new_tokens),
        stop_ids=tuple(tokenizer.eos_ids),
    )  # fmt: skip


def train_records(cfg, n: int | None = None) -> list[dict]:
    """The first `n` (default all) SFT training problems (the builder's "train" split is exactly
    these; the generator yields the same prefix whatever the total)."""
    n = int(cfg.sft.synthetic_size) if n is None else min(n, int(cfg.sft.synthetic_size))
    return list(synthetic.make_examples("train", n, int(cfg.seed), **dict(cfg.task)))


def collect_rollouts(
    cfg, model, tokenizer, step, workdir: str, *, first: int = 0, count: int | None = None,
    name: str = "rollouts.npz",
) -> dict[str, np.ndarray]:  # fmt: skip
    """Stage 2: `spr.k` rollouts of the SFT policy per training prompt, graded (cached in
    WORKDIR/spr/`name`). Prompts `first` .. `first + count` (default: the first
    `spr.rollout_prompts`) of the SFT data; seeds and group ids follow the prompt's index, so
    a later range is fresh rollouts of other prompts."""
    count = int(cfg.spr.rollout_prompts) if count is None else int(count)
    path = os.path.join(workdir, SPR_DIR, name)
    stamps.claim(path, stamps.rollout_settings(cfg, first, count),
                 output_exists=os.path.exists(path))  # fmt: skip
    if os.path.exists(path):
        log_stage(f"rollouts: reusing {path}")
        return dict(np.load(path))
    records = train_records(cfg, first + count)[first:]
    if len(records) < count:
        raise ValueError(f"rollout prompts {first}..{first + count}: the SFT data has only "
                         f"sft.synthetic_size={cfg.sft.synthetic_size} problems")  # fmt: skip
    width = int(cfg.sft.max_prompt_len)
    graphdef, params = nnx.split(model)
    sampling = sampling_params(cfg, tokenizer)
    k = int(cfg.spr.k)
    prompts = [encode_question(r, tokenizer) for r in records]
    for r, p in zip(records, prompts, strict=True):
        if len(p) > width:
            raise ValueError(f"problem {r['id']!r}: prompt of {len(p)} tokens is longer "
                             f"than sft.max_prompt_len={width}")  # fmt: skip
    # Every prompt's candidates in one engine queue: a slot freed by a short candidate takes
    # the next one at once (in chunks, a chunk's slots idled until its longest candidate ended).
    seeds = [int(cfg.seed) * 1_000_003 + first + i for i in range(len(records))]
    cands = sample_rollouts(graphdef, params, prompts, k=k, sampling=sampling, step=step,
                            seeds=seeds, pad_id=pad_id(tokenizer),
                            progress=bool(cfg.progress))  # fmt: skip
    rewards = grade_rollouts(cands.texts(tokenizer), [r["answer"] for r in records])
    rows = pack_rollouts(prompts, cands, rewards, prompt_width=width, pad_id=pad_id(tokenizer))
    rows["group"] = np.repeat(np.arange(first, first + len(records)), k)
    with files.staged_file(path) as tmp:
        np.savez(tmp, **rows)
    log_stage(f"rollouts: {len(rows['labels'])} from {len(records)} prompts, "
         f"{rows['labels'].mean():.1%} correct")  # fmt: skip
    return rows


def held_out_mask(cfg, group: np.ndarray) -> np.ndarray:
    """[N] bool: the rollouts of `spr.held_out_fraction` of the prompts (whole groups), kept
    out of head training for the "aha" curve (seeded, so every stage picks the same ones)."""
    groups = np.unique(group)
    rng = np.random.default_rng(int(cfg.seed))
    n_held = max(1, int(len(groups) * float(cfg.spr.held_out_fraction)))
    return np.isin(group, rng.choice(groups, n_held, replace=False))


def save_policy(model, head, tokenizer_dir: str, out: str, meta: dict) -> str:
    """The policy with `head` as its SPRM head, as a params checkpoint + tokenizer at `out`."""
    graphdef, state = nnx.split(model)
    policy = nnx.merge(graphdef, state)  # a copy: `model` keeps its own head
    policy.sprm = head
    return write_policy(out, nnx.state(policy), policy.cfg, tokenizer_dir=tokenizer_dir, meta=meta)


def train_heads(cfg, model, step, rows, policy_dir: str, workdir: str, forms) -> dict[str, dict]:
    """Stage 3: the SPRM head trained on cached step features, once per SPR loss form.
    -> {form: {"ckpt": dir, "history": [...]}} (each form cached in WORKDIR/spr/<form>)."""
    out, features = {}, None
    for form in forms:
        ckpt = os.path.join(workdir, SPR_DIR, form)
        hist_path = os.path.join(ckpt, "history.json")
        stamps.claim(ckpt, stamps.head_settings(cfg, form), output_exists=os.path.exists(hist_path))
        if os.path.exists(hist_path):
            log_stage(f"SPRM head ({form}): reusing {ckpt}")
            out[form] = {"ckpt": ckpt, "history": json.load(open(hist_path))}
            continue
        if features is None:
            features = step_features(model, rows, step, progress=bool(cfg.progress))
            held = held_out_mask(cfg, rows["group"])
            train_set, held_set = features.take(~held), features.take(held)
        s = cfg.spr
        fit = HeadFitConfig(
            form=form, steps=int(s.steps), batch=int(s.batch), lr=float(s.lr),
            warmup_bce_steps=int(s.warmup_bce_steps) if form != "bce" else 0,
            eval_every=max(int(s.steps) // 40, 1), seed=int(cfg.seed),
        )  # fmt: skip
        log_stage(f"SPRM head ({form}): {fit.steps} updates on {len(train_set)} rollouts "
             f"({int(train_set.mask.sum())} steps)")  # fmt: skip
        head, history = fit_head(model.sprm, train_set, fit, held_out=held_set)
        last = history[-1]
        log_stage(f"  held-out score correct {last['score_correct']:.3f} vs incorrect "
             f"{last['score_incorrect']:.3f} (gap {last['score_gap']:+.3f})")  # fmt: skip
        save_policy(model, head, os.path.join(policy_dir, HF_FILES_DIR), ckpt,
                    {"source": policy_dir, "spr_form": form})  # fmt: skip
        write_result_json(hist_path, history)
        out[form] = {"ckpt": ckpt, "history": history}
    return out


def train_for_sweep(
    size_name: str, model_overrides: dict, workdir: str, *, sampling: dict | None = None,
    form: str = "bce",
) -> str:  # fmt: skip
    """The sweep's trainer: the demo's SFT + one SPRM head for one model size -> the policy
    checkpoint with its trained head (resumable). `sampling`: overrides of the demo's rollout
    sampling (the sweep's own, so the head learns from the candidates it will score). The head
    is the plain-BCE one by default: in the demo at these sizes the filtered head's best-of-k
    falls as k grows (docs/demo.md)."""
    cfg = configs.load("demo.py", "full")
    cfg.model = dict(model_overrides)
    cfg.spr.form, cfg.spr.ablation_form = form, ""
    for key, value in (sampling or {}).items():
        if key not in cfg.sampling:
            raise ValueError(f"sweep sampling: unknown key {key!r}; valid: {sorted(cfg.sampling)}")
        cfg.sampling[key] = value
    log_stage(f"sweep size {size_name}: {model_overrides}")
    policy = train_policy(cfg, workdir)
    model, tokenizer, step = load_policy(policy)
    rows = collect_rollouts(cfg, model, tokenizer, step, workdir)
    heads = train_heads(cfg, model, step, rows, policy, workdir, [form])
    return heads[form]["ckpt"]
