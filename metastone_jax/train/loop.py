"""The train loop: data -> (rollouts) -> jitted step -> metrics -> asynchronous checkpoint.

`train(config, workdir)` runs SFT, GRPO (+SPR) or SPR-only by `config.kind`; re-running it on the
same workdir resumes from the latest checkpoint (state, data position, RNG), so a resumed run
reproduces the uninterrupted one step for step. SIGTERM (TPU preemption) saves and exits cleanly;
a non-finite loss stops the run naming the step, keeping the last good checkpoint.
"""

from __future__ import annotations

import os
import signal
import time
from functools import partial
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from metastone_jax.data.packing import rows_needed
from metastone_jax.sharding import (
    make_mesh,
    maybe_initialize_distributed,
    placement,
    sharded_abstract,
)
from metastone_jax.train import setup
from metastone_jax.train.checkpoint import TrainCheckpointer
from metastone_jax.train.metrics import MetricsWriter
from metastone_jax.train.plan import check_train_config
from metastone_jax.train.resume import restore_newest
from metastone_jax.train.rollout import (
    LENGTH,
    SavedRollouts,
    engine_config,
    grade_rollouts,
    minibatches,
    pack_for_training,
    pack_rollouts,
    sample_rollouts,
    save_rollouts,
    split_micro,
)
from metastone_jax.train.run_config import TrainConfig
from metastone_jax.train.state import (
    TrainState,
    init_train_state,
    make_optimizer,
    optim_config,
    state_shardings,
)
from metastone_jax.train.step import StepConfig, compile_step, rollout_logprobs_fn
from metastone_jax.train.validate import check_workdir, validate_train_config
from metastone_jax.train.workdir_lock import WorkdirLock

ROLLOUTS_DIR = "rollouts"


class Preempted(Exception):
    """Raised after the state was saved on SIGTERM."""


class _SigtermFlag:
    """Records SIGTERM; the loop checks it between steps (a save mid-step is impossible)."""

    def __init__(self):
        self.set = False
        self._old = None

    def __enter__(self):
        def handler(signum, frame):
            self.set = True

        try:
            self._old = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread: no handler
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)

    def agreed(self) -> bool:
        """True when any process was signalled (all processes must save the same step)."""
        if jax.process_count() == 1:
            return self.set
        flags = multihost_utils.process_allgather(np.array([self.set], np.int32))
        return bool(np.max(flags))


