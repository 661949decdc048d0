"""An example TPU sweep: larger sizes and more questions than configs/sweeps/cpu.py.

    metastone-jax sweep --config=tpu_example --workdir=/mnt/sweep \\
        --print_commands

prints one command per point (config.tpu.command); each runs `--only=POINT_ID` on the TPU VM.
Run the points of one size one after another (the first trains the size's model in
WORKDIR/models/SIZE, the others reuse it), and keep WORKDIR on one shared file system (e.g. a
gcsfuse-mounted bucket) so that points.jsonl gathers every point; a last run without --only
writes the table, plot and fit.
"""

import importlib.util
import os


def _cpu_config():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu.py")
    spec = importlib.util.spec_from_file_location("metastone_sweep_cpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, module.get_config()


def get_config(arg: str | None = None):
    del arg  # no presets
    cpu, c = _cpu_config()
    c.sizes = {"d256": cpu._size(256, 8), "d512": cpu._size(512, 12), "d768": cpu._size(768, 16)}
    c.think_budgets = (None, 8, 12)
    c.questions = 500
    c.chunk_questions = 32
    c.tpu.name = "metastone-v5e-8"
    c.tpu.zone = "us-west4-a"
    c.tpu.workdir = "/mnt/sweep"
    return c
