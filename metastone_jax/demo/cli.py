"""`metastone-jax demo [--workdir=DIR] [--quick] [--spr-study] [--grpo-study] [--config.KEY=VALUE
...]` (what `make demo` runs).

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

USAGE = (
    "usage: metastone-jax demo [--workdir=DIR] [--quick] [--spr-study] [--grpo-study] "
    "[--config.KEY=VALUE ...]"
)


def main(argv: list[str]) -> None:
    from metastone_jax.main import CONFIGS, _parse

    workdir, quick, study, grpo_study, overrides = None, False, False, False, []
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__.strip() + "\n" + USAGE)
            return
        if arg.startswith("--workdir="):
            workdir = arg.split("=", 1)[1]
        elif arg == "--quick":
            quick = True
        elif arg == "--spr-study":
            study = True
        elif arg == "--grpo-study":
            grpo_study = True
        elif arg.startswith("--config."):
            overrides.append(arg)
        else:
            raise SystemExit(f"metastone-jax demo: unknown argument {arg!r}\n{USAGE}")
    preset = "quick" if quick else "full"
    workdir = workdir or os.path.join("runs", f"demo-{preset}")
    config_file = os.path.join(CONFIGS, "demo.py")
    cfg = _parse(["metastone-jax demo", f"--config={config_file}:{preset}", *overrides],
                 preset, config_file)  # fmt: skip
    from metastone_jax.demo import pipeline, report

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
        from metastone_jax.demo import spr_study

        out = spr_study.run_study(cfg, run, workdir)
        print()
        print(spr_study.format_study(out))
        print(f"wrote {os.path.join(workdir, spr_study.STUDY_FILE)}.json and .txt")
    if grpo_study:
        from metastone_jax.demo import grpo_study as grpo

        out = grpo.run_grpo_study(cfg, run, workdir)
        print()
        print(grpo.format_grpo_study(out))
        print(f"wrote {grpo.study_paths(cfg, workdir)[1]}.json, .txt and .png")
    print(f"done in {(time.perf_counter() - t0) / 60:.1f} min", file=sys.stderr)
