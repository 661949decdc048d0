"""The demo's stages: SFT policy -> own rollouts -> SPRM heads (plain BCE, and the filtered SPR
loss as the ablation) -> test-time scaling on held-out problems. Stages 1-3 are
train/policy_and_heads.py (shared with the scaling sweep; its docstring lays out their files in
WORKDIR); this module adds the evaluation and runs them all. Every stage is resumable:

    WORKDIR/eval/                candidate pools (JSONL, resumable) and beam-search results
                                 (beam-<form>-k<k>.json, with the main head)

Why SFT then SPR on the policy's own rollouts (not GRPO + SPR): see docs/demo.md.
"""

from __future__ import annotations

import json
import os

import jax
from flax import nnx

from metastone_jax.checkpoint import load_policy
from metastone_jax.data import synthetic
from metastone_jax.evaluate.harness import beam_eval, read_pool, sample_pool
from metastone_jax.train import stamps
from metastone_jax.train.policy_and_heads import (
    collect_rollouts,
    log_stage,
    sampling_params,
    train_heads,
    train_policy,
    train_records,
    write_result_json,
)

EVAL_DIR = "eval"


def held_out_records(cfg) -> list[dict]:
    """`eval.questions` problems from their own stream, none of whose prompts is in the SFT data
    (the small task space makes collisions possible)."""
    seen = {r["prompt"] for r in train_records(cfg)}
    n = int(cfg.eval.questions)
    out: list[dict] = []
    for r in synthetic.make_examples("heldout", 4 * n + 64, int(cfg.seed), **dict(cfg.task)):
        if r["prompt"] not in seen:
            out.append(r)
            seen.add(r["prompt"])
        if len(out) == n:
            return out
    raise ValueError(f"the task has too few distinct problems for {n} held-out questions")


def evaluate_policies(cfg, heads: dict[str, dict], workdir: str) -> dict:
    """Stage 4: a pool of `eval.samples` candidates per held-out question, sampled once with
    the main head and scored by every head (the other heads read the step features the sampler
    kept), and beam search with the main head.
    -> {"pools": {form: [...]}, "beam": {k: [...]}, "records": [...]}."""
    records = held_out_records(cfg)
    e = cfg.eval
    eval_dir = os.path.join(workdir, EVAL_DIR)
    started = os.path.isdir(eval_dir) and bool(os.listdir(eval_dir))
    stamps.claim(eval_dir, stamps.eval_settings(cfg, list(heads)), output_exists=started)
    os.makedirs(eval_dir, exist_ok=True)
    main = cfg.spr.form
    log_stage(f"evaluation ({', '.join(heads)} heads): {len(records)} questions x {e.samples} "
         "candidates")  # fmt: skip
    pools, (model, tokenizer, step) = shared_pool(
        cfg, {form: head["ckpt"] for form, head in heads.items()}, main, eval_dir, records
    )
    beams = {}
    for k in e.beam_ks:
        path = os.path.join(workdir, EVAL_DIR, f"beam-{main}-k{k}.json")
        if os.path.exists(path):
            beams[int(k)] = json.load(open(path))
            continue
        beams[int(k)] = beam_eval(
            model, tokenizer, records, k=int(k), sampling=sampling_params(cfg, tokenizer),
            step=step, seed=int(cfg.seed),
            progress=bool(cfg.progress),
        )  # fmt: skip
        write_result_json(path, beams[int(k)])
    return {"pools": pools, "beam": beams, "records": records}


def shared_pool(cfg, ckpts: dict[str, str], main: str, directory: str, records: list[dict]):
    """`eval.samples` candidates per record from the policy at `ckpts[main]`, scored by the head
    of every checkpoint in `ckpts` (each checked to sit on the same backbone): one sampling, one
    resumable pool file per head, DIRECTORY/pool-<name>.jsonl.
    -> ({name: pool entries in `records` order}, (model, tokenizer, step) of the main policy)."""
    e = cfg.eval
    model, tokenizer, step = load_policy(ckpts[main])
    paths = {name: os.path.join(directory, f"pool-{name}.jsonl") for name in ckpts}
    extra = {paths[name]: _same_backbone_head(model, ckpt)
             for name, ckpt in ckpts.items() if name != main}  # fmt: skip
    pools = {main: sample_pool(
        model, tokenizer, records, samples=int(e.samples),
        sampling=sampling_params(cfg, tokenizer), step=step, out_path=paths[main],
        seed=int(cfg.seed), progress=bool(cfg.progress),
        extra_heads=extra,
    )}  # fmt: skip
    order = [str(r["id"]) for r in records]
    for name in ckpts:
        if name != main:  # the other heads' pools, in the records' order
            by_id = {q["id"]: q for q in read_pool(paths[name])}
            pools[name] = [by_id[i] for i in order]
    return pools, (model, tokenizer, step)


def _same_backbone_head(model, ckpt: str):
    """The SPRM head of the policy at `ckpt`, checked to sit on `model`'s backbone (the heads
    are trained on the same frozen SFT policy; a stale workdir could hold another)."""
    other, _, _ = load_policy(ckpt)
    ours = nnx.to_pure_dict(nnx.state(model))
    theirs = nnx.to_pure_dict(nnx.state(other))
    ours.pop("sprm"), theirs.pop("sprm")
    same = jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), ours, theirs))
    if not same:
        raise ValueError(f"{ckpt}: its backbone differs from the main head's policy; the "
                         "evaluation scores both heads on one set of candidates")  # fmt: skip
    return other.sprm


def spr_forms(cfg) -> list[str]:
    forms = [cfg.spr.form]
    if cfg.spr.ablation_form and cfg.spr.ablation_form != cfg.spr.form:
        forms.append(cfg.spr.ablation_form)
    return forms


def run(cfg, workdir: str) -> dict:
    """All stages -> {"policy", "rollouts", "heads", "eval"} (see `report` for the table)."""
    os.makedirs(workdir, exist_ok=True)
    policy = train_policy(cfg, workdir)
    model, tokenizer, step = load_policy(policy)
    rows = collect_rollouts(cfg, model, tokenizer, step, workdir)
    heads = train_heads(cfg, model, step, rows, policy, workdir, spr_forms(cfg))
    del model
    evaluation = evaluate_policies(cfg, heads, workdir)
    return {"policy": policy, "rollouts": rows, "heads": heads, "eval": evaluation}
