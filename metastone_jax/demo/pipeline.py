"""The demo's stages: SFT policy -> own rollouts -> SPRM heads (plain BCE, and the filtered SPR
loss as the ablation) -> test-time scaling on held-out problems. Every stage is resumable in
WORKDIR:

    WORKDIR/sft/                 `metastone-jax train` run (dataset, tokenizer, checkpoints,
                                 metrics.jsonl, export/)
    WORKDIR/spr/rollouts.npz     SFT-policy rollouts on training prompts, graded
                                 (fresh-rollouts.npz: later prompts, for `--spr-study`)
    WORKDIR/spr/<form>/          the policy with the head trained by that SPR loss form, and
                                 history.json (the "aha" curve)
    WORKDIR/eval/                candidate pools (JSONL, resumable) and beam-search results
                                 (beam-<form>-k<k>.json, with the main head)
    WORKDIR/<stage>.stage.json   the settings each stage was made with (`stamps`): reusing a
                                 stage under other settings is an error naming the setting

Why SFT then SPR on the policy's own rollouts (not GRPO + SPR): see README, "The demo".
"""

from __future__ import annotations

import json
import os

import numpy as np

from metastone_jax.checkpoint import load_policy, write_policy
from metastone_jax.data import synthetic
from metastone_jax.demo import stamps

SFT_DIR, SPR_DIR, EVAL_DIR = "sft", "spr", "eval"


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def write_text(path: str, text: str) -> None:
    """`text` + newline at `path`, under a temporary name and renamed (no half-written file)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)


def _write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=1))


def train_config(cfg, preset: str):
    """configs/train.py:`preset` with the demo's seed, task, model and training prompts."""
    from metastone_jax import configs

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
    from metastone_jax.train.loop import train

    run = os.path.join(workdir, SFT_DIR)
    export = os.path.join(run, "export")
    step_file = os.path.join(export, "train_step.json")
    started = os.path.isdir(run) and bool(os.listdir(run))
    stamps.claim(run, stamps.sft_settings(cfg), output_exists=started)
    if os.path.exists(step_file) and json.load(open(step_file))["step"] == int(cfg.sft.steps):
        _log(f"SFT policy: reusing {export}")
        return export
    _log(f"SFT: {cfg.sft.steps} steps of {cfg.sft.batch_size} problems -> {run}")
    train(sft_config(cfg), run)
    return export


def sampling_params(cfg, tokenizer):
    from metastone_jax.sample.processors import SamplingParams

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


