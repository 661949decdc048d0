"""Train config checks that run when the config is built, before anything is prepared or trained.

`validate_train_config(config)` types a ConfigDict (train/run_config.py: an unknown, missing or
mistyped key is an error naming it), then checks every setting in RULES (one line per key: its
valid range or choices) and the settings that must agree with each other (e.g. data.grad_accum
dividing the batch), raising ValueError that names `config.<key>`, its value and what is valid.
`check_workdir` refuses a --workdir that is a file.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Callable

from metastone_jax.train.rollout import TRUNCATED
from metastone_jax.train.run_config import TrainConfig
from metastone_jax.train.state import SCHEDULES
from metastone_jax.train.step import KINDS, SPR_FORMS, SPR_SCOPES


@dataclasses.dataclass(frozen=True)
class Range:
    """Numbers between `lo` and `hi` (None: unbounded); ints only when `integer`."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False

    def accepts(self, value) -> bool:
        if isinstance(value, bool):
            return False
        if self.integer and not isinstance(value, numbers.Integral):
            return False
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def __str__(self) -> str:
        kind = "an int" if self.integer else "a finite number"
        if self.lo is not None and self.hi is not None:
            left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
            return f"{kind} in {left}{self.lo:g}, {self.hi:g}{right}"
        if self.lo is not None:
            return f"{kind} {'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            return f"{kind} {'<' if self.hi_open else '<='} {self.hi:g}"
        return kind


@dataclasses.dataclass(frozen=True)
class OneOf:
    choices: tuple

    def accepts(self, value) -> bool:
        return value in self.choices

    def __str__(self) -> str:
        return f"one of {self.choices}"


def at_least(lo: float) -> Range:
    """>= lo; an int bound means the setting is an int."""
    return Range(lo=lo, integer=isinstance(lo, int))


def above(lo: float) -> Range:
    return Range(lo=lo, lo_open=True)


def fraction(*, lo_open: bool = False, hi_open: bool = False) -> Range:
    return Range(lo=0.0, hi=1.0, lo_open=lo_open, hi_open=hi_open)


# key -> what is valid. From the code that uses each one (noted where the reason is not obvious).
RULES: dict[str, Range | OneOf] = {
    "kind": OneOf(KINDS),
    "seed": at_least(0),  # the data order's numpy seed
    # SentencePiece: 4 specials + 256 byte pieces come first (data/spm_train.py)
    "tokenizer.vocab_size": at_least(261),
    "data.synthetic_size": at_least(1),
    "data.task.min_ops": at_least(1),
    "data.task.max_ops": at_least(1),
    "data.task.max_operand": at_least(1),
    "data.task.reflect": fraction(),  # a probability per step
    "data.batch_size": at_least(1),
    "data.seq_len": at_least(2),  # a prompt token and a response token
    "data.max_prompt_len": at_least(1),
    "data.grad_accum": at_least(1),
    "data.pack_tokens": at_least(0),  # 0 = no packing
    "optim.lr": at_least(0.0),
    "optim.schedule": OneOf(SCHEDULES),
    "optim.warmup_steps": at_least(0),
    "optim.b1": fraction(hi_open=True),
    "optim.b2": fraction(hi_open=True),
    "optim.weight_decay": at_least(0.0),
    "optim.clip_norm": above(0.0),
    "optim.sprm_lr": at_least(0.0),
    "optim.sprm_weight_decay": at_least(0.0),
    "optim.sprm_clip_norm": above(0.0),
    "rl.k": at_least(1),
    "rl.temperature": above(0.0),  # the train step divides the logits by it
    "rl.top_p": fraction(lo_open=True),
    "rl.top_k": at_least(0),  # 0 = off
    "rl.logprob_support": OneOf(("full", "sampled")),  # train/loop.py LOGPROB_SUPPORTS
    "rl.max_new_tokens": at_least(1),
    "rl.mini_batches": at_least(1),
    "rl.clip_eps": above(0.0),
    "rl.kl_coef": at_least(0.0),
    "rl.entropy_coef": at_least(0.0),  # a bonus: loss = policy - entropy_coef * entropy
    "rl.format_check": OneOf((False, True)),
    "rl.slots": at_least(0),  # 0 = every rollout of a step at once (sample/engine.py)
    "rl.page_size": at_least(1),
    "rl.pages": at_least(0),  # 0 = from memory_fraction, else every slot's whole budget
    "rl.memory_fraction": fraction(hi_open=False),
    "rl.precompile": OneOf((False, True)),
    "spr.coef": at_least(0.0),
    "spr.form": OneOf(SPR_FORMS),
    "spr.grad_scale": at_least(0.0),
    "spr.scope": OneOf(SPR_SCOPES),
    "spr.ranks": at_least(0),  # 0 = the mesh's data x fsdp
    "spr.truncated": OneOf(TRUNCATED),
    "train.steps": at_least(1),
    "train.save_every": at_least(1),
    "train.keep": at_least(1),
    "train.best_mode": OneOf(("min", "max")),
    "train.logits_chunk": at_least(0),  # 0 = whole logits
}


