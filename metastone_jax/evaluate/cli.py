"""`metastone-jax evaluate --ckpt=DIR --benchmark=FILE --modes=low,medium,high --samples=M`.

Samples M candidates per question once (resumable: re-run the same command after a kill), then
reports pass@1 per mode over floor(M/k) disjoint groups, maj@k and pass@k, and writes
OUT/metrics.json. Bad arguments exit with one line before the checkpoint or benchmark is read.
"""

from __future__ import annotations

import json
import os
import sys

from metastone_jax.cli_common import Parser
from metastone_jax.evaluate import harness
from metastone_jax.evaluate.harness import STRATEGIES, STRATEGY_METHOD
from metastone_jax.evaluate.metrics import GROUP_COUNTS
from metastone_jax.sample.cli import (
    add_engine_args,
    add_sampling_args,
    engine_from_args,
    sampling_from_args,
)


def parser() -> Parser:
    p = Parser(prog="metastone-jax evaluate", description=__doc__)
    p.add_argument("--ckpt", required=True, help="params checkpoint (from `convert hf-to-jax`)")
    p.add_argument("--benchmark", required=True, help=".jsonl or .parquet benchmark file")
    p.add_argument("--modes", default="low,medium,high", help="comma-separated: low,medium,high "
                   "(k = 2 / 8 / 32); empty with --ks")  # fmt: skip
    p.add_argument("--ks", default="", help="comma-separated extra k values, e.g. 4,16")
    p.add_argument("--samples", type=int, default=None,
                   help="candidates per question (M >= the largest k; not for beam)")  # fmt: skip
    p.add_argument("--strategy", default="best_of_k", help="|".join(STRATEGIES))
    p.add_argument("--groups", default="per_question",
                   help="groups of k per question when candidate counts differ: per_question "
                   "(floor(M/k) each) or common (floor(min M/k) for all: the released "
                   "metric)")  # fmt: skip
    p.add_argument("--out", default=None,
                   help="output directory (default: eval/<ckpt name>/<benchmark>)")  # fmt: skip
    add_sampling_args(p, max_new_tokens=32768)  # the released evaluation's budget
    add_engine_args(p)
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print metrics.json instead of a table")
    return p


def _ints(flag: str, text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated integers, got {text!r}") from None


def main(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    ks = _ints("--ks", args.ks)
    sampling, step_ids = sampling_from_args(args)
    if args.strategy not in STRATEGIES:
        raise ValueError(f"--strategy: expected one of {STRATEGIES}, got {args.strategy!r}")
    if args.groups not in GROUP_COUNTS:
        raise ValueError(f"--groups: expected one of {GROUP_COUNTS}, got {args.groups!r}")
    if not os.path.isdir(args.ckpt):
        raise ValueError(f"--ckpt: {args.ckpt}: no such directory")
    if not os.path.isfile(args.benchmark):
        raise ValueError(f"--benchmark: {args.benchmark}: no such file")
    out = args.out or os.path.join(
        "eval",
        os.path.basename(os.path.normpath(args.ckpt)),
        os.path.splitext(os.path.basename(args.benchmark))[0],
    )
    report = harness.evaluate(  # an attribute, so tests can replace it
        args.ckpt, args.benchmark, modes=modes, ks=ks, samples=args.samples,
        strategy=args.strategy, out_dir=out, sampling=sampling, step_ids=step_ids,
        engine=engine_from_args(args), seed=args.seed,
        limit=args.limit, groups=args.groups,
        chat_template=not args.no_chat_template, progress=not args.no_progress,
    )  # fmt: skip
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
        return
    print(format_table(report))
    print(f"wrote {os.path.join(out, 'metrics.json')}")


def _cell(m: dict | None) -> str:
    if m is None:
        return "-"
    lo, hi = m["ci95"]
    return f"{100 * m['mean']:5.1f} [{100 * lo:5.1f}, {100 * hi:5.1f}]"


def format_table(report: dict) -> str:
    """One row per mode: pass@1 (by the strategy's selection), maj@k, pass@k, tokens."""
    strategy = report["strategy"]
    what = f"{report['samples']} samples each, " if report.get("samples") else ""
    pick = STRATEGY_METHOD.get(strategy, "beam search")
    lines = [
        f"{os.path.basename(report['benchmark'])}: {report['n_questions']} questions, {what}"
        f"strategy {strategy} (pass@1 by {pick}); accuracy % [95% interval]",
        f"{'mode':<8} {'k':>4}  {'pass@1':<20} {'maj@k':<20} {'pass@k':<20} {'tokens/q':>10}",
    ]
    for label, row in report["modes"].items():
        lines.append(
            f"{label:<8} {row['k']:>4}  {_cell(row['pass@1']):<20} {_cell(row.get('maj@k')):<20} "
            f"{_cell(row.get('pass@k')):<20} {row['tokens_per_question']:>10.0f}"
        )
    return "\n".join(lines)
