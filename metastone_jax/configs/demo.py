"""The end-to-end demo: `metastone-jax demo [--workdir=DIR] [--quick] [--config.KEY=VALUE]`.

Presets: full (what `make demo` runs, 16-18 min on a 2-core CPU), quick (the same pipeline at toy
sizes, ~2 min; a test runs it and checks the artifacts, not the accuracy).

Stages (each resumable in WORKDIR): SFT of the policy on the synthetic task (tfds builder,
SentencePiece tokenizer, `metastone-jax train`), rollouts of the SFT policy on training prompts,
head-only SPR training on their cached step features (plain BCE, and the filtered SPR loss after
a BCE warm-up as the ablation), then test-time scaling on held-out problems.
"""

from ml_collections import ConfigDict

PRESETS = ("full", "quick")


def get_config(arg: str | None = None) -> ConfigDict:
    preset = arg or "full"
    if preset not in PRESETS:
        raise ValueError(f"unknown demo preset {preset!r}; expected one of {PRESETS}")
    c = ConfigDict(
        {
            "preset": preset,
            "seed": 0,
            # The synthetic task (metastone_jax.data.synthetic.make_examples): chained +/-,
            # one step per operation; a quarter of the training steps are reflective (a wrong
            # result corrected within the step), so the policy learns to notice a wrong result
            # where a step ends: the feature the SPRM reads (docs/demo.md).
            "task": {
                "min_ops": 3,
                "max_ops": 4,
                "max_operand": 9,
                "ops": "+-",
                "reflect": 0.25,
                "slips": "result",  # what a reflective step gets wrong first (SLIP_KINDS)
            },
            # ModelConfig overrides on the demo preset (configs/model.py).
            "model": {},
            "sft": {
                "steps": 2500,
                "batch_size": 16,
                "seq_len": 160,
                "max_prompt_len": 64,
                "synthetic_size": 30000,
                "lr": 1e-3,
                # Leave each reflective step's slip out of the loss (synthetic.slip_spans).
                "unlearned_slips": False,
            },
            "spr": {
                "rollout_prompts": 1024,  # training prompts rolled out by the SFT policy
                "k": 8,  # rollouts per prompt
                # The main head: plain BCE on every step. The released code's filtered loss is the
                # ablation: it drops the errors the head misses and so confirms them, and its
                # best-of-k trails BCE's on held-out rollouts, on fresh rollouts too
                # (`--spr-study`; docs/spr-loss-study.md).
                "form": "bce",
                "ablation_form": "filtered",  # "" = skip
                # Plain BCE before the filter (train/head_only.py: a sound start; from a random
                # head the filter locks onto one class). Used by the filtered form only.
                "warmup_bce_steps": 1500,
                "steps": 2000,
                "batch": 256,
                "lr": 1e-3,
                "held_out_fraction": 0.1,  # rollouts kept aside for the "aha" curve
            },
            "eval": {
                "questions": 200,  # held-out problems (never in the SFT data)
                "samples": 32,  # candidates per question; k in ks uses floor(32/k) groups
                "ks": (1, 2, 8, 32),
                "beam_ks": (2, 8, 32),
            },
            # Sampling for rollouts and evaluation. The SFT policy is ~96% right at temperature
            # 1.0. Temperature 3 flattens its likeliest tokens so that single candidates are
            # ~55% right; top-k 3 and top-p 0.85 (applied after the temperature) keep only
            # what the policy itself finds plausible, so its errors come where it is unsure (a
            # result, mostly), not where it is sure (the operands it copies): at top-p 1, slips
            # in those copies are errors its own features cannot see (docs/demo.md).
            # No repetition penalty: the task's answers repeat digits on purpose.
            "sampling": {
                "temperature": 3.0,
                "top_p": 0.85,
                "top_k": 3,
                "repetition_penalty": 1.0,
                "max_new_tokens": 128,
            },
            # `metastone-jax demo --spr-study` (demo/spr_study.py): the demo's main head given
            # one more pass over rollouts of `fresh_prompts` unseen training prompts (and over
            # its own) with each loss form in `forms` at each LR in `lrs`.
            "study": {
                "fresh_prompts": 1024,
                "forms": ("bce", "filtered", "paper"),
                "lrs": (1e-3, 3e-4, 1e-4),
                "batch": 64,
            },
            # `metastone-jax demo --grpo-study` (demo/grpo_study.py): the head trained inside
            # GRPO, as released, while the policy moves under it: from the SFT policy and the
            # main head, one GRPO + SPR run per form in `forms` (`steps` steps of `prompts`
            # prompts x spr.k rollouts at the demo's sampling), identical but for the SPR form.
            "grpo_study": {
                "forms": ("bce", "filtered"),
                "steps": 200,
                "prompts": 16,
                # rl.logprob_support: the rollouts are drawn from the top-k/top-p cut. Scored
                # under the whole softmax ("full", as verl) the reward holds for 100 steps at LR
                # 1e-5, then falls to 0.06 by step 200 (KL 0.9); "sampled" scores them under the
                # distribution they were drawn from (docs/spr-loss-study.md).
                "logprob_support": "sampled",
                "lr": 1e-5,  # the policy's AdamW LR; at 3e-4 ("full") the reward fell in 10 steps
                "head_lr": 1e-3,  # as the demo's heads
                "entropy_coef": 0.0,  # the bonus adds to the same drain
                # "main": start from the demo's main (BCE) head, a sound start for the filter;
                # "random": the SFT export's untrained head, as the released runs start theirs.
                "head_init": "main",
                # The SPR loss's normalisation scope (configs/train.py spr.scope/spr.ranks):
                # "batch" pools the counts over the whole update; "rank" as released, per
                # micro-batch of `grad_accum` and per emulated data-parallel rank.
                "spr_scope": "batch",
                "spr_ranks": 4,  # the released 1.5B run: 8 GPUs, sequence parallel 2
                "grad_accum": 1,  # micro-batches per update (rank scope: rows per rank = 128/(4A))
                # A name for the study's outputs: WORKDIR/grpo-study[-tag], grpo_study[-tag].*,
                # so studies under other settings sit beside each other.
                "tag": "",
            },
            "progress": True,
        }
    )
    if preset == "quick":
        c.task.update(min_ops=2, max_ops=3, max_operand=9)
        c.model = {"d_model": 64, "n_layers": 2, "d_ff": 192}
        c.sft.update(steps=120, seq_len=128, max_prompt_len=48, synthetic_size=1024)
        c.spr.update(rollout_prompts=64, k=4, warmup_bce_steps=10, steps=40, batch=64)
        c.eval.update(questions=8, beam_ks=(2, 8))
        c.sampling.max_new_tokens = 80
        c.study.update(fresh_prompts=32, lrs=(1e-3,), batch=16)
        c.grpo_study.update(steps=2, prompts=4)
    return c
