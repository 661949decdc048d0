"""The SPR-loss study on a finished demo workdir: `metastone-jax demo --spr-study`.

Does the released code's filtered SPR loss (a step counts only if the head already agrees with
the outcome) train a better selector than plain BCE once the rollouts are fresh, as they are
inside GRPO? Starting from the demo's main head, one pass (each rollout seen once, a new AdamW)
over rollouts of training prompts the head never saw, with each loss form at each learning
rate; the same pass over the head's own training rollouts for the filtered form as the
fixed-set contrast. Every head is scored on the demo's evaluation pool (best-of-k, geometric
mean, the released metric) and on the held-out training rollouts (best-of-`spr.k`).

The pool's candidates are scored from teacher-forced features of their token ids (re-encoded
from the pool's text) at the sampler's step positions (the inference step mask); the main
head's scores on them must match the ones the sampler wrote (`check_pool_features`), so every
head is scored on the features the sampler saw.
Writes WORKDIR/spr_study.json and spr_study.txt.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from tqdm import tqdm

from metastone_jax.checkpoint import load_policy
from metastone_jax.data.pipeline import pad_id
from metastone_jax.evaluate.harness import encode_question
from metastone_jax.evaluate.metrics import candidate_score, method_accuracy
from metastone_jax.train.head_only import HeadFitConfig, fit_head, step_features
from metastone_jax.train.policy_and_heads import (
    collect_rollouts,
    held_out_mask,
    log_stage,
    write_result_json,
)
from metastone_jax.train.stamps import write_text

STUDY_FILE = "spr_study"
SCORE_ATOL = 1e-3  # teacher-forced vs in-loop step scores (float32 rounding: ~4e-6 measured)


def pool_rows(pool: list[dict], tokenizer) -> dict[str, np.ndarray]:
    """Packed rows (tokens/valid [N, P+G], response_start [N], labels [N], include [N]) of every
    candidate of `pool`, in pool order: the chat-templated prompt left-padded to P, the
    re-encoded response (its end-of-sequence marker as the eos id) after it."""
    eos = tokenizer.decode([tokenizer.eos_id])
    pairs, labels = [], []
    for q in pool:
        prompt = encode_question({"prompt": q["prompt"]}, tokenizer)
        for c in q["candidates"]:
            text, ends = c["text"], c["text"].endswith(eos)
            ids = tokenizer.encode(text[: -len(eos)] if ends else text)
            pairs.append((prompt, ids + ([tokenizer.eos_id] if ends else [])))
            labels.append(float(c["correct"]))
    p = max(len(a) for a, _ in pairs)
    g = max(len(b) for _, b in pairs)
    tokens = np.full((len(pairs), p + g), pad_id(tokenizer), np.int32)
    valid = np.zeros(tokens.shape, bool)
    for i, (a, b) in enumerate(pairs):
        tokens[i, p - len(a) : p], tokens[i, p : p + len(b)] = a, b
        valid[i, p - len(a) : p + len(b)] = True
    n = len(pairs)
    return {"tokens": tokens, "valid": valid, "response_start": np.full(n, p, np.int32),
            "labels": np.asarray(labels, np.float32), "include": np.ones(n, bool)}  # fmt: skip


def head_step_scores(head, feats) -> list[np.ndarray]:
    """sigmoid(head) at each trajectory's real steps: one [S_i] array per trajectory."""
    p = np.asarray(jax.nn.sigmoid(head(feats.features)), np.float64)
    return [p[i][feats.mask[i]] for i in range(len(feats))]


def check_pool_features(head, feats, pool: list[dict]) -> None:
    """Raises unless `head` scores every pool candidate from `feats` as the sampler did (same
    step count, scores within SCORE_ATOL): the re-encoded tokens are the sampled ones."""
    scores = head_step_scores(head, feats)
    i = 0
    for q in pool:
        for j, c in enumerate(q["candidates"]):
            ref, got = np.asarray(c["step_scores"]), scores[i]
            if ref.shape != got.shape or not np.allclose(ref, got, atol=SCORE_ATOL, rtol=0):
                raise ValueError(
                    f"pool question {q['id']!r} candidate {j}: teacher-forced step scores "
                    f"{np.round(got, 4).tolist()} differ from the sampler's "
                    f"{np.round(ref, 4).tolist()} (the text does not re-encode to the sampled "
                    "tokens); the study needs the pool's exact candidates"
                )
            i += 1


def pool_best_of_k(head, feats, pool: list[dict], ks) -> dict[int, float]:
    """{"k": best-of-k accuracy in %} (geomean, floor(M/k) disjoint groups per question)."""
    scores = iter(head_step_scores(head, feats))
    rescored = [{**q, "candidates": [{**c, "step_scores": next(scores)} for c in q["candidates"]]}
                for q in pool]  # fmt: skip
    return {str(k): 100 * method_accuracy(rescored, int(k), "sprm_geomean")["mean"] for k in ks}