def lookup(config, key: str):
    """(found, value) of a dotted key of a TrainConfig or a ConfigDict."""
    node = config
    for part in key.split("."):
        if hasattr(node, "keys"):
            if part not in node:
                return False, None
            node = node[part]
        elif dataclasses.is_dataclass(node) and part in {f.name for f in dataclasses.fields(node)}:
            node = getattr(node, part)
        else:
            return False, None
    return True, node


def _task_ops(config: TrainConfig) -> str | None:
    task = config.data.task
    if task.max_ops < task.min_ops:
        return (
            f"config.data.task.max_ops={task.max_ops}: expected >= "
            f"config.data.task.min_ops={task.min_ops}"
        )
    return None


def _micro_batches(config: TrainConfig) -> str | None:
    """data.grad_accum (and rl.mini_batches) must split an update's rows evenly (rollout.py
    split_micro / minibatches)."""
    data, accum = config.data, int(config.data.grad_accum)
    if config.kind == "sft":
        if data.batch_size % accum:
            return (
                f"config.data.grad_accum={accum}: expected a divisor of "
                f"config.data.batch_size={data.batch_size}"
            )
        return None
    if config.kind == "spr" and data.rollouts_dir:
        return None  # the saved files' row count is checked when they are read
    rollouts = int(data.batch_size) * int(config.rl.k)
    parts = int(config.rl.mini_batches)
    if rollouts % parts:
        return (
            f"config.rl.mini_batches={parts}: expected a divisor of the {rollouts} rollouts per "
            f"step (config.data.batch_size x config.rl.k)"
        )
    if (rollouts // parts) % accum:
        return (
            f"config.data.grad_accum={accum}: expected a divisor of the {rollouts // parts} "
            "rollouts per update (config.data.batch_size x config.rl.k / config.rl.mini_batches)"
        )
    rows, ranks = rollouts // parts // accum, config.spr.ranks
    if config.spr.scope == "rank" and ranks and rows % ranks:
        return (
            f"config.spr.ranks={ranks}: expected a divisor of the {rows} rollouts per "
            "micro-batch (config.data.batch_size x config.rl.k / config.rl.mini_batches / "
            "config.data.grad_accum), which spr.scope='rank' splits over the ranks"
        )
    return None


def _packing(config: TrainConfig) -> str | None:
    """A packed row must hold the longest sequence; rank-scoped SPR needs unpacked rows."""
    width = config.data.pack_tokens
    if not width:
        return None
    if config.kind == "sft":
        longest, what = int(config.data.seq_len), "config.data.seq_len"
    else:
        longest = int(config.data.max_prompt_len) + int(config.rl.max_new_tokens)
        what = "config.data.max_prompt_len + config.rl.max_new_tokens"
    if width < longest:
        return (f"config.data.pack_tokens={width}: expected at least the longest sequence, "
                f"{what} = {longest}")  # fmt: skip
    tensor = config.mesh.tensor
    if tensor > 1 and width % tensor:
        return (f"config.data.pack_tokens={width}: expected a multiple of config.mesh.tensor="
                f"{tensor} (the packed rows' activations are sharded along the sequence over "
                "it)")  # fmt: skip
    if config.kind != "sft" and config.spr.scope == "rank":
        return (f"config.data.pack_tokens={width} with config.spr.scope='rank': packed rows mix "
                "the ranks' rollouts; use spr.scope='batch' or pack_tokens=0")  # fmt: skip
    return None


# Settings that must agree; each returns the problem or None (run only when RULES all pass).
CROSS_CHECKS: tuple[Callable[[TrainConfig], str | None], ...] = (
    _task_ops,
    _micro_batches,
    _packing,
)


def validate_train_config(config: TrainConfig) -> TrainConfig:
    """Raises ValueError naming the first unknown, missing or mistyped key (a ConfigDict is typed
    first, train/run_config.py) or the first setting outside its valid range; returns the
    TrainConfig."""
    config = TrainConfig.from_config_dict(config)
    for key, rule in RULES.items():
        found, value = lookup(config, key)
        if found and not rule.accepts(value):
            raise ValueError(f"config.{key}={value!r}: expected {rule}")
    for check in CROSS_CHECKS:
        problem = check(config)
        if problem:
            raise ValueError(problem)
    return config


def check_workdir(workdir: str) -> None:
    """A local workdir must be a directory or absent (a gs:// one is a prefix: nothing to
    check)."""
    if "://" in workdir:
        return
    existing = os.path.abspath(workdir)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)  # the nearest part of the path that exists
    if not os.path.isdir(existing):
        inside = "" if existing == os.path.abspath(workdir) else f": {existing}"
        raise ValueError(f"--workdir {workdir}{inside} is a file; expected a directory")
