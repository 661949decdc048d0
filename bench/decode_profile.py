"""Where a fixed-length decode spends its time, by source line: the static sampler vs the engine.

One call of each side (the fixed-length workload of bench/engine_bench.py: 4 prompts x k=32, a
64-token prompt, 128 new tokens, the random Qwen2 of ~39M parameters, fp32) runs under the JAX
profiler with XLA's optimized HLO dumped. Each XLA op's time (summed over the threads that ran
it) goes to the source line most of its fused instructions came from, so the two sides' attention,
matmuls and page gathers compare directly. Op time is steadier than wall time on a drifting
machine: a ratio of op times is the cost ratio of the two decode loops.

    .venv/bin/python bench/decode_profile.py [--top 20]
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import sys
import tempfile

from common import qwen2_both_ways

_HOST_EVENTS = ("$", "Thunk", "Slinky", "np.", "Pjit", "Common", "end:")


def _op_lines(dump_dir: str, module: str) -> dict:
    """{op name: Counter of (file, line)} for the ops of the dumped `module` (optimized HLO)."""
    paths = glob.glob(os.path.join(dump_dir, f"*jit_{module}.cpu_after_optimizations.txt"))
    text = open(max(paths, key=os.path.getsize)).read()
    head, _, rest = text.partition("FunctionNames")
    files = dict(re.findall(r'^(\d+) "([^"]+)"', head, re.M))
    locations_text, _, frames_text = rest.partition("StackFrames")
    locations = {
        i: (os.path.basename(files.get(f, "?")), int(line))
        for i, f, line in re.findall(
            r"^(\d+) \{file_name_id=(\d+) function_name_id=\d+ line=(\d+)", locations_text, re.M
        )
    }
    frames = dict(re.findall(r"^(\d+) \{file_location_id=(\d+)", frames_text, re.M))
    bodies = dict(re.findall(r"^%?([\w.-]+) [^\n]*\{\n(.*?)\n\}", text, re.M | re.S))
    lines = {}
    for name, called in re.findall(
        r"^\s*(?:ROOT )?%?([\w.-]+) = [^\n]*?(?:calls|body)=%?([\w.-]+)", text, re.M
    ):
        ids = re.findall(r"stack_frame_id=(\d+)", bodies.get(called, ""))
        lines[name] = collections.Counter(locations.get(frames.get(i), ("?", 0)) for i in ids)
    return lines


def profile(fn, module: str, workdir: str) -> collections.Counter:
    """{'file:line' (or op name): op seconds} of one call of fn()."""
    import jax
    from jax._src.lib import _profile_data

    trace = os.path.join(workdir, f"trace_{module}")
    with jax.profiler.trace(trace):
        fn()
    xplane = glob.glob(os.path.join(trace, "**", "*.xplane.pb"), recursive=True)[0]
    lines = _op_lines(os.path.join(workdir, "hlo"), module)
    seconds = collections.Counter()
    for plane in _profile_data.ProfileData.from_file(xplane).planes:
        for row in plane.lines:
            for event in row.events:
                if event.name.startswith(_HOST_EVENTS):
                    continue
                where = lines.get(event.name)
                (file, line), _ = where.most_common(1)[0] if where else ((event.name, 0), 0)
                key = f"{file}:{line}" if where else event.name
                seconds[key] += event.duration_ns / 1e9
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="decode-profile-")
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (
        f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_enable_xprof_traceme=true "
        f"--xla_dump_to={os.path.join(workdir, 'hlo')} --xla_dump_hlo_as_text"
    )
    import jax
    import numpy as np

    jax.config.update("jax_enable_compilation_cache", False)  # a cached program dumps no HLO
    from metastone_jax.checkpoint import load_params_checkpoint
    from metastone_jax.sample import engine, sampler
    from metastone_jax.sample.processors import SamplingParams
    from metastone_jax.sprm.steps import StepTokens

    tmp, ckpt, _ = qwen2_both_ways(vocab=16000, hidden=512, layers=8, prefix="decode-profile-")
    model, _ = load_params_checkpoint(ckpt, compute_dtype="float32")
    shutil.rmtree(tmp)
    b, k, g = 4, 32, 128
    prompts = np.random.default_rng(0).integers(10, 16000, (b, 64)).tolist()
    params = SamplingParams(temperature=0.6, top_p=0.95, repetition_penalty=1.05,
                            max_new_tokens=g)  # fmt: skip
    step = StepTokens(step_ids=(7,), think_open=None, think_close=None)
    sides = {
        "decode": lambda: sampler.generate(
            model, prompts, k=k, params=params, step=step, seeds=list(range(b))
        ),
        "segment": lambda: engine.generate(
            model,
            prompts,
            k=k,
            params=params,
            step=step,
            seeds=list(range(b)),
            engine=engine.EngineConfig(slots=b * k),
        ),
    }
    totals = {}
    for module, fn in sides.items():
        fn()  # compiles (and dumps)
        seconds = profile(fn, module, workdir)
        totals[module] = sum(seconds.values())
        name = "static sampler (jit_decode)" if module == "decode" else "engine (jit_segment)"
        print(f"{name}: {totals[module]:.2f} op seconds, {b} x {k} rows x {g} tokens")
        for where, s in seconds.most_common(args.top):
            print(f"  {s:7.3f} s  {where}")
    print(f"op time engine / static: {totals['segment'] / totals['decode']:.3f} "
          f"(static / engine {totals['decode'] / totals['segment']:.3f})")  # fmt: skip
    shutil.rmtree(workdir)


if __name__ == "__main__":
    sys.exit(main())