def rollout_best_of_group(head, feats, group: np.ndarray) -> float:
    """Accuracy in % of picking each prompt's highest-geomean rollout (first of equal maxima;
    a rollout without a step scores 0)."""
    agg = np.array([candidate_score(s) for s in head_step_scores(head, feats)])
    picks = [feats.labels[idx[np.argmax(agg[idx])]] for idx in
             (np.flatnonzero(group == g) for g in np.unique(group))]  # fmt: skip
    return 100 * float(np.mean(picks))


def protocols(cfg) -> list[dict]:
    """The study's rows: the demo's two heads as trained, then one-pass continuations."""
    s, st = cfg.spr, cfg.study
    rows = [{"name": f"demo head ({s.form})", "head": s.form}]
    if s.ablation_form and s.ablation_form != s.form:
        rows.append({"name": f"demo ablation head ({s.ablation_form})", "head": s.ablation_form})
    for lr in st.lrs:
        for form in st.forms:
            rows.append({"name": "+ 1 pass, fresh rollouts", "data": "fresh", "form": form,
                         "lr": float(lr)})  # fmt: skip
        rows.append({"name": "+ 1 pass, its own rollouts", "data": "own", "form": "filtered",
                     "lr": float(lr)})  # fmt: skip
    return rows


def run_study(cfg, run: dict, workdir: str) -> dict:
    """Fits and scores every protocol -> results (also written to WORKDIR/spr_study.*)."""
    model, tokenizer, step = load_policy(run["policy"])
    heads = {form: load_policy(h["ckpt"])[0].sprm for form, h in run["heads"].items()}
    main = cfg.spr.form
    st = cfg.study
    pool = run["eval"]["pools"][main]
    ks = [int(k) for k in cfg.eval.ks if int(k) > 1]

    log_stage(f"SPR study: {st.fresh_prompts} fresh prompts x {cfg.spr.k} rollouts")
    own_rows = run["rollouts"]
    fresh_rows = collect_rollouts(
        cfg, model, tokenizer, step, workdir, first=int(cfg.spr.rollout_prompts),
        count=int(st.fresh_prompts), name="fresh-rollouts.npz",
    )  # fmt: skip
    own = step_features(model, own_rows, step, progress=bool(cfg.progress))
    held = held_out_mask(cfg, own_rows["group"])
    own_train, held_set, held_group = own.take(~held), own.take(held), own_rows["group"][held]
    fresh = step_features(model, fresh_rows, step, progress=bool(cfg.progress))
    pool_feats = step_features(model, pool_rows(pool, tokenizer), step, mode="inference",
                               progress=bool(cfg.progress))  # fmt: skip
    check_pool_features(heads[main], pool_feats, pool)

    results = []
    for row in tqdm(protocols(cfg), desc="SPR study", unit="head", disable=not cfg.progress):
        if "head" in row:
            head = heads[row["head"]]
        else:
            data = fresh if row["data"] == "fresh" else own_train
            batch = min(int(st.batch), len(data))
            fit = HeadFitConfig(form=row["form"], steps=len(data) // batch, batch=batch,
                                lr=row["lr"], eval_every=10**9, seed=int(cfg.seed))  # fmt: skip
            head, _ = fit_head(heads[main], data, fit, held_out=held_set)
        results.append({
            **row,
            "best_of_k": pool_best_of_k(head, pool_feats, pool, ks),
            "held_out_best_of_group": rollout_best_of_group(head, held_set, held_group),
        })  # fmt: skip
    out = {
        "rows": results, "ks": ks, "group_size": int(cfg.spr.k), "batch": int(st.batch),
        "fresh_rollouts": int(len(fresh)), "fresh_correct": float(fresh_rows["labels"].mean()),
        "own_rollouts": int(len(own_train)), "held_out_rollouts": int(len(held_set)),
        "single_candidate": 100 * method_accuracy(pool, 1, "random")["mean"],
    }  # fmt: skip
    path = os.path.join(workdir, STUDY_FILE)
    write_result_json(f"{path}.json", out)
    write_text(f"{path}.txt", format_study(out))
    return out


def format_study(out: dict) -> str:
    ks = out["ks"]
    head = (f"{'head':34s} {'form':9s} {'lr':>7s}   "
            + "  ".join(f"{f'k={k}':>6s}" for k in ks)
            + f"   held-out best-of-{out['group_size']}")  # fmt: skip
    lines = [
        f"Best-of-k accuracy in % on the evaluation pool (single candidate "
        f"{out['single_candidate']:.1f}); one pass = each rollout once, batch {out['batch']}, "
        f"a new AdamW; fresh = {out['fresh_rollouts']} rollouts of unseen training prompts "
        f"({100 * out['fresh_correct']:.1f}% correct), own = the head's {out['own_rollouts']}.",
        head, "-" * len(head),
    ]  # fmt: skip
    for r in out["rows"]:
        lr = f"{r['lr']:g}" if "lr" in r else "-"
        cells = "  ".join(f"{r['best_of_k'][str(k)]:6.1f}" for k in ks)
        lines.append(f"{r['name']:34s} {r.get('form', '-'):9s} {lr:>7s}   {cells}   "
                     f"{r['held_out_best_of_group']:6.1f}")  # fmt: skip
    return "\n".join(lines)