def _host(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _mean_metrics(parts: list[dict[str, float]]) -> dict[str, float]:
    out = {k: float(np.mean([p[k] for p in parts])) for k in parts[0]}
    out["tokens"] = float(sum(p["tokens"] for p in parts))
    return out


LOGPROB_SUPPORTS = ("full", "sampled")


def _logprob_support(rl) -> dict:
    """rl.logprob_support -> StepConfig's support fields: "sampled" scores rollouts under the
    top-k/top-p distribution they were drawn from, "full" (as verl) under the whole softmax."""
    support = str(rl.logprob_support)
    if support not in LOGPROB_SUPPORTS:
        raise ValueError(f"rl.logprob_support={support!r}; expected one of {LOGPROB_SUPPORTS}")
    if support == "full":
        return {}
    return {"support_top_k": int(rl.top_k), "support_top_p": float(rl.top_p)}


def step_config(config: TrainConfig, step_tokens) -> StepConfig:
    return StepConfig(
        kind=config.kind,
        temperature=float(config.rl.temperature),
        **_logprob_support(config.rl),
        clip_eps=float(config.rl.clip_eps),
        kl_coef=float(config.rl.kl_coef),
        entropy_coef=float(config.rl.entropy_coef),
        spr_coef=float(config.spr.coef),
        spr_form=config.spr.form,
        spr_scope=config.spr.scope,
        spr_ranks=int(config.spr.ranks),
        spr_grad_scale=float(config.spr.grad_scale),
        sprm_dropout=bool(config.spr.dropout),
        step=step_tokens,
        logits_chunk=int(config.train.logits_chunk),
    )


def train(config: TrainConfig, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) the configured training; returns the last step's metrics. `config`: a
    TrainConfig (a ConfigDict is typed here first, train/run_config.py).

    The config's settings are checked first (train/validate.py); with config.train.tpu set
    (e.g. "v5e-8") so is the memory plan: a run that cannot fit the chips' HBM is refused
    (ValueError naming the shortfall) before anything is allocated or built. Then the run takes
    the workdir's lock (train/workdir_lock.py; process 0), so a second run on it is refused.
    Resuming takes the newest intact checkpoint (train/resume.py)."""
    config = validate_train_config(config)
    check_workdir(workdir)
    maybe_initialize_distributed()
    plan = check_train_config(config)  # abstract shapes only: nothing is built or allocated yet
    # The rollout engine's slots and pool: as configured, else as the plan chose them.
    engine = engine_config(config.rl, plan.engine if plan is not None else None)
    if jax.process_index() != 0:
        return _train(config, workdir, engine)
    with WorkdirLock(workdir):
        return _train(config, workdir, engine)


def _train(config: TrainConfig, workdir: str, engine) -> dict[str, Any]:
    mesh = make_mesh(config.mesh.as_dict())
    ctx = setup.prepare(config, workdir, mesh)
    graphdef = ctx.graphdef
    tx = make_optimizer(optim_config(config))
    step_cfg = step_config(config, ctx.step_tokens)
    kind = config.kind
    with_ref = kind == "grpo" and step_cfg.kl_coef > 0

    param_shardings = placement(nnx.state(ctx.abstract_model), mesh)
    init = partial(init_train_state, tx=tx, seed=int(config.seed), with_ref=with_ref)
    abstract = jax.eval_shape(init, ctx.abstract_params)
    shardings = state_shardings(abstract, param_shardings, mesh)
    ckpt = TrainCheckpointer(
        workdir,
        keep=int(config.train.keep),
        best_metric=config.train.best_metric or None,
        best_mode=config.train.best_mode,
        asynchronous=bool(config.train.async_checkpoint),
    )
    meta = {"model": ctx.model_cfg_json, "config": config.to_dict()}
    try:
        resumed = restore_newest(
            ckpt, sharded_abstract(abstract, shardings), ctx.model_cfg_json, meta["config"],
            workdir=workdir,
        )  # fmt: skip
    except BaseException:
        ckpt.close()
        raise
    latest = None
    if resumed is not None:
        state, data_state = resumed
        latest = int(state.step)
        ctx.iterator.restore(data_state)
    else:
        params = ctx.init_params()
        state = jax.jit(init, out_shardings=shardings)(params)
        del params
    start = int(state.step)
    total = int(config.train.steps)
    step_fn = compile_step(graphdef, step_cfg, tx, mesh, shardings)
    logprobs = rollout_logprobs_fn(
        graphdef, mesh, temperature=step_cfg.temperature, logits_chunk=step_cfg.logits_chunk,
        top_k=step_cfg.support_top_k, top_p=step_cfg.support_top_p,
    )  # fmt: skip
    writer = MetricsWriter(
        ctx.workdir,
        total_steps=total,
        start_step=start + 1,
        progress=bool(config.train.progress),
        desc=kind,
    )
    last: dict[str, float] = {}
    last_saved = latest
    try:
        with _SigtermFlag() as sigterm:
            for step in range(start + 1, total + 1):
                t0 = time.perf_counter()
                records = next(ctx.iterator)
                if isinstance(ctx.iterator, SavedRollouts):
                    batch = split_micro(records, int(config.data.grad_accum))
                    state, m = step_fn(state, batch)
                    metrics = _host(m)
                elif kind in ("grpo", "spr"):
                    state, metrics = _grpo_update(
                        state, records, ctx, config, step_fn, logprobs, step, mesh, engine
                    )
                else:
                    batch = _packed(setup.sft_rows(records, ctx, config), config, mesh, None)
                    state, m = step_fn(state, batch)
                    metrics = _host(m)
                loss = metrics["loss"]
                if not np.isfinite(loss):
                    raise FloatingPointError(
                        f"non-finite loss {loss} at step {step}; stopping. The last good "
                        f"checkpoint is step {last_saved} in {ckpt.directory}"
                    )
                dt = time.perf_counter() - t0
                metrics["tokens_per_s"] = metrics["tokens"] / dt
                metrics["step_time_s"] = dt
                writer.write(step, metrics)
                last = metrics
                stop = sigterm.agreed()
                if step % int(config.train.save_every) == 0 or step == total or stop:
                    ckpt.save(step, state, ctx.iterator.state(), meta, metrics)
                    last_saved = step
                if stop:
                    ckpt.wait()
                    raise Preempted(
                        f"SIGTERM: saved step {step} to {ckpt.directory}; "
                        "re-run the same command to resume"
                    )
        ckpt.wait()
        if config.train.export:
            if jax.process_count() == 1:
                setup.export(state, ctx, ctx.workdir)
            elif jax.process_index() == 0:
                print("metastone-jax train: multi-process run, export skipped (the checkpoint in "
                      f"{ckpt.directory} holds the params)")  # fmt: skip
    finally:
        writer.close()
        ckpt.close()
    return last


def _packed(batch, config: TrainConfig, mesh, step_tokens):
    """Micro-batches [A, b, T] packed into rows of data.pack_tokens (unchanged when 0), as
    many rows as the most any micro-batch of any process needs (every process's share of a
    global array has one shape), rounded up to the rows' devices."""
    width = config.data.pack_tokens
    if not width:
        return batch
    rows = rows_needed(batch["valid"], width)
    if jax.process_count() > 1:
        rows = int(np.max(multihost_utils.process_allgather(np.array([rows], np.int32))))
    devices = mesh.shape["data"] * mesh.shape["fsdp"] // jax.process_count()
    return pack_for_training(batch, width, rows_multiple=max(devices, 1), step=step_tokens,
                             rows=rows)  # fmt: skip


def _grpo_update(
    state: TrainState, records, ctx, config, step_fn, logprobs, step: int, mesh, engine
):
    """Rollouts for the batch's prompts, rewards, then `rl.mini_batches` updates."""
    prompts, answers = ctx.prompt_batch(records)
    rng = np.random.default_rng([int(config.seed), step])
    seeds = rng.integers(0, 2**31 - 1, size=len(prompts)).tolist()
    t0 = time.perf_counter()
    cands = sample_rollouts(
        ctx.graphdef, state.params, prompts, k=int(config.rl.k), sampling=ctx.sampling,
        step=ctx.sampler_step, seeds=seeds, pad_id=ctx.pad_id, mesh=mesh,
        engine=engine,
    )  # fmt: skip
    rollout_s = time.perf_counter() - t0
    format_check = bool(config.rl.format_check)
    prompt_texts = [ctx.tokenizer.decode(p) for p in prompts] if format_check else None
    rewards = grade_rollouts(
        cands.texts(ctx.tokenizer), answers, format_check=format_check, prompts=prompt_texts
    )
    rows = pack_rollouts(
        prompts, cands, rewards, prompt_width=int(config.data.max_prompt_len), pad_id=ctx.pad_id,
        truncated=config.spr.truncated,
    )  # fmt: skip
    if config.data.save_rollouts and jax.process_index() == 0:
        save_rollouts(os.path.join(ctx.workdir, ROLLOUTS_DIR), step, rows)
    mbs = [_packed(split_micro(mb, int(config.data.grad_accum)), config, mesh, ctx.step_tokens)
           for mb in minibatches(rows, int(config.rl.mini_batches))]  # fmt: skip
    if config.kind == "grpo":
        # The PPO ratio's denominator: the rollout policy, i.e. the params before any update.
        for mb in mbs:
            old, ref = logprobs(state.params, state.ref_params, mb)
            mb["old_logp"] = old
            if ref is not None:
                mb["ref_logp"] = ref
    parts = []
    for mb in mbs:
        state, m = step_fn(state, mb)
        parts.append(_host(m))
    metrics = _mean_metrics(parts)
    finished = cands.finish != LENGTH
    metrics.update(
        reward_mean=float(rewards.mean()),
        response_len=float(cands.length.mean()),
        truncated_fraction=float(1.0 - finished.mean()),
        rollout_s=rollout_s,
    )
    return state, metrics
