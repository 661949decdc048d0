"""`metastone-jax demo`: the end-to-end demo (what `make demo` runs).

  metastone-jax demo [--workdir=DIR] [--quick] [--spr-study] [--grpo-study]

Trains a small policy on the synthetic arithmetic task, trains its SPRM head from outcome labels
alone, and prints test-time scaling on held-out problems; configs/demo.py has every setting.
Re-running the same command resumes (finished stages are reused). --spr-study then runs the
SPR-loss study on the workdir (demo/spr_study.py: the filtered SPR loss vs plain BCE on fresh
rollouts) and prints its table; --grpo-study compares the two losses with the head trained inside
GRPO while the policy moves (demo/grpo_study.py).
"""

from __future__ import annotations

import os
import sys
import time

from metastone_jax.cli_common import Parser, add_config_flags, add_workdir_flag, load_config, parse
from metastone_jax.demo import grpo_study as grpo
from metastone_jax.demo import pipeline, report, spr_study

PROG = "metastone-jax demo"
CONFIG_FILES = ("demo.py",)


def parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__)
    add_workdir_flag(p, "every stage is written and resumed here (default: runs/demo-PRESET)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="the same pipeline at toy sizes, ~2 min (is --config=quick)",
    )
    p.add_argument(
        "--spr-study",
        dest="spr_study",
        action="store_true",
        help="then the SPR-loss study on the workdir",
    )
    p.add_argument(
        "--grpo-study",
        dest="grpo_study",
        action="store_true",
        help="then both losses with the head trained inside GRPO",
    )
    add_config_flags(p, CONFIG_FILES, default="full")
    return p


def main(argv: list[str]) -> None:
    p = parser()
    args = parse(p, argv)
    if args.quick:
        if any(arg.split("=", 1)[0] == "--config" for arg in argv):
            p.error("--quick is --config=quick: give one of them")
        args.config = "quick"
    cfg = load_config(PROG, args.config, args.overrides, CONFIG_FILES)
    preset = cfg.preset
    workdir = args.workdir or os.path.join("runs", f"demo-{preset}")
    study, grpo_study = args.spr_study, args.grpo_study
    t0 = time.perf_counter()
    print(f"metastone-jax demo ({preset}): workdir {workdir}", flush=True)
    run = pipeline.run(cfg, workdir)
    results = report.build_results(cfg, run)
    results["wall_s"] = time.perf_counter() - t0  # this invocation (resumed stages are free)
    paths = report.write(results, run, workdir)
    print()
    print(f"Held-out problems: {results['questions']}, {results['samples']} candidates each; "
          f"accuracy in % with 95% intervals (k > 1: floor({results['samples']}/k) disjoint "
          "groups per question)")  # fmt: skip
    print(report.format_table(results))
    for form, last in results["heads"].items():
        print(f"SPRM head ({form}): held-out mean score correct {last['score_correct']:.3f}, "
              f"incorrect {last['score_incorrect']:.3f}, gap {last['score_gap']:+.3f}")  # fmt: skip
    print()
    print(report.format_diagnoses(results))
    print("wrote " + ", ".join(paths.values()))
    if study:
        out = spr_study.run_study(cfg, run, workdir)
        print()
        print(spr_study.format_study(out))
        print(f"wrote {os.path.join(workdir, spr_study.STUDY_FILE)}.json and .txt")
    if grpo_study:
        out = grpo.run_grpo_study(cfg, run, workdir)
        print()
        print(grpo.format_grpo_study(out))
        print(f"wrote {grpo.study_paths(cfg, workdir)[1]}.json, .txt and .png")
    print(f"done in {(time.perf_counter() - t0) / 60:.1f} min", file=sys.stderr)
