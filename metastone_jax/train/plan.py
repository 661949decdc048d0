"""A memory plan from a train config (configs/train.py or configs/meshes.py), and the fit check
that `train` runs before it allocates anything (the accounting itself is planning/).

What one step holds, from the config:
  sft      micro-batch rows = data.batch_size / data.grad_accum, T = data.seq_len; no sampling.
  grpo/spr rollouts: data.batch_size prompts x rl.k candidates, decoded with a KV cache of
           bucket(data.max_prompt_len) + rl.max_new_tokens slots; updates: the batch_size * k
           rows split into rl.mini_batches updates of grad_accum micro-batches each, rows of
           T = max_prompt_len + max_new_tokens. spr on saved rollouts (data.rollouts_dir)
           samples nothing. The rollouts run on the engine with rl.slots, rl.page_size,
           rl.pages and rl.memory_fraction (0: the planner chooses slots and pages).
"""

from __future__ import annotations

import dataclasses
import math
import os

from metastone_jax.checkpoint import read_checkpoint_meta
from metastone_jax.config import ModelConfig, model_config_from_dict
from metastone_jax.planning.build import build_plan
from metastone_jax.planning.memory import MemoryPlan, Workload
from metastone_jax.planning.packed_rows import packed_rows
from metastone_jax.planning.report import refusal_message
from metastone_jax.planning.tpu import TpuType, parse_tpu
from metastone_jax.sample.sampler import bucket_length
from metastone_jax.sharding import resolve_mesh_shape
from metastone_jax.train.run_config import TrainConfig
from metastone_jax.train.setup import RUNTIME_FIELDS
from metastone_jax.train.state import optim_config
from metastone_jax.train.state_bytes import state_bytes


def _divide(total: int, parts: int, what: str) -> int:
    if parts < 1 or total % parts:
        raise ValueError(f"{what}: {total} rows cannot be split into {parts} equal parts")
    return total // parts


def workload(config: TrainConfig, *, sample_rows: int | None = None, sample_len: int | None = None,
             mesh_shape: dict | None = None):  # fmt: skip
    """The Workload of a train config; sample_rows / sample_len override the rollouts per step
    and the longest sequence (prompt + new tokens). mesh_shape (resolved): the devices packed
    rows are laid over (default: config.mesh's data x fsdp)."""
    config = TrainConfig.from_config_dict(config)
    kind = config.kind
    data, rl = config.data, config.rl
    accum = int(data.grad_accum)
    if kind == "sft":
        rows = _divide(int(data.batch_size), accum, "data.batch_size / data.grad_accum")
        w = Workload(
            kind=kind,
            train_rows=rows,
            seq_len=int(data.seq_len),
            grad_accum=accum,
            logits_chunk=int(config.train.logits_chunk),
        )
    else:
        k = int(rl.k)
        prompt = bucket_length(int(data.max_prompt_len))
        g = int(rl.max_new_tokens)
        cands = int(data.batch_size) * k
        saved = kind == "spr" and bool(data.rollouts_dir)
        update = cands if saved else _divide(cands, int(rl.mini_batches), "rollouts / mini_batches")
        rows = _divide(update, accum, "mini-batch / data.grad_accum")
        w = Workload(
            kind=kind,
            train_rows=rows,
            seq_len=int(data.max_prompt_len) + g,
            grad_accum=accum,
            prompts=0 if saved else int(data.batch_size),
            candidates=0 if saved else cands,
            k=k,
            prompt_len=prompt,
            max_new=g,
            logits_chunk=int(config.train.logits_chunk),
            slots=rl.slots,
            pages=rl.pages,
            page_size=rl.page_size,
            memory_fraction=rl.memory_fraction,
            top_p=rl.top_p,
            spr=kind == "spr" or config.spr.coef > 0,
        )
    width = data.pack_tokens
    if width:
        rows = w.train_rows
        if kind != "sft":  # rollouts: simulated lengths (planning/packed_rows.py)
            dp = _dp(config) if mesh_shape is None else mesh_shape["data"] * mesh_shape["fsdp"]
            rows = packed_rows(rows, int(data.max_prompt_len), w.max_new, width, dp)
        w = dataclasses.replace(w, train_rows=rows, seq_len=width, pack_tokens=width,
                                unpacked_rows=w.train_rows)  # fmt: skip
    if sample_rows is not None or sample_len is not None:
        n = w.candidates if sample_rows is None else int(sample_rows)
        length = w.kv_len if sample_len is None else int(sample_len)
        if n < 1 or length < 1:
            raise ValueError(f"sample batch {n} / length {length}: expected positive sizes")
        prompt = min(w.prompt_len, length)
        w = dataclasses.replace(
            w, prompts=math.ceil(n / w.k), candidates=n, prompt_len=prompt,
            max_new=length - prompt, cache_len=length,
        )  # fmt: skip
    return w


