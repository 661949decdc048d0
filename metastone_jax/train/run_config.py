"""The training run's config, typed: frozen dataclasses, one per section of configs/train.py.

The command line builds the ml_collections ConfigDict (presets, --config.SECTION.KEY=VALUE
overrides); `TrainConfig.from_config_dict` turns it into these once, checking the structure (an
unknown or missing key, a wrong type: a ValueError naming `config.SECTION.KEY`), and the run
reads typed fields from then on. The value ranges and the settings that must agree are
train/validate.py's. `TrainConfig.to_dict()` is the plain form saved in checkpoints.

    config.data       DataConfig       what is trained on, and the batch layout
    config.optim      OptimizerConfig  AdamW for the policy and for the SPRM head
    config.rl         RLConfig         GRPO: rollouts (sampling, the engine) and the policy loss
    config.spr        SPRConfig        the SPR loss of the SPRM head (docs/method.md section 3)
    config.train      LoopConfig       the loop: steps, checkpoints, logging, export, TPU check
    config.mesh       MeshConfig       the ('data', 'fsdp', 'tensor') device mesh
    config.tokenizer  TokenizerConfig  which tokenizer, or how to train one
    config.model      a mapping of ModelConfig fields (metastone_jax/config.py checks them)
"""

from __future__ import annotations

import dataclasses
import numbers
import types
import typing
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """The synthetic arithmetic task (data/synthetic.py make_examples).

    Attributes:
      min_ops: fewest operations per problem.
      max_ops: most operations per problem.
      max_operand: largest operand.
      ops: the operators drawn from, e.g. "+-".
      reflect: probability that a step is written wrong first and then corrected.
      slips: what a reflective step gets wrong ("result", ...; data/synthetic.py).
    """

    min_ops: int
    max_ops: int
    max_operand: int
    ops: str
    reflect: float
    slips: str


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What is trained on and how a step's batch is laid out.

    Attributes:
      source: "synthetic" (the built-in arithmetic task) or a .jsonl/.parquet math file.
      synthetic_size: problems in the synthetic training set.
      task: the synthetic task's knobs.
      unlearned_slips: leave each reflective slip out of the SFT loss (synthetic source only).
      batch_size: sequences per step (sft) or prompts per step (grpo, spr).
      seq_len: an SFT row's length in tokens.
      max_prompt_len: the longest prompt in tokens (longer ones are cut from the left).
      grad_accum: micro-batches per update.
      pack_tokens: > 0: pack each micro-batch into rows of this many tokens; 0: one row each.
      save_rollouts: grpo: keep each step's rollouts in WORKDIR/rollouts.
      rollouts_dir: spr: train the head on these saved rollouts instead of sampling.
    """

    source: str
    synthetic_size: int
    task: TaskConfig
    unlearned_slips: bool
    batch_size: int
    seq_len: int
    max_prompt_len: int
    grad_accum: int
    pack_tokens: int
    save_rollouts: bool
    rollouts_dir: str


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with global-norm clipping; the SPRM head has its own learning rate and clipping.

    Attributes:
      lr: the policy's peak learning rate.
      schedule: "constant" or "cosine" (train/state.py SCHEDULES).
      warmup_steps: linear warm-up steps.
      b1: Adam's first-moment decay.
      b2: Adam's second-moment decay.
      weight_decay: the policy's decoupled weight decay.
      clip_norm: the policy's gradient global-norm clip.
      sprm_lr: the SPRM head's learning rate.
      sprm_weight_decay: the SPRM head's weight decay.
      sprm_clip_norm: the SPRM head's gradient global-norm clip.
      freeze_backbone: train the heads only.
    """

    lr: float
    schedule: str
    warmup_steps: int
    b1: float
    b2: float
    weight_decay: float
    clip_norm: float
    sprm_lr: float
    sprm_weight_decay: float
    sprm_clip_norm: float
    freeze_backbone: bool


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """GRPO: how rollouts are sampled (and on what engine) and the policy loss.

    Attributes:
      k: rollouts per prompt (the group).
      temperature: sampling temperature (the train step divides the logits by it too).
      top_p: nucleus sampling mass (1 = off).
      top_k: top-k sampling (0 = off).
      logprob_support: "full" softmax (as verl) or the "sampled" top-k/top-p distribution.
      max_new_tokens: a rollout's token budget.
      mini_batches: policy updates per rollout batch.
      clip_eps: the PPO ratio clip.
      kl_coef: the KL penalty to the frozen reference (0: no reference is kept).
      entropy_coef: the entropy bonus.
      format_check: reward 0 unless the response's think span is well formed (released reward).
      slots: the engine's slots decoded together (0: every rollout of a step, up to 256).
      page_size: tokens per KV page.
      pages: the page pool (0: from memory_fraction when > 0, else room for every slot).
      memory_fraction: the share of free device memory for the page pool (0: unused).
      precompile: compile the tail's smaller slot counts before the first rollouts.
    """

    k: int
    temperature: float
    top_p: float
    top_k: int
    logprob_support: str
    max_new_tokens: int
    mini_batches: int
    clip_eps: float
    kl_coef: float
    entropy_coef: float
    format_check: bool
    slots: int
    page_size: int
    pages: int
    memory_fraction: float
    precompile: bool


