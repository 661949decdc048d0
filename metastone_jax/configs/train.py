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


# preset -> (model preset of configs/model.py, kind, changes of its own). A preset's settings are
# DEFAULTS, then its kind's changes, then its model size's, then its own (`_merge`, in order).
PRESETS: dict[str, tuple[str, str, dict]] = {
    "tiny-sft": ("tiny", "sft", {}),
    "tiny-grpo": ("tiny", "grpo", {}),
    "demo-sft": ("demo", "sft", {}),
    "demo-grpo": ("demo", "grpo", {}),
    # the released learning rates (docs/method.md sections 3-4)
    "sft-1.5b": ("metastone-s1-1.5b", "sft", {"optim": {"lr": 1e-5}}),
    "grpo-1.5b": ("metastone-s1-1.5b", "grpo", {"optim": {"lr": 1e-6}}),
}

# From-scratch models: the chat template of the SentencePiece tokenizer trained on the data.
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Answer: {% endif %}"
)

# The laptop-scale SFT run: every key, with what it means (train/run_config.py documents each).
DEFAULTS = {
    "kind": "sft",  # sft | grpo | spr
    "seed": 0,
    # A params checkpoint to start from (`metastone-jax convert` output or an export); empty:
    # random init (from-scratch models).
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
        # synthetic: leave each reflective step's slip (the first wrong character of its wrong
        # attempt, synthetic.slip_spans) out of the SFT loss
        "unlearned_slips": False,
        "batch_size": 16,  # sequences (sft) / prompts (grpo)
        "seq_len": 128,  # sft row length
        "max_prompt_len": 48,
        "grad_accum": 1,  # micro-batches per update
        # > 0: pack each micro-batch's sequences into rows of this many tokens (data/packing.py;
        # verl's ppo_max_token_len_per_gpu: with one packed row per device, its tokens per
        # forward); 0: one padded row per sequence.
        "pack_tokens": 0,
        "save_rollouts": False,  # grpo: keep each step's rollouts in WORKDIR/rollouts
        "rollouts_dir": "",  # spr: train on these saved rollouts instead of sampling
    },
    "optim": {
        "lr": 1e-3,
        "schedule": "cosine",
        "warmup_steps": 10,
        "b1": 0.9,
        "b2": 0.999,
        "weight_decay": 0.01,
        "clip_norm": 1.0,
        "sprm_lr": 1e-3,
        "sprm_weight_decay": 0.01,
        "sprm_clip_norm": 1.0,
        "freeze_backbone": False,
    },
    "rl": {
        "k": 8,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,  # 0 = off
        # Whose log-probs the ratio, KL and entropy use: "full" softmax (as verl) or the
        # top-k/top-p distribution the rollouts were "sampled" from.
        "logprob_support": "full",
        "max_new_tokens": 64,
        "mini_batches": 1,  # updates per rollout batch
        "clip_eps": 0.2,
        "kl_coef": 0.001,
        "entropy_coef": 0.001,
        # Reward 0 unless the response (with a think span the prompt opens) holds exactly one
        # <think> and one </think>, in order: the released reward's check. Off by default: the
        # answer alone decides (the project's reward so far).
        "format_check": False,
        # The rollout engine (sample/engine.py): slots decoded together (0: every rollout of a
        # step at once, up to 256), tokens per KV page, and the page pool: `pages` (0:
        # `memory_fraction` of the free memory when > 0, else room for every slot's whole
        # budget). precompile: compile the tail's smaller slot counts before the first rollouts
        # (EngineConfig.precompile; pays back over a long run's many rollout calls).
        "slots": 0,
        "page_size": 64,
        "pages": 0,
        "memory_fraction": 0.0,
        "precompile": False,
    },
    "spr": {
        "coef": 0.0,
        "form": "filtered",  # filtered | paper | bce
        "grad_scale": 1e-4,
        "dropout": True,
        # Class counts and normalisation: "batch" = over each micro-batch on all devices
        # (default: one pool per update when data.grad_accum=1); "rank" = the released actor's:
        # per data-parallel rank, counts summed over ranks + 1 per rank.
        "scope": "batch",
        # "rank" scope: the ranks to emulate (0 = the mesh's data x fsdp size; the released 1.5B
        # run had 4: 8 GPUs, sequence parallel 2).
        "ranks": 0,
        # Truncated wrong rollouts: "exclude" them from the SPR loss (the method's stated rule,
        # default) or train on them as "negative"s, which is what the released runs did (an
        # in-place zeroing undid their exclusion).
        "truncated": "exclude",
    },
    "train": {
        "steps": 200,
        "save_every": 50,
        "keep": 3,
        "best_metric": "loss",
        "best_mode": "min",
        "async_checkpoint": True,
        "progress": True,
        "export": True,  # write WORKDIR/export (params + tokenizer) at the end
        # Cloud TPU type of the slice (v5e-8, v5p-64, ...): train first checks the memory plan
        # (metastone-jax plan) and refuses one that cannot fit. Empty: no check.
        "tpu": "",
        # Positions per LM-head chunk in the losses (metastone_jax/lm_loss.py): the [b, T, V]
        # logits are never held whole. 0 = full logits (faster at small V).
        "logits_chunk": 0,
    },
}

