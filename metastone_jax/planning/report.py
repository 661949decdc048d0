"""A memory plan as a table, as JSON, and as the refusal message `train` raises."""

from __future__ import annotations

from metastone_jax.planning.memory import WARN_FRACTION, MemoryPlan, gib
from metastone_jax.planning.occupancy import SIGMA

ROWS = "fewer rows per device (raise data.grad_accum)"
REMAT = "model.remat='full'"
SHORTER = "shorter rows (data.seq_len, or rl.max_new_tokens / data.max_prompt_len)"
CHUNK = "train.logits_chunk=1024 (the LM head on 1024 positions at a time)"
# What shrinks each component, per device (the first options first).
REMEDIES = {
    "params": ("more fsdp (shards the parameters)",),
    "reference params": ("more fsdp", "rl.kl_coef=0 (no frozen reference)"),
    "optimizer state": ("more fsdp (shards AdamW's mu and nu)",),
    "gradients": ("more fsdp (shards the gradients)",),
    "activations": (REMAT, ROWS, SHORTER),
    "layer work": ("more tensor (shards heads and the MLP)", ROWS, SHORTER),
    "SPR head": (ROWS, SHORTER),
    "logits": (CHUNK, "more tensor (shards the vocabulary)", ROWS, SHORTER),
    "page pool": (
        "fewer pages (rl.pages; 0 sizes the pool to the chip)",
        "more tensor (kv heads over tensor)", "a shorter rl.max_new_tokens (the pool holds at "
        "least one whole sequence)",
    ),
    "slot state": ("fewer slots (rl.slots)",),
    "question table": ("fewer slots (rl.slots)",),
    "segment work": ("fewer slots (rl.slots)", "top_p = 1 (the nucleus draw keeps more copies)"),
    "prefill work": (
        "fewer slots (rl.slots: fewer prompts prefilled at once)", "shorter prompts "
        "(data.max_prompt_len)", "more tensor (shards heads and the MLP)",
    ),
    "decode weights": ("more tensor (each device gathers only its tensor shard of the weights)",),
}  # fmt: skip
GENERIC = {"fsdp": "more fsdp", "remat": REMAT, "rows per device": ROWS}  # keyword -> option


def _mesh(plan: MemoryPlan) -> str:
    return ",".join(f"{a}:{n}" for a, n in plan.mesh_shape.items())


def headline(plan: MemoryPlan) -> str:
    return (
        f"{plan.model} on {plan.tpu.name} ({plan.tpu.chips} chips x {plan.tpu.hbm_gib:.0f} GiB "
        f"HBM), mesh {_mesh(plan)}"
    )


def advice(plan: MemoryPlan) -> str:
    """The largest component of the peak and what would shrink it (options that the plan
    already uses, such as remat='full' or one row per device, are left out)."""
    big = plan.biggest
    done = {REMAT} if plan.remat == "full" else set()
    if plan.rows_per_device == 1:
        done.add(ROWS)
    if plan.workload.logits_chunk > 0:
        done.add(CHUNK)
    fixes = [f for f in REMEDIES[big.name] if f not in done]
    fixes += [
        g for word, g in GENERIC.items() if g not in done and not any(word in f for f in fixes)
    ]
    return (
        f"Largest: {big.name} {gib(big.bytes):.2f} GiB ({big.phase}). "
        f"Try {'; '.join(fixes)}; or a bigger slice."
    )


def verdict(plan: MemoryPlan) -> str:
    if not plan.fits:
        return (
            f"DOES NOT FIT: needs {gib(plan.total):.2f} GiB per device of "
            f"{plan.tpu.hbm_gib:.2f}, short by {gib(plan.shortfall):.2f} GiB. {advice(plan)}"
        )
    spare = gib(plan.hbm - plan.total)
    note = f" (tight: above {WARN_FRACTION:.0%} of HBM)" if plan.tight else ""
    return f"FITS: {gib(plan.total):.2f} GiB per device, {spare:.2f} GiB spare{note}"


def dominant(plan: MemoryPlan, phase: str):
    """The largest component of `phase` (resident state included)."""
    return max(plan.phase_components(phase), key=lambda c: c.bytes)


def rollout_lines(plan: MemoryPlan) -> list[str]:
    """The rollout engine: per-group share, slots, pool, expected occupancy, dominant term."""
    eng, w = plan.engine, plan.workload
    if eng is None:
        return []
    g = w.kv_len - w.prompt_len
    lines = [
        f"  rollouts: {w.candidates} per step ({w.prompts} prompts x {w.k}), up to "
        f"{w.prompt_len} + {g} tokens, on one engine over the mesh",
        f"  engine: {eng.slots} slots ({eng.slots_from}; {eng.slots_per_device} per device), "
        f"{eng.pages:,} pages x {eng.page_size} tokens = {eng.tokens:,} tokens, whole on every "
        f"device ({eng.pages_from}; the engine's own default, every slot's whole budget, is "
        f"{eng.default_pages:,} pages), {eng.impl} layout",
    ]
    o = eng.occupancy
    if o is not None:
        lines.append(
            f"  expected slot occupancy {o.occupancy:.0%} (simulated schedule: response "
            f"lengths lognormal, median G/4 = {g // 4}, sigma {SIGMA}, capped at G = {g}: mean "
            f"{o.mean_length:,.0f}; a slot refilled as soon as it frees while the pool has pages; "
            f"{o.preemptions:.1f} preemptions, peak {o.peak_pages:,} pages, {o.steps:,.0f} steps)"
        )
        if not o.complete:
            lines.append(
                "  the simulated schedule thrashes (preempting again and again): the pool is "
                "too small for these slots; the figures cover the part simulated"
            )
        if o.preemptions:
            lines.append(
                "  preempted candidates are prefilled again (up to the whole sequence in one "
                "row): not counted in the prefill work"
            )
    big = dominant(plan, "rollout")
    lines.append(f"  rollout peak dominated by: {big.name} ({gib(big.bytes):.2f} GiB)")
    return lines