@dataclasses.dataclass(frozen=True)
class SPRConfig:
    """The SPR loss that trains the SPRM head (docs/method.md section 3).

    Attributes:
      coef: the loss's weight (grpo: 0 turns it off).
      form: "filtered" | "paper" | "bce" (train/step.py SPR_FORMS).
      grad_scale: the scale of its gradient into the backbone.
      dropout: the head's dropout while training.
      scope: "batch" (counts over each micro-batch) or "rank" (the released actor's).
      ranks: "rank" scope: the ranks emulated (0: the mesh's data x fsdp).
      truncated: wrong rollouts cut at the budget: "exclude" them or train on them "negative".
    """

    coef: float
    form: str
    grad_scale: float
    dropout: bool
    scope: str
    ranks: int
    truncated: str


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """The loop itself (the config's `train` section).

    Attributes:
      steps: optimizer steps of the run.
      save_every: steps between checkpoints.
      keep: checkpoints kept (besides the best).
      best_metric: the metric that picks the best checkpoint ("" = none).
      best_mode: "min" or "max" of best_metric.
      async_checkpoint: save checkpoints in the background.
      progress: show a progress bar.
      export: write WORKDIR/export (params + tokenizer) at the end.
      tpu: the Cloud TPU slice (v5e-8, ...) whose memory plan must fit ("" = no check).
      logits_chunk: positions per LM-head chunk in the losses (0 = whole logits).
    """

    steps: int
    save_every: int
    keep: int
    best_metric: str
    best_mode: str
    async_checkpoint: bool
    progress: bool
    export: bool
    tpu: str
    logits_chunk: int


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Devices per mesh axis; one may be -1 (the remaining devices).

    Attributes:
      data: the data-parallel axis.
      fsdp: the fully sharded data-parallel axis (parameters sharded over it).
      tensor: the tensor-parallel axis (heads, MLP width, vocabulary).
    """

    data: int
    fsdp: int
    tensor: int

    def as_dict(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """Which tokenizer the run uses.

    Attributes:
      path: a tokenizer directory ("": the init checkpoint's, else one trained on the data).
      vocab_size: the size of a tokenizer trained here (SentencePiece).
      chat_template: the Jinja chat template of a tokenizer trained here.
    """

    path: str
    vocab_size: int
    chat_template: str


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A whole training run (configs/train.py, configs/meshes.py).

    Attributes:
      preset: the preset it was made from (for messages and plans).
      kind: "sft", "grpo" or "spr" (head only).
      seed: the data order's and a random init's seed.
      init_ckpt: a params checkpoint to start from ("": random init).
      model: the model's ModelConfig fields (vocab_size may be None: from the tokenizer).
      tokenizer: which tokenizer.
      data: the data and the batch layout.
      optim: the optimizers.
      rl: rollouts and the policy loss.
      spr: the SPR loss.
      train: the loop.
      mesh: the device mesh.
    """

    preset: str
    kind: str
    seed: int
    init_ckpt: str
    model: Mapping[str, Any]
    tokenizer: TokenizerConfig
    data: DataConfig
    optim: OptimizerConfig
    rl: RLConfig
    spr: SPRConfig
    train: LoopConfig
    mesh: MeshConfig

    @classmethod
    def from_config_dict(cls, config: Any) -> TrainConfig:
        """The typed form of a ConfigDict (or nested mapping); a TrainConfig is returned as is.
        Raises ValueError naming the first unknown, missing or mistyped key."""
        if isinstance(config, TrainConfig):
            return config
        return _build(cls, config, "config")

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dicts (JSON-ready), as saved in a checkpoint's meta."""
        return _plain(self)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _frozen_mapping(value: Any) -> Mapping[str, Any]:
    items = value.items() if hasattr(value, "items") else ()
    plain = {str(k): _frozen_mapping(v) if hasattr(v, "items") else v for k, v in items}
    return types.MappingProxyType(plain)


_KINDS = {bool: "a bool", int: "an int", float: "a number", str: "a string"}


def _check_type(kind: type, value: Any, key: str) -> Any:
    """`value` as `kind`; ints are accepted as floats, nothing else is converted."""
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ValueError(f"{key}={value!r}: expected {_KINDS[kind]}")
    return kind(value)


def _build(cls: type, node: Any, where: str) -> Any:
    if not hasattr(node, "keys"):
        raise ValueError(f"{where}={node!r}: expected a section (keys: {_names(cls)})")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(node.keys()) - set(fields))
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown key; valid keys: {_names(cls)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name in fields:
        key = f"{where}.{name}"
        if name not in node:
            raise ValueError(f"{key}: missing (a {cls.__name__} sets every one of {_names(cls)})")
        kind, value = hints[name], node[name]
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, value, key)
        elif typing.get_origin(kind) is Mapping:
            if not hasattr(value, "items"):
                raise ValueError(f"{key}={value!r}: expected a section of keys")
            values[name] = _frozen_mapping(value)
        else:
            values[name] = _check_type(kind, value, key)
    return cls(**values)


def _names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]
