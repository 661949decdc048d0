"""CPU scaling sweep: `metastone-jax sweep --config=cpu --workdir=DIR` (the default config).

Three demo model sizes (each trained on the synthetic arithmetic task by the demo pipeline's
`train_for_sweep`) x k in {1, 2, 4, 8, 16, 32} x thinking budget {off, 24 tokens}: 36 points.
100 held-out questions, 32 candidates per question and point (floor(32 / k) disjoint groups of
k). Every k divides 32, so the six points of a size and budget share one sampling run
(metastone_jax/scaling/sweep.py): six runs of 100 x 32 candidates in all. The demo task's
thinking is ~40 tokens (3-4 steps, some with a correction), so a budget of 24 cuts it short:
less compute, lower accuracy. Sizes stop at the demo model so that the sweep, training
included, fits in an hour on a 2-core CPU.

Override any key with --config.KEY=VALUE, e.g. --config.questions=20 --config.ks="(1,4)"
--config.think_budgets="(None,24)"; an unknown key lists the valid ones.
"""

from ml_collections import ConfigDict


def _size(d_model: int, n_layers: int) -> dict:
    # d_ff = 3 d_model, 4 heads over 2 KV heads, like the demo preset (configs/model.py:demo).
    return {"d_model": d_model, "n_layers": n_layers, "n_heads": 4, "n_kv_heads": 2,
            "d_ff": 3 * d_model}  # fmt: skip


def get_config(arg: str | None = None) -> ConfigDict:
    del arg  # no presets
    return ConfigDict(
        {
            # name -> model overrides (ModelConfig fields) given to the trainer. Names are
            # identifiers so that --config.sizes.NAME.FIELD=V works (absl parses the key path).
            "sizes": {
                "demo_s": _size(64, 2),
                "demo_m": _size(96, 3),
                "demo": _size(128, 4),
            },
            "ks": (1, 2, 4, 8, 16, 32),
            "think_budgets": (None, 24),  # None: off; ints: max tokens inside <think>...</think>
            "questions": 100,  # held-out synthetic "test" questions
            "candidates_per_point": 32,  # floor(32 / k) groups of k per question
            "chunk_questions": 10,  # questions that warm the engine up (untimed)
            # The task and the sampling (also the SPRM heads' rollouts) are the demo's
            # (configs/demo.py: T 3.0, then top-k 3 and top-p 0.85; docs/demo.md).
            "sampling": {"temperature": 3.0, "top_p": 0.85, "top_k": 3, "max_new_tokens": 128},
            "task": {"min_ops": 3, "max_ops": 4, "max_operand": 9, "ops": "+-"},
            "seed": 0,
            # --print_commands: one command per point from `command` (fields: name, zone,
            # config, workdir, point_id, overrides); workdir empty = the --workdir given.
            "tpu": {
                "name": "metastone-sweep",
                "zone": "us-central2-b",
                "workdir": "",
                "command": (
                    "gcloud compute tpus tpu-vm ssh {name} --zone={zone} --worker=all "
                    '--command="cd ~/metastone-jax && metastone-jax sweep --config={config} '
                    '--workdir={workdir} --only={point_id}{overrides}"'
                ),
            },
        }
    )