def collect_rollouts(
    cfg, model, tokenizer, step, workdir: str, *, first: int = 0, count: int | None = None,
    name: str = "rollouts.npz",
) -> dict[str, np.ndarray]:  # fmt: skip
    """Stage 2: `spr.k` rollouts of the SFT policy per training prompt, graded (cached in
    WORKDIR/spr/`name`). Prompts `first` .. `first + count` (default: the first
    `spr.rollout_prompts`) of the SFT data; seeds and group ids follow the prompt's index, so
    a later range is fresh rollouts of other prompts."""
    from metastone_jax.data.pipeline import pad_id
    from metastone_jax.evaluate.harness import encode_question
    from metastone_jax.train.rollout import grade_rollouts, pack_rollouts, sample_rollouts

    count = int(cfg.spr.rollout_prompts) if count is None else int(count)
    path = os.path.join(workdir, SPR_DIR, name)
    stamps.claim(path, stamps.rollout_settings(cfg, first, count),
                 output_exists=os.path.exists(path))  # fmt: skip
    if os.path.exists(path):
        _log(f"rollouts: reusing {path}")
        return dict(np.load(path))
    from flax import nnx

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
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(tmp, **rows)
    os.replace(tmp, path)
    _log(f"rollouts: {len(rows['labels'])} from {len(records)} prompts, "
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
    from flax import nnx

    graphdef, state = nnx.split(model)
    policy = nnx.merge(graphdef, state)  # a copy: `model` keeps its own head
    policy.sprm = head
    return write_policy(out, nnx.state(policy), policy.cfg, tokenizer_dir=tokenizer_dir, meta=meta)


def train_heads(cfg, model, step, rows, policy_dir: str, workdir: str, forms) -> dict[str, dict]:
    """Stage 3: the SPRM head trained on cached step features, once per SPR loss form.
    -> {form: {"ckpt": dir, "history": [...]}} (each form cached in WORKDIR/spr/<form>)."""
    from metastone_jax.checkpoint import HF_FILES_DIR
    from metastone_jax.train.head_only import HeadFitConfig, fit_head, step_features

    out, features = {}, None
    for form in forms:
        ckpt = os.path.join(workdir, SPR_DIR, form)
        hist_path = os.path.join(ckpt, "history.json")
        stamps.claim(ckpt, stamps.head_settings(cfg, form), output_exists=os.path.exists(hist_path))
        if os.path.exists(hist_path):
            _log(f"SPRM head ({form}): reusing {ckpt}")
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
        _log(f"SPRM head ({form}): {fit.steps} updates on {len(train_set)} rollouts "
             f"({int(train_set.mask.sum())} steps)")  # fmt: skip
        head, history = fit_head(model.sprm, train_set, fit, held_out=held_set)
        last = history[-1]
        _log(f"  held-out score correct {last['score_correct']:.3f} vs incorrect "
             f"{last['score_incorrect']:.3f} (gap {last['score_gap']:+.3f})")  # fmt: skip
        save_policy(model, head, os.path.join(policy_dir, HF_FILES_DIR), ckpt,
                    {"source": policy_dir, "spr_form": form})  # fmt: skip
        _write_json(hist_path, history)
        out[form] = {"ckpt": ckpt, "history": history}
    return out


def evaluate_policies(cfg, heads: dict[str, dict], workdir: str) -> dict:
    """Stage 4: a pool of `eval.samples` candidates per held-out question, sampled once with
    the main head and scored by every head (the other heads read the step features the sampler
    kept), and beam search with the main head.
    -> {"pools": {form: [...]}, "beam": {k: [...]}, "records": [...]}."""
    from metastone_jax.evaluate.harness import beam_eval

    records = held_out_records(cfg)
    e = cfg.eval
    eval_dir = os.path.join(workdir, EVAL_DIR)
    started = os.path.isdir(eval_dir) and bool(os.listdir(eval_dir))
    stamps.claim(eval_dir, stamps.eval_settings(cfg, list(heads)), output_exists=started)
    os.makedirs(eval_dir, exist_ok=True)
    main = cfg.spr.form
    _log(f"evaluation ({', '.join(heads)} heads): {len(records)} questions x {e.samples} "
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
        _write_json(path, beams[int(k)])
    return {"pools": pools, "beam": beams, "records": records}


def shared_pool(cfg, ckpts: dict[str, str], main: str, directory: str, records: list[dict]):
    """`eval.samples` candidates per record from the policy at `ckpts[main]`, scored by the head
    of every checkpoint in `ckpts` (each checked to sit on the same backbone): one sampling, one
    resumable pool file per head, DIRECTORY/pool-<name>.jsonl.
    -> ({name: pool entries in `records` order}, (model, tokenizer, step) of the main policy)."""
    from metastone_jax.evaluate.harness import read_pool, sample_pool

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
    import jax
    from flax import nnx

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


def train_for_sweep(
    size_name: str, model_overrides: dict, workdir: str, *, sampling: dict | None = None,
    form: str = "bce",
) -> str:  # fmt: skip
    """The sweep's trainer: the demo's SFT + one SPRM head for one model size -> the policy
    checkpoint with its trained head (resumable). `sampling`: overrides of the demo's rollout
    sampling (the sweep's own, so the head learns from the candidates it will score). The head
    is the plain-BCE one by default: in the demo at these sizes the filtered head's best-of-k
    falls as k grows (README)."""
    from metastone_jax import configs

    cfg = configs.load("demo.py", "full")
    cfg.model = dict(model_overrides)
    cfg.spr.form, cfg.spr.ablation_form = form, ""
    for key, value in (sampling or {}).items():
        if key not in cfg.sampling:
            raise ValueError(f"sweep sampling: unknown key {key!r}; valid: {sorted(cfg.sampling)}")
        cfg.sampling[key] = value
    _log(f"sweep size {size_name}: {model_overrides}")
    policy = train_policy(cfg, workdir)
    model, tokenizer, step = load_policy(policy)
    rows = collect_rollouts(cfg, model, tokenizer, step, workdir)
    heads = train_heads(cfg, model, step, rows, policy, workdir, [form])
    return heads[form]["ckpt"]