def format_table(plan: MemoryPlan) -> str:
    w = plan.workload
    hbm = plan.hbm
    lines = [f"plan: {headline(plan)}"]
    lines.append(
        f"  {w.kind} step: {plan.rows_per_device} row(s) x {w.seq_len} tokens per device per "
        f"micro-batch ({w.train_rows} rows / {plan.mesh_shape['data'] * plan.mesh_shape['fsdp']}"
        f" data*fsdp), grad_accum {w.grad_accum}, remat={plan.remat}"
    )
    if w.pack_tokens:
        lines.append(
            f"  packed: each micro-batch's {w.unpacked_rows} sequences in {w.train_rows} rows of "
            f"{w.pack_tokens} tokens (data.pack_tokens; "
            + ("one row per sequence, the most packing can need)" if w.kind == "sft" else
               "first-fit decreasing, the most rows over simulated micro-batches: responses "
               f"lognormal, median G/4, sigma {SIGMA}, after prompts of the full width)")
        )  # fmt: skip
    big = dominant(plan, "step")
    lines.append(f"  train step peak dominated by: {big.name} ({gib(big.bytes):.2f} GiB)")
    lines += rollout_lines(plan)
    lines.append("")
    lines.append(f"  {'component':<18} {'phase':<9} {'GiB/device':>10} {'% HBM':>7}  detail")
    for c in plan.components:
        lines.append(
            f"  {c.name:<18} {c.phase:<9} {gib(c.bytes):>10.2f} {100 * c.bytes / hbm:>6.1f}%  "
            f"{c.detail}"
        )
    rows = [("resident", plan.resident), ("train step peak", plan.step_peak)]
    if plan.rollout_rows_per_device:
        rows.append(("rollout peak", plan.rollout_peak))
    rows.append(("total (peak)", plan.total))
    lines.append("  " + "-" * 48)
    for name, n in rows:
        lines.append(f"  {name:<28} {gib(n):>10.2f} {100 * n / hbm:>6.1f}%")
    alts = ", ".join(f"{p} {gib(n):.2f}" for p, n in plan.activations_by_remat.items())
    lines.append(f"  activations + layer work by remat policy (GiB): {alts}")
    lines.append("  step*: only the larger counts (logits are freed before the layers' backward);")
    lines.append("  rollout*: likewise (a segment and a prefill never run at once).")
    lines.append("  State bytes are exact; the rest is estimated (+-25%; planning/memory.py).")
    lines.append(verdict(plan))
    return "\n".join(lines)


def to_json(plan: MemoryPlan) -> dict:
    w = plan.workload
    return {
        "preset": plan.model,
        "tpu": plan.tpu.name,
        "chips": plan.tpu.chips,
        "hbm_bytes": plan.hbm,
        "hbm_gib": round(plan.tpu.hbm_gib, 4),
        "mesh": plan.mesh_shape,
        "remat": plan.remat,
        "workload": {
            "kind": w.kind,
            "train_rows_per_device": plan.rows_per_device,
            "seq_len": w.seq_len,
            "pack_tokens": w.pack_tokens,
            "grad_accum": w.grad_accum,
            "candidates": w.candidates,
            "rollout_rows_per_device": plan.rollout_rows_per_device,
            "max_seq_len": w.kv_len if w.candidates else 0,
        },
        "engine": _engine_json(plan),
        "components": {
            c.name: {"phase": c.phase, "bytes": c.bytes, "gib": round(gib(c.bytes), 4)}
            for c in plan.components
        },
        "activations_by_remat": dict(plan.activations_by_remat),
        "step_dominant": dominant(plan, "step").name,
        "resident_bytes": plan.resident,
        "step_peak_bytes": plan.step_peak,
        "rollout_peak_bytes": plan.rollout_peak,
        "total_bytes": plan.total,
        "total_gib": round(gib(plan.total), 4),
        "fits": plan.fits,
        "shortfall_bytes": plan.shortfall,
        "shortfall_gib": round(gib(plan.shortfall), 4),
    }


def _engine_json(plan: MemoryPlan) -> dict | None:
    eng = plan.engine
    if eng is None:
        return None
    o = eng.occupancy
    return {
        "candidates": eng.candidates, "prompts": eng.prompts, "slots": eng.slots,
        "slots_per_device": eng.slots_per_device, "slots_from": eng.slots_from, "pages": eng.pages,
        "pages_from": eng.pages_from, "page_size": eng.page_size, "tokens": eng.tokens,
        "default_pages": eng.default_pages, "layout": eng.impl, "page_bytes": eng.page_bytes,
        "occupancy": None if o is None else round(o.occupancy, 4),
        "preemptions": None if o is None else o.preemptions,
        "dominant": dominant(plan, "rollout").name,
    }  # fmt: skip


def refusal_message(plan: MemoryPlan) -> str:
    """One paragraph: the shortfall, the largest component, and what would shrink it."""
    return (
        f"memory plan: {headline(plan)} does not fit: it needs {gib(plan.total):.2f} GiB per "
        f"device and the chip has {plan.tpu.hbm_gib:.2f} GiB, short by "
        f"{gib(plan.shortfall):.2f} GiB. {advice(plan)} Details: metastone-jax plan with the "
        "same --config (or unset config.train.tpu to skip this check)."
    )
