"""Train config: `metastone-jax train --config=<preset> --workdir=DIR` (or
--config=configs/train.py:<preset> from the repository root).

Presets:
  tiny-sft, tiny-grpo   the tiny model on the synthetic arithmetic task (tests, smoke runs)
  demo-sft, demo-grpo   the demo model on the synthetic task (laptop CPU)
  sft-1.5b, grpo-1.5b   MetaStone-S1-1.5B settings (docs/method.md sections 3-4) on a math file:
                        set --config.data.source=FILE and --config.init_ckpt=CKPT

Override any key with --config.a.b=value; an unknown key lists the valid ones.
"""

import importlib.util
import os

from ml_collections import ConfigDict, config_dict


def model_config(preset: str) -> ConfigDict:
    """configs/model.py's config for `preset` (the model.py beside this file, loaded by path as
    ml_collections loads a config file, so that a copied config directory uses its own)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model.py")
    spec = importlib.util.spec_from_file_location("metastone_model_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


PRESETS = ("tiny-sft", "tiny-grpo", "demo-sft", "demo-grpo", "sft-1.5b", "grpo-1.5b")

# From-scratch models: the chat template of the SentencePiece tokenizer trained on the data.
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Answer: {% endif %}"
)


def get_config(arg: str | None = None) -> ConfigDict:
    preset = arg or "tiny-sft"
    if preset not in PRESETS:
        raise ValueError(f"unknown train preset {preset!r}; expected one of {PRESETS}")
    size, kind = preset.split("-")[0], preset.split("-")[1]
    if preset.endswith("1.5b"):
        kind, size = preset.split("-")[0], "metastone-s1-1.5b"
    base = model_config(size)
    released = size.startswith("metastone")
    grpo = kind == "grpo"
    c = ConfigDict(
        {
            "preset": preset,
            "kind": kind,  # sft | grpo | spr
            "model": base.model,
            "mesh": base.mesh,
            "seed": 0,
            # A params checkpoint to start from (`metastone-jax convert` output or an export);
            # empty: random init (from-scratch models).
            "init_ckpt": "",
            "tokenizer": {
                # A tokenizer directory; empty: the init checkpoint's, else one is trained on the
                # training data into WORKDIR/tokenizer (SentencePiece; see data/spm_train.py).
                "path": "",
                "vocab_size": 384,
                "chat_template": PLAIN_TEMPLATE,
            },
            "data": {
                # "synthetic" (the built-in arithmetic task) or a .jsonl/.parquet math file.
                "source": "synthetic",
                "synthetic_size": 4096,
                # synthetic task knobs (metastone_jax.data.synthetic.make_examples)
                "task": {
                    "min_ops": 2,
                    "max_ops": 3,
                    "max_operand": 9,
                    "ops": "+-",
                    "reflect": 0.0,
                    "slips": "result",
                },
                # synthetic: leave each reflective step's slip (the first wrong character of its
                # wrong attempt, synthetic.slip_spans) out of the SFT loss
                "unlearned_slips": False,
                "batch_size": 16 if not released else 32,  # sequences (sft) / prompts (grpo)
                "seq_len": 128 if not released else 9216,  # sft row length
                "max_prompt_len": 48 if not released else 1024,
                "grad_accum": 1,  # micro-batches per update
                # > 0: pack each micro-batch's sequences into rows of this many tokens
                # (data/packing.py; verl's ppo_max_token_len_per_gpu: with one packed row per
                # device, its tokens per forward); 0: one padded row per sequence.
                "pack_tokens": 0,
                "save_rollouts": False,  # grpo: keep each step's rollouts in WORKDIR/rollouts
                "rollouts_dir": "",  # spr: train on these saved rollouts instead of sampling
            },
            "optim": {
                "lr": (1e-6 if grpo else 1e-5) if released else (1e-3 if not grpo else 3e-4),
                "schedule": "constant" if grpo else "cosine",
                "warmup_steps": 0 if grpo else 10,
                "b1": 0.9,
                "b2": 0.999,
                "weight_decay": 0.01,
                "clip_norm": 1.0,
                "sprm_lr": 1e-5 if released else 1e-3,
                "sprm_weight_decay": 0.01,
                "sprm_clip_norm": 1.0,
                "freeze_backbone": False,
            },
            "rl": {
                "k": 8,
                "temperature": 0.6 if released else 1.0,
                "top_p": 1.0,
                "top_k": 0,  # 0 = off
                # Whose log-probs the ratio, KL and entropy use: "full" softmax (as verl) or the
                # top-k/top-p distribution the rollouts were "sampled" from.
                "logprob_support": "full",
                "max_new_tokens": 8192 if released else 64,
                "mini_batches": 4 if released else 1,  # updates per rollout batch
                "clip_eps": 0.2,
                "kl_coef": 0.001,
                "entropy_coef": 0.001,
                # Reward 0 unless the response (with a think span the prompt opens) holds
                # exactly one <think> and one </think>, in order: the released reward's check.
                # Off by default: the answer alone decides (the project's reward so far).
                "format_check": False,
                # The rollout engine (sample/engine.py): slots decoded together (0: every
                # rollout of a step at once, up to 256), tokens per KV page, and the page pool:
                # `pages` (0: `memory_fraction` of the free memory when > 0, else room for
                # every slot's whole budget). precompile: compile the tail's smaller slot
                # counts before the first rollouts (EngineConfig.precompile; pays back over a
                # long run's many rollout calls).
                "slots": 0,
                "page_size": 64,
                "pages": 0,
                "memory_fraction": 0.0,
                "precompile": False,
            },
            "spr": {
                "coef": 1.0 if grpo else 0.0,
                "form": "filtered",  # filtered | paper | bce
                "grad_scale": 1e-4,
                "dropout": True,
                # Class counts and normalisation: "batch" = over each micro-batch on all devices
                # (default: one pool per update when data.grad_accum=1); "rank" = the released
                # actor's: per data-parallel rank, counts summed over ranks + 1 per rank.
                "scope": "batch",
                # "rank" scope: the ranks to emulate (0 = the mesh's data x fsdp size; the
                # released 1.5B run had 4: 8 GPUs, sequence parallel 2).
                "ranks": 0,
                # Truncated wrong rollouts: "exclude" them from the SPR loss (the method's
                # stated rule, default) or train on them as "negative"s, which is what the
                # released runs did (an in-place zeroing undid their exclusion).
                "truncated": "exclude",
            },
            "train": {
                "steps": 200 if not released else 1000,
                "save_every": 50,
                "keep": 3,
                "best_metric": "reward_mean" if grpo else "loss",
                "best_mode": "max" if grpo else "min",
                "async_checkpoint": True,
                "progress": True,
                "export": True,  # write WORKDIR/export (params + tokenizer) at the end
                # Cloud TPU type of the slice (v5e-8, v5p-64, ...): train first checks the memory
                # plan (metastone-jax plan) and refuses one that cannot fit. Empty: no check.
                "tpu": "",
                # Positions per LM-head chunk in the losses (metastone_jax/lm_loss.py): the
                # [b, T, V] logits are never held whole. 0 = full logits (faster at small V).
                "logits_chunk": 1024 if released else 0,
            },
        }
    )
    # Saving only matmul outputs is both the fastest and a memory saver for training on CPU
    # (bench/RESULTS.md: scan + remat 'dots' is the best variant of the train step).
    c.model.remat = "dots"
    if not released:
        c.model.vocab_size = config_dict.placeholder(int)  # from the trained tokenizer
    else:
        # fp32 master weights, bf16 compute (MaxText's weight_dtype/dtype split): an AdamW
        # update is about lr per entry, and at the recipe's 1e-6 that is far below bf16's
        # spacing (2^-8 relative: 8e-5 at |w| = 0.02), so bf16 weights would never move. The
        # bf16 init checkpoint is cast up on restore (train/setup.py RUNTIME_FIELDS).
        c.model.param_dtype = "float32"
    if size == "tiny":
        c.data.update(batch_size=8, seq_len=96, synthetic_size=512)
        c.rl.update(k=4, max_new_tokens=48)
        c.train.update(steps=20, save_every=5)
    return c