def _dp(config: TrainConfig) -> int:
    """The devices a micro-batch's rows are laid over (data x fsdp; 1 when an axis is -1)."""
    return max(1, config.mesh.data) * max(1, config.mesh.fsdp)


def model_config(config: TrainConfig) -> ModelConfig:
    """The run's model: the init checkpoint's config when it is readable here (with the run's
    remat/scan/compute dtype), else config.model; a vocabulary left to the tokenizer is taken as
    tokenizer.vocab_size rounded up to 64, as setup does."""
    init = config.init_ckpt
    if init and os.path.isdir(init):
        cfg, _ = read_checkpoint_meta(init)
        return cfg.replace(**{f: config.model[f] for f in RUNTIME_FIELDS})
    values = dict(config.model)
    if values.get("vocab_size") is None:
        values["vocab_size"] = -(-int(config.tokenizer.vocab_size) // 64) * 64
    return model_config_from_dict(values)


def resolve_mesh(mesh: dict, tpu: TpuType) -> dict:
    try:
        return resolve_mesh_shape(mesh, tpu.chips)
    except ValueError as e:
        shape = ",".join(f"{a}:{n}" for a, n in mesh.items())
        raise ValueError(f"mesh {shape} on {tpu.name} ({tpu.chips} chips): {e}") from None


def plan_config(
    config: TrainConfig,
    *,
    tpu: str | None = None,
    mesh: dict | None = None,
    sample_rows: int | None = None,
    sample_len: int | None = None,
) -> MemoryPlan:
    """The plan of train config `config` on `tpu` (default config.train.tpu) with `mesh`
    (default config.mesh)."""
    if hasattr(config, "keys") and "kind" not in config:
        raise ValueError(
            "plan needs a train config (configs/train.py:PRESET or configs/meshes.py:PRESET); "
            "this one has no 'kind'"
        )
    config = TrainConfig.from_config_dict(config)
    tpu_name = tpu or config.train.tpu
    if not tpu_name:
        raise ValueError("no TPU type: pass --tpu=TYPE (e.g. v5e-8) or set config.train.tpu")
    tpu_type = parse_tpu(tpu_name)
    mesh_shape = resolve_mesh(dict(mesh) if mesh is not None else config.mesh.as_dict(), tpu_type)
    cfg = model_config(config)
    w = workload(config, sample_rows=sample_rows, sample_len=sample_len, mesh_shape=mesh_shape)
    with_ref = config.kind == "grpo" and float(config.rl.kl_coef) > 0
    # the run's own optimizer settings
    state = state_bytes(cfg, mesh_shape, optim_config(config), with_ref=with_ref)
    name = config.preset or "model"
    return build_plan(cfg, name=name, tpu=tpu_type, mesh_shape=mesh_shape, workload=w, state=state)


def check_train_config(config: TrainConfig) -> MemoryPlan | None:
    """Runs the plan of a train config whose config.train.tpu is set; raises ValueError naming
    the shortfall when it cannot fit. No TPU type: no check (None)."""
    config = TrainConfig.from_config_dict(config)
    if not config.train.tpu:
        return None
    plan = plan_config(config)
    if not plan.fits:
        raise ValueError(refusal_message(plan))
    return plan
