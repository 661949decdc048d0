"""The engine segment by segment on the demo's evaluation workloads: where the slots idle.

Runs one of the demo's evaluation-stage engine calls on a finished demo run's heads (WORKDIR/spr/
bce, WORKDIR/spr/filtered; the demo's config, preset "full", progress off) and logs every
segment of the continuous-batching engine (sample/engine.py) by wrapping `Engine._fill`,
`_exit_settled` and `_harvest` (restored afterwards):

  pool: `demo.pipeline.shared_pool`, the demo's sampling of eval.samples candidates per held-out
    question with the bce head, scored by both heads (pool files in a temporary directory).
  beam: `evaluate.harness.beam_eval` with the bce head at k=--beam_k (step-level beam search:
    each question's candidates decode as a group that pauses at every step boundary).

One JSON line per segment goes to --out (default: a temporary file, its path printed): the slot
count (size), slots running after the refill, live / paused at a step barrier / finished at its
end, candidates still queued after the refill, free pages at its start and end, the exit
threshold it ran with (exit_settled: settled slots that end it), its decode steps, the tokens
its running slots decoded (seg_tokens) and seg_tokens / (steps x size) (seg_occ).

Printed: per phase (the queue non-empty after the refill; the tail, the queue empty; the whole
run) the segments, steps, decoded tokens / slot-steps, slots running and the fewest free pages;
then the prompt lengths, the candidates' lengths (mean, median, p90, how many reach
max_new_tokens) and `EngineStats.occupancy` (the final candidates' tokens / slot-steps: below
the decoded share where beam search prunes rows). bench/RESULTS.md ("The evaluation pool's slot
occupancy, measured per segment") has a full run of each.

    .venv/bin/python bench/engine_segments.py --mode=pool --workdir=WORKDIR [--questions=N]
    .venv/bin/python bench/engine_segments.py --mode=beam --beam_k=32 --workdir=WORKDIR
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

HEADS = ("bce", "filtered")  # the demo's main head (it samples) and its ablation
WRAPPED = ("_fill", "_exit_settled", "_harvest", "_run")  # Engine methods, restored on exit


class SegmentLog:
    """Wraps the engine's methods while active: one record per segment, one per call."""

    def __init__(self):
        self.segments: list[dict] = []
        self.calls: list[dict] = []  # per `Engine._run`: stats, layout, lengths
        self._cur: dict = {}

    def __enter__(self):
        import jax
        import numpy as np

        from metastone_jax.sample import engine as E

        self._E = E
        self._orig = {n: getattr(E.Engine, n) for n in WRAPPED}
        orig, cur, log = self._orig, self._cur, self

        def occupied(eng):
            return np.array([r is not None for r in eng.slot_req])

        def fill(eng):
            orig["_fill"](eng)
            cur.clear()
            cur.update(
                size=len(eng.slot_req),
                running=int(occupied(eng).sum()),
                queue=len(eng.queue) + len(eng.resumes),
                free_pages_start=len(eng.free),
                len0=np.asarray(jax.device_get(eng.state.length)).copy(),
                steps0=eng.stats.steps,
            )

        def exit_settled(eng):
            cur["exit_settled"] = v = orig["_exit_settled"](eng)
            return v

        def harvest(eng, results, bar):
            st = eng.state  # before the harvest: the segment's own end
            done, length, paused = jax.device_get((st.done, st.length, st.paused))
            occ = occupied(eng)
            steps = eng.stats.steps - cur["steps0"]
            len0 = cur["len0"]
            grown = (int(np.maximum(length - len0, 0)[occ].sum())
                     if len(length) == len(len0) else None)  # fmt: skip
            rec = dict(
                call=len(log.calls), seg=eng.stats.segments, size=cur["size"],
                running=cur["running"], live_end=int((occ & ~done & ~paused).sum()),
                paused_end=int((occ & paused & ~done).sum()),
                finished_end=int((occ & done).sum()), queue=cur["queue"],
                free_pages_start=cur["free_pages_start"], free_pages_end=len(eng.free),
                exit_settled=cur.get("exit_settled"), steps=steps, seg_tokens=grown,
                seg_occ=(grown / (steps * cur["size"]) if steps and grown is not None else None),
            )  # fmt: skip
            out = orig["_harvest"](eng, results, bar)
            rec["preemptions"] = eng.stats.preemptions  # so far
            log.segments.append(rec)
            return out

        def run(eng):
            cands, stats = orig["_run"](eng)
            log.calls.append(dict(
                stats=stats, layout=eng.layout, prompt_lens=[len(p) for p in eng.prompts],
                lengths=np.asarray(cands.length), max_new=eng.opts.params.max_new_tokens,
            ))  # fmt: skip
            return cands, stats

        E.Engine._fill, E.Engine._exit_settled = fill, exit_settled
        E.Engine._harvest, E.Engine._run = harvest, run
        return self

    def __exit__(self, *exc):
        for name, fn in self._orig.items():
            setattr(self._E.Engine, name, fn)
        return False


