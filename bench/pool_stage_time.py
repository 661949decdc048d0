"""The demo's evaluation-pool stage (demo.pipeline.shared_pool: 200 held-out questions x 32
candidates, two heads) timed with two source trees, alternately in fresh processes (each pays
its own compilation, as the demo does), and the ratio printed.

    git worktree add /tmp/old_static 826cdfd   # the last commit whose pool is the static sampler
    .venv/bin/python bench/pool_stage_time.py --workdir=<a finished demo workdir> \\
        --baseline_tree=/tmp/old_static --rounds=2

A tree's checkpoints must load in it: for a tree older than the model config's `attention` field,
--baseline_workdir names a copy of the demo's spr/ heads with that key removed from
model_config.json (it was "auto", the default).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in a child: the tree's metastone_jax first on the path, the tree's own demo config.
CHILD = """
import importlib.util, os, shutil, sys, time
tree, workdir, out = sys.argv[1:4]
config_file = next(p for p in (os.path.join(tree, "metastone_jax", "configs", "demo.py"),
                               os.path.join(tree, "configs", "demo.py")) if os.path.isfile(p))
spec = importlib.util.spec_from_file_location("demo_config", config_file)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
from metastone_jax.demo.pipeline import held_out_records, shared_pool
cfg = module.get_config("full")
cfg.progress = False
records = held_out_records(cfg)
ckpts = {form: os.path.join(workdir, "spr", form) for form in ("bce", "filtered")}
start = time.perf_counter()
pools, _ = shared_pool(cfg, ckpts, "bce", out, records)
print("SECONDS", time.perf_counter() - start, len(pools["bce"]))
"""


def time_tree(tree: str, workdir: str) -> float:
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, PYTHONPATH=tree)
        done = subprocess.run([sys.executable, "-c", CHILD, tree, workdir, out], env=env,
                              capture_output=True, text=True)  # fmt: skip
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("SECONDS")]
    if done.returncode or not lines:
        raise SystemExit(f"{tree}: the pool run failed:\n{done.stderr[-2000:]}")
    return float(lines[-1].split()[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", required=True, help="a finished demo workdir (its spr/ heads)")
    p.add_argument("--baseline_tree", required=True, help="the source tree to compare against")
    p.add_argument("--baseline_workdir", default=None, help="the heads for the baseline tree")
    p.add_argument("--tree", default=ROOT, help="this source tree (default: the repository)")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    base_workdir = args.baseline_workdir or args.workdir
    rows = []
    for r in range(args.rounds):
        base = time_tree(args.baseline_tree, base_workdir)
        new = time_tree(args.tree, args.workdir)
        rows.append((base, new))
        print(f"round {r + 1}: baseline {base:.1f} s, this tree {new:.1f} s, "
              f"speed-up {base / new:.2f}x", flush=True)  # fmt: skip
    total_base, total_new = sum(b for b, _ in rows), sum(n for _, n in rows)
    print(f"all rounds: baseline {total_base:.1f} s, this tree {total_new:.1f} s, "
          f"speed-up {total_base / total_new:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
