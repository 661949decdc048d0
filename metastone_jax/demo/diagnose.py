"""Why SPRM selection picks what it picks, on the synthetic task, whose steps can be checked
exactly (`data.synthetic.check_steps` / `first_error`): labels the SPRM never sees in training.

- step AUROC: the candidates' recorded step scores against "every step so far is right";
- picks: the first error of the candidate each method selects, per k (the released metric's
  floor(M/k) disjoint groups), against the same breakdown over all candidates. Errors after the
  last step token ("unfinished") or after `</think>` ("answer") are invisible to any step scorer.

`python -m metastone_jax.demo.diagnose POOL.jsonl [--ks=1,2,8,32]` prints it for a demo pool.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import numpy as np

from metastone_jax.data.synthetic import check_solution
from metastone_jax.evaluate.metrics import select_candidate

KINDS = ("ok", "step", "unfinished", "steps", "answer")


def auroc(labels, scores) -> float:
    """Probability that a random positive outscores a random negative (ties count half);
    NaN without both classes."""
    y = np.asarray(labels, bool)
    s = np.asarray(scores, np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # 1-based ranks, ties sharing their average rank
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def diagnose(questions: list[dict], ks=(1, 2, 8, 32), method: str = "sprm_geomean") -> dict:
    """questions: pool lines (prompt, candidates with text, answer, correct, step_scores) ->
    {"step_auroc", "aligned_fraction", "candidates": {kind: share}, "picks": {k: {kind: share}},
    "pick_accuracy": {k: float}}. Step scores are matched to written steps only where their
    counts agree (`aligned_fraction` of the candidates)."""
    scores, labels, aligned = [], [], 0
    kinds: list[list[str]] = []  # per question, per candidate
    for q in questions:
        kinds.append([])
        for c in q["candidates"]:
            steps, kind = check_solution(q["prompt"], c["text"], c.get("answer"))
            kinds[-1].append(kind)
            if len(steps) == len(c["step_scores"]):
                aligned += 1
                scores += list(c["step_scores"])
                labels += steps
    total = sum(len(kq) for kq in kinds)
    counts = Counter(kind for kq in kinds for kind in kq)
    picks, accuracy = {}, {}
    for k in ks:
        chosen: Counter = Counter()
        hits = n = 0
        for q, kq in zip(questions, kinds, strict=True):
            cands = q["candidates"]
            for g in range(len(cands) // k):
                i = g * k + select_candidate(cands[g * k : (g + 1) * k], method)
                chosen[kq[i]] += 1
                hits += bool(cands[i]["correct"])
                n += 1
        picks[int(k)] = {kind: chosen[kind] / max(n, 1) for kind in KINDS}
        accuracy[int(k)] = hits / max(n, 1)
    return {
        "method": method,
        "step_auroc": auroc(labels, scores),
        "aligned_fraction": aligned / max(total, 1),
        "candidates": {kind: counts[kind] / max(total, 1) for kind in KINDS},
        "picks": picks,
        "pick_accuracy": accuracy,
    }


def format_diagnosis(d: dict) -> str:
    lines = [
        f"step AUROC of the SPRM step scores vs exact step labels: {d['step_auroc']:.3f} "
        f"({d['aligned_fraction']:.1%} of candidates aligned)",
        f"first error of the candidate {d['method']} picks (share, %); 'unfinished' and "
        "'answer' are invisible to step scores",
        f"{'':>18}" + "".join(f"{kind:>12}" for kind in KINDS),
        f"{'all candidates':>18}" + "".join(f"{100 * d['candidates'][kd]:>12.1f}" for kd in KINDS),
    ]
    for k, shares in d["picks"].items():
        lines.append(
            f"{f'picked, k={k}':>18}" + "".join(f"{100 * shares[kd]:>12.1f}" for kd in KINDS)
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("pool", help="a candidate pool JSONL of the synthetic task (demo eval/)")
    p.add_argument("--ks", default="1,2,8,32")
    p.add_argument("--method", default="sprm_geomean")
    args = p.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    with open(args.pool) as f:
        questions = [json.loads(line) for line in f if line.strip()]
    print(format_diagnosis(diagnose(questions, ks, args.method)))


if __name__ == "__main__":
    main()
