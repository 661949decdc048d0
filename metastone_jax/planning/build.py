"""A memory plan assembled: the train step's terms (planning/memory.py) and, when the run samples
rollouts, the engine's (planning/engine_memory.py), whose formulas memory.py's docstring states.
"""

from __future__ import annotations

from metastone_jax.config import REMAT_POLICIES, ModelConfig
from metastone_jax.planning.engine_memory import rollout_components
from metastone_jax.planning.memory import (
    Component,
    MemoryPlan,
    StateBytes,
    Workload,
    _logits_note,
    activation_bytes,
    decode_weights_bytes,
    layer_work_bytes,
    logits_bytes,
    planned_attention,
    sequence_shards,
    spr_head_bytes,
)
from metastone_jax.planning.tpu import TpuType


def build_plan(
    cfg: ModelConfig,
    *,
    name: str,
    tpu: TpuType,
    mesh_shape: dict,
    workload: Workload,
    state: StateBytes,
) -> MemoryPlan:
    """Assembles the components (formulas in planning/memory.py's docstring)."""
    dp = mesh_shape["data"] * mesh_shape["fsdp"]
    tp = mesh_shape["tensor"]
    w = workload
    if w.train_rows % dp:
        raise ValueError(
            f"a micro-batch of {w.train_rows} rows cannot be laid over data*fsdp = {dp} "
            f"devices: make the rows per update / data.grad_accum a multiple of {dp}"
        )
    b = w.train_rows // dp
    t = w.seq_len
    work = layer_work_bytes(cfg, tp, b, t)
    grads = state.params * (2 if w.grad_accum > 1 else 1)
    pd = state.param_dtype
    comps = [
        Component(
            "params", "resident", state.params,
            f"{pd}; SPRM head fp32 ({state.sprm_params / 2**20:.1f} MiB)",
        ),
        Component("reference params", "resident", state.reference, "frozen copy for the KL"),
        Component("optimizer state", "resident", state.optimizer, f"AdamW mu + nu ({pd})"),
        Component(
            "gradients", "step", grads,
            pd + (": accumulator + one micro-batch's" if w.grad_accum > 1 else ""),
        ),
        Component(
            "activations", "step", activation_bytes(cfg, tp, b, t, cfg.remat),
            f"kept for backward, remat={cfg.remat}, {b} x {t} tokens"
            + (f", sequence over tensor/{sequence_shards(tp, t)}" if tp > 1 else ""),
        ),
        Component(
            "SPR head", "step", spr_head_bytes(cfg, b, t) if w.spr else 0,
            f"fc1 hidden [{b}, {t}, {2 * cfg.d_model}] fp32 + dropout mask",
        ),
        Component("layer work", "step*", work,
                  f"the layer being differentiated; {planned_attention(cfg)} attention"),
        Component(
            "logits", "step*",
            logits_bytes(cfg, tp, b, t, w.kind, w.logits_chunk, mesh_shape["fsdp"]),
            _logits_note(cfg, tp, b, t, w),
        ),
    ]  # fmt: skip
    engine, n = None, 0
    if w.candidates:
        resident = sum(c.bytes for c in comps if c.phase == "resident")
        weights = decode_weights_bytes(cfg, state, mesh_shape)
        engine, rollout = rollout_components(cfg, w, mesh_shape, tpu.hbm_bytes, resident, weights)
        comps += rollout
        n = engine.slots_per_device
    comps = [c for c in comps if c.bytes or c.name in ("params", "optimizer state")]
    return MemoryPlan(
        model=name,
        tpu=tpu,
        mesh_shape=dict(mesh_shape),
        workload=w,
        remat=cfg.remat,
        components=tuple(comps),
        activations_by_remat={p: activation_bytes(cfg, tp, b, t, p) + work for p in REMAT_POLICIES},
        rows_per_device=b,
        rollout_rows_per_device=n,
        engine=engine,
    )