# What GRPO (+ the SPR loss) changes from the defaults.
KIND_CHANGES: dict[str, dict] = {
    "sft": {},
    "grpo": {
        "kind": "grpo",
        "optim": {"lr": 3e-4, "schedule": "constant", "warmup_steps": 0},
        "spr": {"coef": 1.0},
        "train": {"best_metric": "reward_mean", "best_mode": "max"},
    },
}

# What each model size changes: the tiny one runs in tests; the released 1.5B recipe's settings.
SIZE_CHANGES: dict[str, dict] = {
    "tiny": {
        "data": {"batch_size": 8, "seq_len": 96, "synthetic_size": 512},
        "rl": {"k": 4, "max_new_tokens": 48},
        "train": {"steps": 20, "save_every": 5},
    },
    "demo": {},
    "metastone-s1-1.5b": {
        "data": {"batch_size": 32, "seq_len": 9216, "max_prompt_len": 1024},
        "optim": {"sprm_lr": 1e-5},
        "rl": {"temperature": 0.6, "max_new_tokens": 8192, "mini_batches": 4},
        "train": {"steps": 1000, "logits_chunk": 1024},
    },
}


def _merge(base: dict, changes: dict) -> dict:
    """`base` with `changes` applied key by key (sections recursively); a key `base` lacks is
    an error, so a change table cannot add a setting by mistake."""
    out = dict(base)
    for key, value in changes.items():
        if key not in base:
            raise KeyError(f"configs/train.py: {key!r} is not a train config key")
        out[key] = _merge(base[key], value) if isinstance(value, dict) else value
    return out


def get_config(arg: str | None = None) -> ConfigDict:
    preset = arg or "tiny-sft"
    if preset not in PRESETS:
        raise ValueError(f"unknown train preset {preset!r}; expected one of {tuple(PRESETS)}")
    size, kind, own = PRESETS[preset]
    settings = DEFAULTS
    for changes in (KIND_CHANGES[kind], SIZE_CHANGES[size], own):
        settings = _merge(settings, changes)
    base = model_config(size)
    c = ConfigDict({"preset": preset, "model": base.model, "mesh": base.mesh, **settings})
    # Saving only matmul outputs is both the fastest and a memory saver for training on CPU
    # (bench/RESULTS.md: scan + remat 'dots' is the best variant of the train step).
    c.model.remat = "dots"
    if size.startswith("metastone"):
        # fp32 master weights, bf16 compute (MaxText's weight_dtype/dtype split): an AdamW
        # update is about lr per entry, and at the recipe's 1e-6 that is far below bf16's
        # spacing (2^-8 relative: 8e-5 at |w| = 0.02), so bf16 weights would never move. The
        # bf16 init checkpoint is cast up on restore (train/setup.py RUNTIME_FIELDS).
        c.model.param_dtype = "float32"
    else:
        c.model.vocab_size = config_dict.placeholder(int)  # from the trained tokenizer
    return c