def phase_rows(segments: list[dict], pages: int) -> list[str]:
    """The summary table's rows (markdown): the queue phase, the tail, the whole run."""
    import numpy as np

    rows = [
        "| phase | segments | steps (per segment) | decoded / slot-steps | slots running "
        "(min / mean / max) | live at end (min) | paused at end (mean) | free pages (min) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    phases = [
        ("queue non-empty", [r for r in segments if r["queue"] > 0]),
        ("tail (queue empty)", [r for r in segments if r["queue"] == 0]),
        ("run", segments),
    ]
    for name, sel in phases:
        if not sel:
            rows.append(f"| {name} | 0 | | | | | | |")
            continue
        steps = sum(r["steps"] for r in sel)
        slot_steps = sum(r["steps"] * r["size"] for r in sel)
        tokens = sum(r["seg_tokens"] or 0 for r in sel)
        share = f"{tokens / slot_steps:.1%} ({tokens:,} / {slot_steps:,})" if slot_steps else "-"
        running = [r["running"] for r in sel]
        free = min(min(r["free_pages_start"], r["free_pages_end"]) for r in sel)
        rows.append(
            f"| {name} | {len(sel)} | {steps:,} ({steps / len(sel):.1f}) | {share} | "
            f"{min(running)} / {np.mean(running):.1f} / {max(running)} | "
            f"{min(r['live_end'] for r in sel)} | "
            f"{np.mean([r['paused_end'] for r in sel]):.1f} | {free} of {pages:,} |"
        )
    return rows


def summary(call: dict, segments: list[dict]) -> list[str]:
    import numpy as np

    st, lay, lengths = call["stats"], call["layout"], call["lengths"]
    plens, g = call["prompt_lens"], call["max_new"]
    lines = [
        f"layout: {lay.slots} slots, {lay.pages:,} pages of {lay.page_size} tokens, "
        f"{lay.impl}; max_new_tokens {g}",
        f"prompts: {len(plens)}, length min / mean / max {min(plens)} / {np.mean(plens):.1f} / "
        f"{max(plens)}",
        f"candidates: {lengths.size:,}, length mean {lengths.mean():.1f}, median "
        f"{np.median(lengths):.0f}, p90 {np.percentile(lengths, 90):.0f}, max {lengths.max()}; "
        f"{int((lengths >= g).sum()):,} at max_new_tokens",
        "",
        *phase_rows(segments, lay.pages),
        "",
        f"EngineStats.occupancy {st.occupancy:.1%} (final candidates' tokens {st.tokens:,} / "
        f"slot-steps {st.slot_steps:,}); {st.segments} segments, {st.steps:,} steps, "
        f"{st.preemptions} preemptions, {st.resizes} resizes, {st.prefills} prefills; "
        f"{st.seconds:.1f}s",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", default="pool", choices=("pool", "beam"))
    parser.add_argument(
        "--workdir",
        required=True,
        help="a finished demo run's workdir (its spr/bce, spr/filtered heads)",
    )
    parser.add_argument("--beam_k", type=int, default=32, help="beam mode: beam_eval's k")
    parser.add_argument(
        "--questions",
        type=int,
        default=0,
        help="the first N held-out questions (0: all of the demo's)",
    )
    parser.add_argument(
        "--out", default="", help="the per-segment JSON lines (default: a temporary file)"
    )
    args = parser.parse_args()

    from metastone_jax.configs import demo as demo_config
    from metastone_jax.demo.pipeline import held_out_records, shared_pool

    cfg = demo_config.get_config("full")
    cfg.progress = False
    records = held_out_records(cfg)
    if args.questions:
        records = records[: args.questions]
    ckpts = {name: os.path.join(args.workdir, "spr", name) for name in HEADS}
    for path in ckpts.values():
        if not os.path.isdir(path):
            raise SystemExit(f"{path}: no such head (--workdir: a finished demo run's workdir)")
    out = args.out or tempfile.mkstemp(prefix="engine_segments-", suffix=".jsonl")[1]

    if args.mode == "pool":
        what = (f"pool: {len(records)} questions x {int(cfg.eval.samples)} candidates "
                f"(shared_pool, heads {', '.join(HEADS)})")  # fmt: skip
    else:
        what = f"beam: {len(records)} questions, k={args.beam_k} (beam_eval, head bce)"
    print(what, flush=True)
    t0 = time.perf_counter()
    with SegmentLog() as log:
        if args.mode == "pool":
            with tempfile.TemporaryDirectory(prefix="engine_segments-") as d:
                shared_pool(cfg, ckpts, "bce", d, records)
        else:
            from metastone_jax.checkpoint import load_policy
            from metastone_jax.evaluate.harness import beam_eval
            from metastone_jax.train.policy_and_heads import sampling_params

            model, tokenizer, step = load_policy(ckpts["bce"])
            beam_eval(model, tokenizer, records, k=args.beam_k,
                      sampling=sampling_params(cfg, tokenizer), step=step, seed=int(cfg.seed),
                      progress=False)  # fmt: skip
    elapsed = time.perf_counter() - t0

    with open(out, "w") as f:
        for rec in log.segments:
            f.write(json.dumps(rec) + "\n")
    print(f"{len(log.segments)} segments logged to {out}; {elapsed:.1f}s in all")
    for i, call in enumerate(log.calls):
        if len(log.calls) > 1:
            print(f"\nengine call {i + 1} of {len(log.calls)}")
        print("\n".join(summary(call, [r for r in log.segments if r["call"] == i])))


if __name__ == "__main__":
    main()
