"""Continuous batching over a paged KV cache: the sampler's decode loop, at scale.

S slots decode together in a jitted segment: `sampler.advance` (the whole per-token logic: the
sampling chain, the in-loop SPRM score, the step rules, stop ids, the thinking budget) over a
paged cache (attention/paged.py; on the XLA path beside a dense working set of the prompts, read
once per block of rows, and of the segment's own tokens: attention/segment_kv.py). A segment ends
after `segment_steps` tokens, as soon as a slot finishes while candidates wait for one (so no
slot idles for long; with the queue empty, once enough are done for the slots to shrink), or
when the pool has no page for a slot that needs one.
Between segments the host harvests finished candidates, returns their pages to the pool, and
refills the free slots from the queue: more candidates of a question whose prompt is resident
(they share its full pages read-only and copy its last, partial page), or new questions,
prefilled in a batch into pages. Out of pages, the most recently started candidate is preempted:
its pages go back, and it is re-queued first; on resumption its prompt and tokens so far are
prefilled again (vLLM's recompute preemption).

Determinism: candidate j of request b draws its t-th token with fold_in(fold_in(key(seed_b), j),
t) (`sampler.seed_keys`, `sampler.advance`): its tokens do not depend on its slot, its
neighbours, S, the page size, the queue order or a preemption (floating-point rounding aside).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import time
from collections import deque
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from metastone_jax.attention import paged, segment_kv
from metastone_jax.sample import sampler, shrink_cost
from metastone_jax.sample.processors import SamplingParams
from metastone_jax.sharding import constrain
from metastone_jax.sprm.aggregation import RunningScore
from metastone_jax.sprm.steps import StepTokens

DEFAULT_PAGE_SIZE = 64  # XLA:CPU attention pays per page column (bench/RESULTS.md)
DEFAULT_SEGMENT_STEPS = 128
MIN_SLOTS = 8  # the tail's slots shrink down to this many (`Engine._maybe_shrink`)
REFILL_FRACTION = 16  # with candidates waiting, a segment ends once 1/16 of the slots are free


def slot_sizes(slots: int) -> list[int]:
    """The sizes the slots shrink through: 4, 5, 6 and 7 times each power of two over 4 below
    `slots` (8, 10, 12, 14, 16, 20, ...; from MIN_SLOTS): the live rows fill at least 4/5 of
    the slots, at a compilation per size (bench/RESULTS.md: 2/3 with halves and 1.5x steps
    gave 87.8% occupancy on the heavy-tailed bench)."""
    sizes, n = {slots}, MIN_SLOTS
    while n < slots:
        sizes.update(n * m // 4 for m in (4, 5, 6, 7))
        n *= 2
    return sorted(x for x in sizes if x <= slots)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """slots: candidates decoded together (0: all of them, up to 256). page_size: tokens per
    page (0: DEFAULT_PAGE_SIZE, or the largest power of two below it dividing max_len).
    pages: the pool's size (0: `memory_fraction` of free memory if given, else enough for
    every slot's whole budget). segment_steps: most tokens per jitted segment.
    attention_impl: "xla" or "pallas" (None: the backend's default). precompile: compile the
    segment for every slot count the tail may shrink to (`slot_sizes`) before decoding, as
    JetStream and vLLM's TPU backend compile their shapes at start-up; the tail then shrinks
    whenever its rows fit, with no compilation left to pay for (`shrink_cost`). Worth it in a
    process that decodes long or often (GRPO rollouts, a server); off, a size is compiled once
    the idle slots it would have saved have cost a compilation."""

    slots: int = 0
    page_size: int = 0
    pages: int = 0
    memory_fraction: float | None = None
    segment_steps: int = DEFAULT_SEGMENT_STEPS
    attention_impl: str | None = None
    precompile: bool = False


@dataclasses.dataclass(frozen=True)
class Layout:
    """The engine's resolved sizes (static: part of the compiled shapes)."""

    slots: int
    page_size: int
    pages: int
    columns: int  # page-table width: pages of the longest sequence
    impl: str
    block_rows: int = 1  # R, rows per prompt block on the XLA path (1: none; segment_kv.py)
    prompt_columns: int = 0  # pages of the longest prompt
    # Segments read the XLA path's dense working set (attention/segment_kv.py): when every
    # candidate has a slot from the start (no queue: segments run long). With a queue, a
    # segment ends every few steps to refill (the demo's: 5 on average), and the working set's
    # fixed width costs more than the page copies it saves (bench/RESULTS.md).
    working_set: bool = False


def plan_layout(cfg, engine: EngineConfig, prompt_lens, max_new: int, n_candidates: int,
                n_questions: int, group: int = 0) -> Layout:  # fmt: skip
    """Checks the settings against the model and the requests, before anything is compiled.
    group: the candidates of a question decode as one group of that size (beam search,
    pruning: `GroupPolicy`; 0: independently)."""
    page = engine.page_size
    if not isinstance(page, int) or page < 0:
        raise ValueError(f"page_size: expected a positive integer (0: the default), got {page!r}")
    if page == 0:
        page = math.gcd(DEFAULT_PAGE_SIZE, cfg.max_len & -cfg.max_len)
    if cfg.max_len % page:
        raise ValueError(
            f"page_size={page} does not divide the model's max_len={cfg.max_len} "
            "(the page table covers whole pages of the longest sequence)"
        )
    impl = engine.attention_impl or paged.default_attention_impl()
    if impl not in paged.ATTENTION_IMPLS:
        raise ValueError(f"attention_impl: expected one of {paged.ATTENTION_IMPLS}, got {impl!r}")
    if engine.segment_steps < 1:
        raise ValueError(f"segment_steps: expected >= 1, got {engine.segment_steps}")
    slots = engine.slots or min(n_candidates, 256)
    if group and not engine.slots:
        slots = group * max(1, min(n_questions, 256 // group))
    if slots < 1:
        raise ValueError(f"slots: expected >= 1, got {engine.slots}")
    if slots < group:
        raise ValueError(f"slots={slots} cannot hold a question's {group} candidates, which "
                         "beam search and pruning decode together")  # fmt: skip
    longest = max(prompt_lens) + max_new
    columns = math.ceil(longest / page)
    # A sequence alone (prompt pages + its own) must fit, or nothing could ever finish.
    need_one = columns + 1
    pages = engine.pages
    prompt_pages = math.ceil(max(prompt_lens) / page)
    resident = min(slots // group if group else slots, n_questions)
    every_slot_full = slots * (columns + 1) + resident * prompt_pages
    if not pages:
        pages = default_pages(slots, columns, resident, prompt_pages)
        if engine.memory_fraction is not None and not group:
            pages = min(pages, pages_for_memory(cfg, page, impl, engine.memory_fraction))
    if group and pages < every_slot_full:
        raise ValueError(
            f"pages={pages}: beam search and pruning need a pool in which every slot reaches "
            f"its whole length ({every_slot_full} pages for slots={slots}; they never preempt)"
        )
    if pages < slots:
        raise ValueError(f"pages={pages} is fewer than slots={slots}: each slot needs a page")
    if pages < need_one:
        raise ValueError(
            f"pages={pages} x page_size={page} cannot hold one sequence of {longest} tokens "
            f"(the longest prompt, {max(prompt_lens)}, + max_new_tokens={max_new}): "
            f"at least {need_one} pages are needed"
        )
    k = max(1, n_candidates // max(1, n_questions))
    working_set = impl == "xla" and not group and n_candidates <= slots
    rows = segment_kv.rows_per_block(k) if working_set else 1
    return Layout(slots, page, pages, columns, impl, rows, math.ceil(max(prompt_lens) / page),
                  working_set)  # fmt: skip


def default_pages(slots: int, columns: int, resident: int, prompt_pages: int) -> int:
    """The pool with no size given: every slot's whole budget (`columns` pages and one for a
    prompt's partial page) and the `resident` questions' prompt pages, rounded up to a whole
    multiple of `slots`, so that calls differing only in their resident questions (beam
    search at k = 2, 8, 32; the evaluation pool) share one pool shape and so their compiled
    programs."""
    need = slots * (columns + 1) + resident * prompt_pages
    return -(-need // slots) * slots


_decode_cache: list = []  # [(the model's parameter arrays, their decode weights)]: the last


def decode_weights(model):
    """On XLA:CPU, the weights laid for decoding (`Transformer.decode_weights`): a loop body
    that slices the stacked ones copies every weight matrix each step (or, hoisted, holds a
    copy, in f32 for bf16 weights, among the program's temporaries). Elsewhere None: XLA reads
    the slices in place there. The last model's are kept and reused while its parameters are
    the same arrays (repeated calls on one model make them once)."""
    if jax.default_backend() != "cpu":
        return None
    leaves = jax.tree.leaves(nnx.state(model))
    if any(isinstance(x, jax.core.Tracer) for x in leaves):  # traced (the planner): no cache
        return model.decode_weights()
    for cached, weights in _decode_cache:
        if len(cached) == len(leaves) and all(map(operator.is_, cached, leaves)):
            return weights
    _decode_cache.clear()  # the last model's copy goes before the next one is made
    weights = model.decode_weights()
    _decode_cache.append((leaves, weights))
    return weights


def page_bytes(cfg, page_size: int, impl: str) -> int:
    """Bytes of one page over all layers, keys and values, in `impl`'s layout (the pallas one
    pads head_dim to 128)."""
    k_shape, v_shape = paged.pool_shapes(impl, 1, page_size, cfg.n_kv_heads, cfg.head_dim)
    item = jnp.dtype(cfg.compute_jnp_dtype).itemsize
    return cfg.n_layers * (math.prod(k_shape) + math.prod(v_shape)) * item


def pages_for_memory(cfg, page_size: int, impl: str, fraction: float) -> int:
    """Pages that `fraction` of the free memory of device 0 (host RAM on CPU) holds."""
    if not 0 < fraction <= 1:
        raise ValueError(f"memory_fraction: expected a number in (0, 1], got {fraction!r}")
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    else:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        free = int(info["MemAvailable"].split()[0]) * 1024
    return int(fraction * free // page_bytes(cfg, page_size, impl))


# ---------------------------------------------------------------------------------------------
# Device functions (jitted; the state is donated)
# ---------------------------------------------------------------------------------------------


def _row_fields(state: sampler.DecodeState) -> sampler.DecodeState:
    return state.replace(cache=None)


def _constrain(state: sampler.DecodeState) -> sampler.DecodeState:
    """Under a mesh: slots over ('data', 'fsdp') as far as S divides them, the pool's KV heads
    over 'tensor' (pages whole on every row device: a slot reads any page); no-op without."""

    def rows(x):
        return constrain(x, ("batch",) + (None,) * (x.ndim - 1)) if x.ndim else x

    cache = state.cache
    cache = cache.replace(
        k=paged.constrain_pool(cache.k, cache.impl), v=paged.constrain_pool(cache.v, cache.impl),
        page_table=rows(cache.page_table), kv_len=rows(cache.kv_len),
    )  # fmt: skip
    rest = jax.tree.map(rows, _row_fields(state))
    return rest.replace(cache=cache)


def empty_state(cfg, layout: Layout, opts: sampler.DecodeOptions) -> sampler.DecodeState:
    """S empty slots (done) over an empty pool."""
    s, g = layout.slots, opts.params.max_new_tokens
    k, v = paged.init_pool(cfg, layout.pages, layout.page_size, layout.impl)
    cache = paged.PagedKV(
        k=k, v=v, page_table=jnp.zeros((s, layout.columns), jnp.int32),
        kv_len=jnp.zeros((s,), jnp.int32), impl=layout.impl,
    )  # fmt: skip
    s_max = sampler._max_steps(opts.params)
    dtype = cfg.compute_jnp_dtype
    return _constrain(
        sampler.DecodeState(
            cache=cache,
            next_logits=jnp.zeros((s, cfg.vocab_size), jnp.float32),
            next_feature=jnp.zeros((s, cfg.d_model), dtype),
            tokens=jnp.full((s, g), opts.pad_id, jnp.int32),
            length=jnp.zeros((s,), jnp.int32),
            limit=jnp.full((s,), g, jnp.int32),
            prompt_len=jnp.zeros((s,), jnp.int32),
            prev=jnp.zeros((s,), jnp.int32),
            done=jnp.ones((s,), bool),
            paused=jnp.zeros((s,), bool),
            finish=jnp.zeros((s,), jnp.int32),
            logprob=jnp.zeros((s,), jnp.float32),
            seen=jnp.zeros((s, cfg.vocab_size), bool),
            n_open=jnp.zeros((s,), jnp.int32),
            n_close=jnp.zeros((s,), jnp.int32),
            open_pos=jnp.full((s,), -1, jnp.int32),
            close_pos=jnp.full((s,), -1, jnp.int32),
            think_tokens=jnp.zeros((s,), jnp.int32),
            step_scores=jnp.zeros((s, s_max), jnp.float32),
            step_index=jnp.full((s, s_max), -1, jnp.int32),
            step_features=jnp.zeros((s, s_max, cfg.d_model), dtype) if opts.keep_features else None,
            n_steps=jnp.zeros((s,), jnp.int32),
            running=RunningScore.init((s,)),
            keys=jnp.zeros((s, 2), jnp.uint32),
            clock=jnp.zeros((), jnp.int32),
        )
    )


def segment(graphdef, model_state, weights, state, free, n_free, exit_settled, group,
            exit_groups, blocks, *, opts, steps: int):  # fmt: skip
    """Decodes up to `steps` tokens per slot; stops early once `exit_settled` slots are
    finished (or paused; the host asks for one more than now when it has candidates to start,
    else for the count at which the slots would shrink), when every slot is idle, when the
    slots that need a page this step outnumber the free ones (`n_free` pages on top of the
    stack `free` [P]), or when `exit_groups` groups have their slots (`group` [S]: an id in
    [0, S) per slot, -1: none) all paused or finished (at a barrier: beam search, pruning).
    weights: `decode_weights(model)` (None: the stacked ones, sliced in place on
    accelerators). blocks: the prompt blocks (`segment_kv.plan_blocks`: the XLA path reads
    the prompts and the segment's tokens from a dense working set; None: from the pages).
    -> (state, n_free)."""
    rows = jnp.arange(state.done.shape[0])
    cache = state.cache
    if blocks is not None:
        work = segment_kv.build(cache.k, cache.v, cache.kv_len, blocks, steps=steps)
        state = state.replace(cache=cache.replace(segment=work))

    def needs_page(s):
        page = s.cache.page_size
        return ~s.done & ~s.paused & (s.cache.kv_len % page == 0)

    def cond(carry):
        s, n, i = carry
        active = ~s.done & ~s.paused
        return (
            jnp.any(active)
            & (i < steps)
            & (jnp.sum(needs_page(s)) <= n)
            & (jnp.sum(s.done | s.paused) < exit_settled)
            & (_settled_groups(s, group) < exit_groups)
        )

    def forward(model, token, active, s):
        return model.decode_paged(token, s.cache, active, weights)

    def body(carry):
        s, n, i = carry
        need = needs_page(s)
        rank = jnp.cumsum(need) - 1
        new_page = free[jnp.clip(n - 1 - rank, 0, free.shape[0] - 1)]
        col = jnp.minimum(s.cache.kv_len // s.cache.page_size, s.cache.page_table.shape[1] - 1)
        table = s.cache.page_table
        table = table.at[rows, col].set(jnp.where(need, new_page, table[rows, col]))
        s = s.replace(cache=s.cache.replace(page_table=table))
        model = nnx.merge(graphdef, model_state)
        return _constrain(sampler.advance(s, opts, model, forward)), n - jnp.sum(need), i + 1

    carry = (_constrain(state), n_free, jnp.int32(0))
    if blocks is None:
        state, n_free, _ = jax.lax.while_loop(cond, body, carry)
        return state, n_free
    # One loop per chunk of the working set: loop c reads chunks 0..c (segment_kv.SegmentKV).
    for c in range(segment_kv.chunks(steps)):
        end = min((c + 1) * segment_kv.chunk_width(steps), steps)
        s, n, i = carry
        s = s.replace(cache=s.cache.replace(segment=s.cache.segment.replace(phase=c)))
        carry = jax.lax.while_loop(lambda x, end=end: cond(x) & (x[2] < end), body, (s, n, i))
    state, n_free, _ = carry
    return state.replace(cache=state.cache.replace(segment=None)), n_free


def _settled_groups(state, group) -> jax.Array:
    """How many groups have their slots all paused or finished. group [S]: ids in [0, S), -1
    for a slot in no group."""
    n = group.shape[0]
    ids = jnp.where(group >= 0, group, n)  # n: no group
    live = (~state.done & ~state.paused).astype(jnp.int32)
    members = jax.ops.segment_sum(jnp.ones_like(live), ids, n + 1)[:n]
    unsettled = jax.ops.segment_sum(live, ids, n + 1)[:n]
    return jnp.sum((members > 0) & (unsettled == 0))


def prefill(graphdef, model_state, weights, tokens, valid, page_ids, offsets, k_pool, v_pool, *,
            step, impl: str):  # fmt: skip
    """Runs right-padded sequences [B, T] once, writing their keys and values into the pages
    `page_ids` [B, T] at `offsets` (page < 0: padding). -> (k_pool, v_pool, per-sequence
    start fields: a DecodeState row template without cache)."""
    model = nnx.merge(graphdef, model_state)
    cfg = model.cfg
    hidden, features, (ks, vs) = model.prefill_kv(tokens, valid, weights)
    new_k, new_v = [], []
    for i in range(cfg.n_layers):
        # [B, K, T, hd] -> [B, T, K, hd]
        kp, vp = paged.write(k_pool[i], v_pool[i], ks[i].transpose(0, 2, 1, 3),
                             vs[i].transpose(0, 2, 1, 3), page_ids, offsets, impl)  # fmt: skip
        new_k.append(kp)
        new_v.append(vp)
    last = jnp.maximum(jnp.sum(valid, axis=1) - 1, 0)
    take = lambda x: jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]  # noqa: E731
    start = dict(
        next_logits=model.decode_logits(take(hidden), weights),
        next_feature=take(features),
        **sampler.prompt_fields(tokens, valid, step, cfg.vocab_size),
    )
    return paged.constrain_pool(new_k, impl), paged.constrain_pool(new_v, impl), start


def insert(state, slots, fresh, starts, q_rows, keys, limits, saved, page_rows, kv_len,
           copy_src, copy_dst):  # fmt: skip
    """Starts candidates in `slots` [M] (S: none). `saved`: their rows (DecodeState fields
    [M, ...], no cache): blank rows for new candidates, the rows they left for preempted ones.
    Row q_rows [M] of `starts` (a prefill's start fields) gives the next logits and feature,
    and for `fresh` [M] candidates the prompt-derived fields. keys [M, 2], limits [M];
    page_rows [M, W], kv_len [M]; copy_src/dst [M]: a page copied first (the prompt's partial
    last page into the candidate's own; dst < 0: none)."""
    m = slots.shape[0]

    def pick(name):
        return jnp.take(starts[name], q_rows, axis=0)

    new = {
        name: getattr(saved, name)
        for name in (
            "tokens",
            "length",
            "logprob",
            "think_tokens",
            "step_scores",
            "step_index",
            "n_steps",
            "running",
            "step_features",
        )  # fmt: skip
    }
    for name in ("prompt_len", "prev", "seen", "n_open", "n_close", "open_pos", "close_pos"):
        f, old = pick(name), getattr(saved, name)
        new[name] = jnp.where(fresh.reshape((m,) + (1,) * (f.ndim - 1)), f, old)
    new.update(
        next_logits=pick("next_logits"), next_feature=pick("next_feature"), keys=keys,
        limit=limits, done=jnp.zeros((m,), bool), paused=jnp.zeros((m,), bool),
        finish=jnp.full((m,), sampler.RUNNING, jnp.int32),
    )  # fmt: skip

    def put(full, part):
        return full.at[slots].set(part.astype(full.dtype), mode="drop")

    updates = {
        name: None if value is None else jax.tree.map(put, getattr(state, name), value)
        for name, value in new.items()
    }
    cache = state.cache
    cache = cache.replace(
        k=paged.copy_pages(cache.k, copy_src, copy_dst),
        v=paged.copy_pages(cache.v, copy_src, copy_dst),
        page_table=put(cache.page_table, page_rows),
        kv_len=put(cache.kv_len, kv_len),
    )
    return _constrain(state.replace(cache=cache, **updates))


def regroup(state, slots, src, keys, prune, page_rows, kv_len, copy_src, copy_dst):
    """A group's barrier: slot slots[i] [M] takes the row of slot src[i] (a beam's child its
    parent's; itself: unchanged), the key keys[i], its pages page_rows[i] [M, W] and kv_len[i]
    (page copy_src[i] copied first to copy_dst[i]; < 0: none); prune[i] finishes it (PRUNED);
    every one is unpaused. Slots = S: padding."""
    m = slots.shape[0]
    n = state.done.shape[0]
    src = jnp.clip(src, 0, n - 1)

    def move(x):
        return x.at[slots].set(jnp.take(x, src, axis=0), mode="drop") if x.ndim else x

    rest = jax.tree.map(move, _row_fields(state))
    done = jnp.take(state.done, src) | prune
    finish = jnp.where(prune, sampler.PRUNED, jnp.take(state.finish, src))
    rest = rest.replace(
        keys=rest.keys.at[slots].set(keys.astype(jnp.uint32), mode="drop"),
        done=rest.done.at[slots].set(done, mode="drop"),
        finish=rest.finish.at[slots].set(finish, mode="drop"),
        paused=rest.paused.at[slots].set(jnp.zeros((m,), bool), mode="drop"),
    )
    cache = state.cache
    cache = cache.replace(
        k=paged.copy_pages(cache.k, copy_src, copy_dst),
        v=paged.copy_pages(cache.v, copy_src, copy_dst),
        page_table=cache.page_table.at[slots].set(page_rows, mode="drop"),
        kv_len=cache.kv_len.at[slots].set(kv_len, mode="drop"),
    )
    return _constrain(rest.replace(cache=cache))


def compact(state, rows):
    """The state of slots `rows` [S'] only, in that order. The caller passes the state without
    its pool (k, v empty) and puts the pool back: a jit returning an input it does not donate
    copies it, and copying the whole pool at every shrink cost ~6% of the heavy-tailed bench
    (bench/RESULTS.md)."""
    cache = state.cache
    fields = jax.tree.map(lambda x: jnp.take(x, rows, axis=0) if x.ndim else x,
                          _row_fields(state))  # fmt: skip
    cache = cache.replace(page_table=jnp.take(cache.page_table, rows, axis=0),
                          kv_len=jnp.take(cache.kv_len, rows, axis=0))  # fmt: skip
    return _constrain(fields.replace(cache=cache))


def take_rows(state, slots):
    """The rows of `slots` [M] (clipped), with the final step mask. Every leaf is a new array:
    the rows outlive the state, which the next call donates (a shared scalar would be a
    deleted buffer by then), so the clock, which rows do not have, is a fresh zero."""
    rows = jax.tree.map(lambda x: jnp.take(x, slots, axis=0, mode="clip") if x.ndim else x,
                        _row_fields(state))  # fmt: skip
    rows = rows.replace(clock=jnp.zeros((), jnp.int32))
    return rows, sampler.final_step_mask(rows)


@functools.lru_cache(maxsize=32)
def _compiled(graphdef, which: str, opts, steps: int = 0, impl: str = "xla"):
    """The engine's jitted programs, one per (model graph, program, static settings). opts:
    the DecodeOptions for "segment", the StepTokens for "prefill", None for the others."""
    if which == "segment":
        fn = functools.partial(segment, graphdef, opts=opts, steps=steps)
        return jax.jit(fn, donate_argnums=(2,))
    if which == "prefill":
        # Keyed on the step tokens alone (all it reads of the options): sampling stages with
        # other options (the pool, beam search) share its compilations.
        fn = functools.partial(prefill, graphdef, step=opts, impl=impl)
        return jax.jit(fn, donate_argnums=(6, 7))
    if which == "insert":
        return jax.jit(insert, donate_argnums=(0,))
    if which == "compact":
        return jax.jit(compact)  # smaller outputs: nothing to donate into (the pool: not passed)
    if which == "regroup":
        return jax.jit(regroup, donate_argnums=(0,))
    return jax.jit(take_rows)


@functools.lru_cache(maxsize=8)
def _empty_state_fn(cfg, layout: Layout, opts):
    """The jitted `empty_state` (one compilation per configuration, not per call)."""
    return jax.jit(functools.partial(empty_state, cfg, layout, opts))


def vacate(state, slots):
    """Marks `slots` [M] (S: none) idle (a preempted candidate's slot)."""
    return state.replace(done=state.done.at[slots].set(True, mode="drop"))


def put_starts(table: dict, rows, starts: dict) -> dict:
    """Writes a prefill's start fields [B, ...] into rows `rows` [B] of the question table."""
    return {n: table[n].at[rows].set(starts[n].astype(table[n].dtype), mode="drop")
            for n in table}  # fmt: skip


_jit_vacate = jax.jit(vacate, donate_argnums=(0,))
_jit_put_starts = jax.jit(put_starts, donate_argnums=(0,))


# ---------------------------------------------------------------------------------------------
# The host loop
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GroupView:
    """A question's candidates at a barrier, in candidate order (host arrays [k]): done,
    finish, running (`RunningScore`), keys [k, 2]."""

    done: np.ndarray
    finish: np.ndarray
    running: Any
    keys: np.ndarray


@dataclasses.dataclass
class GroupAction:
    """What a barrier does: candidate i continues from candidate source[i]'s row (None: its
    own), with keys[i] (None: its own); prune[i] finishes it as PRUNED (None: none)."""

    source: np.ndarray | None = None
    keys: np.ndarray | None = None
    prune: np.ndarray | None = None


class GroupPolicy:
    """Decides at each barrier of a question's group (every candidate paused at its next step
    boundary or finished): sample/search.py's beam search and early pruning. keep_done:
    finished candidates stay in their slots until the whole group is done (beam search ranks
    them), else they leave at the barrier."""

    keep_done: bool = False

    def at_barrier(self, question: int, round_: int, view: GroupView) -> GroupAction:
        raise NotImplementedError


@dataclasses.dataclass
class _Request:
    question: int
    candidate: int
    saved: Any = None  # the row it left when preempted (device arrays, [1, ...])
    generated: np.ndarray | None = None  # its tokens so far, when preempted


@dataclasses.dataclass
class _Question:
    pages: list  # prompt pages (the last one, if partial, only as a copy source)
    row: int  # its start fields' row in the question table
    pending: int  # candidates not started yet
    running: int = 0
    finished: int = 0
    expected: int = 0  # candidates it completes with (k; the resumed ones of `resume`)


@dataclasses.dataclass
class EngineStats:
    """Counters of one `generate` call."""

    segments: int = 0
    steps: int = 0  # decode iterations (each runs all S slots)
    tokens: int = 0  # tokens generated (useful row-steps)
    slot_steps: int = 0  # S x steps
    preemptions: int = 0
    prefills: int = 0
    resizes: int = 0  # times the slots shrank for the tail
    # Pages held / pages the live tokens fill (`Engine._count_pages`), the worst at a harvest,
    # and both summed over harvests (their ratio: the run's average).
    held_over_alive: float = 0.0
    held_sum: int = 0
    alive_sum: int = 0
    peak_pages: int = 0  # most pages held at a harvest
    seconds: float = 0.0

    @property
    def occupancy(self) -> float:
        return self.tokens / self.slot_steps if self.slot_steps else 0.0


class Engine:
    """One `generate` call's scheduler: the queue, the page allocator, the slots."""

    def __init__(self, model, prompts, *, k, params, step, seeds, engine, limits, pad_id,
                 score_steps, keep_features, order, on_question, progress,
                 mesh=None, policy=None, resume=None, keep_row=None):  # fmt: skip
        cfg = model.cfg
        self.cfg, self.k, self.prompts = cfg, k, [list(p) for p in prompts]
        g = params.max_new_tokens
        sampler.check_prompts(self.prompts, max_len=cfg.max_len, max_new=g)
        if k < 1:
            raise ValueError(f"k: expected >= 1 candidates per prompt, got {k}")
        if score_steps and model.sprm is None:
            raise ValueError("this model has no SPRM head (ModelConfig.sprm_head=False)")
        b = len(self.prompts)
        self.policy = policy
        self.layout = plan_layout(cfg, engine, [len(p) for p in self.prompts], g, b * k, b,
                                  group=k if policy is not None else 0)  # fmt: skip
        self.segment_steps = engine.segment_steps
        self.precompile = engine.precompile
        pad_id = sampler._pad_id(cfg) if pad_id is None else pad_id
        self.opts = sampler.DecodeOptions(
            params=params, step=step, pad_id=pad_id, score_steps=score_steps,
            keep_features=keep_features, until_step=policy is not None,
        )  # fmt: skip
        seeds = [seeds] * b if isinstance(seeds, int) else list(seeds)
        if len(seeds) != b:
            raise ValueError(f"seeds: expected one per prompt ({b}), got {len(seeds)}")
        self.keys = np.asarray(sampler.seed_keys(np.asarray(seeds), k))
        self.limits = (np.full(b * k, g, np.int32) if limits is None
                       else sampler.check_limits(limits, b, k, g))  # fmt: skip
        order = list(range(b)) if order is None else list(order)
        if sorted(order) != list(range(b)):
            raise ValueError("order: expected a permutation of the prompt indices")
        self.queue = deque(_Request(q, j) for q in order for j in range(k))
        self.resumes: deque[_Request] = deque()
        # Candidates to continue from rows of an earlier run (the thinking selection's answer
        # phase): (question, candidate, row [1, ...] without cache, its tokens so far).
        self.resume = list(resume or [])
        if self.resume:
            self.queue.clear()
            self.resumes.extend(_Request(q, j, row, np.asarray(gen)) for q, j, row, gen in
                                self.resume)  # fmt: skip
        self.keep_row = keep_row  # keep_row(q, Candidates of q) -> the candidate whose row stays
        self.kept_rows: dict[int, tuple[int, Any]] = {}
        self.on_question, self.progress = on_question, progress
        self.graphdef, self.model_state = nnx.split(model)
        self.weights = decode_weights(model)
        self.mesh = mesh

    # -- the pool --------------------------------------------------------------------------

    def _take_pages(self, n: int) -> list[int]:
        out = self.free[len(self.free) - n :][::-1]
        del self.free[len(self.free) - n :]
        self.refs[out] = 1
        return out

    def _share(self, pages) -> None:
        """One more holder of each page (a candidate listing its prompt's or its beam
        parent's full pages)."""
        np.add.at(self.refs, np.asarray(pages, np.int64), 1)

    def _give(self, pages) -> None:
        """One holder fewer; a page nobody holds goes back to the pool."""
        for p in pages:
            p = int(p)
            self.refs[p] -= 1
            if self.refs[p] == 0:
                self.free.append(p)

    def run(self) -> tuple[sampler.Candidates, EngineStats]:
        with sampler._mesh_context(self.mesh):
            return self._run()

    def _run(self) -> tuple[sampler.Candidates, EngineStats]:
        lay, opts, cfg = self.layout, self.opts, self.cfg
        s_count = lay.slots
        t0 = time.perf_counter()
        self.stats = EngineStats()
        self.free = list(range(lay.pages - 1, -1, -1))  # a stack: pages pop from the end
        self.refs = np.zeros(lay.pages, np.int32)  # holders of each page
        # Made by a jitted call: every field its own buffer (the state is donated).
        self.state = _empty_state_fn(cfg, lay, opts)()
        # The rows a new candidate starts from.
        self.blank = _compiled(self.graphdef, "take", None)(self.state, jnp.arange(s_count))[0]
        # Each resident question's start fields, 2S rows, made with the first prefill.
        self.table = None
        self.free_rows = list(range(2 * s_count - 1, -1, -1))
        self.questions: dict[int, _Question] = {}
        for q, _, _, _ in self.resume:
            qs = self.questions.setdefault(q, _Question([], -1, pending=0))
            qs.expected += 1
        self.stash: dict[int, dict[int, Any]] = {}  # rows of `keep_row` questions, until done
        self.slot_req: list[_Request | None] = [None] * s_count
        self.slot_started = [0] * s_count
        # Whether a slot's page table starts with its question's prompt pages (a resumed
        # candidate's prompt was prefilled into pages of its own): such rows read the prompt
        # per block of rows on the XLA path (`_blocks`).
        self.slot_shared = [False] * s_count
        self.started = 0
        b, k, g = len(self.prompts), self.k, opts.params.max_new_tokens
        results = _Results(b, k, g, sampler._max_steps(opts.params), cfg.d_model,
                           cfg.compute_jnp_dtype if opts.keep_features else None)  # fmt: skip
        self.next_done = 0  # questions reported in order up to here
        self.completed: set[int] = set()
        bar = _ProgressBar(self.progress, b, b * k)
        # No segment outlasts the budget: a slot started in it would be done by then.
        steps = min(self.segment_steps, g)
        segment_fn = _compiled(self.graphdef, "segment", opts, steps=steps)
        self.clock = shrink_cost.SegmentClock(
            (self.graphdef, opts, steps, dataclasses.replace(lay, slots=0))
        )
        if self.precompile:
            self._precompile(segment_fn)
        self.rounds: dict[int, int] = {}  # barriers each question's group has passed
        self.max_remaining = opts.params.max_new_tokens  # tokens a live candidate may still add
        while self.queue or self.resumes or any(r is not None for r in self.slot_req):
            self._fill()
            free_arr = np.zeros(lay.pages, np.int32)
            free_arr[: len(self.free)] = self.free
            n_before = len(self.free)
            clock0 = int(self.state.clock)
            size, seg_t0 = len(self.slot_req), time.perf_counter()
            fitting = self._fitting_sizes()
            self.state, n_after = segment_fn(
                self.model_state,
                self.weights,
                self.state,
                jnp.asarray(free_arr),
                jnp.int32(n_before),
                jnp.int32(self._exit_settled()),
                *self._group_args(),
                self._blocks(),
            )
            n_after = int(n_after)
            steps = int(self.state.clock) - clock0
            self.clock.record(size, time.perf_counter() - seg_t0, steps, fitting)
            self.refs[self.free[n_after:]] = 1  # popped by the slots that grew a page
            del self.free[n_after:]
            self.stats.segments += 1
            self.stats.steps += steps
            self.stats.slot_steps += steps * len(self.slot_req)
            held = lay.pages - len(self.free)
            self.stats.peak_pages = max(self.stats.peak_pages, held)
            changed = self._harvest(results, bar)
            if not self._maybe_shrink() and not changed and not steps:
                raise RuntimeError("engine: a segment made no progress (an internal error)")
        bar.close()
        self.stats.tokens = int(results.length.sum())
        self.stats.seconds = time.perf_counter() - t0
        return results.candidates(), self.stats

    # -- filling slots -----------------------------------------------------------------------

    def _fill(self) -> None:
        page = self.layout.page_size
        free_slots = [s for s, r in enumerate(self.slot_req) if r is None]
        running = len(self.slot_req) - len(free_slots)
        fresh, resumed, new_q = [], [], []
        promised = 0  # pages the admitted candidates take after this loop
        while free_slots and (self.resumes or self.queue):
            req = self.resumes[0] if self.resumes else self.queue[0]
            q = req.question
            plen = len(self.prompts[q])
            copy = 1 if plen % page else 0  # the partial prompt page, copied per candidate
            if self.policy is not None:  # a question's group starts whole, or waits
                need = math.ceil(plen / page) + self.k * copy
                if len(free_slots) < self.k or need + running + len(fresh) > len(self.free):
                    break
                for _ in range(self.k):
                    req = self.queue.popleft()
                    slot = free_slots.pop(0)
                    fresh.append((slot, req))
                    self.slot_req[slot] = req
                    self.started += 1
                    self.slot_started[slot] = self.started
                new_q.append(q)
                self.questions[q] = _Question(self._take_pages(math.ceil(plen / page)),
                                              self.free_rows.pop(), pending=self.k,
                                              expected=self.k)  # fmt: skip
                self.rounds[q] = 0
                continue
            if req.saved is not None:
                later = need = math.ceil((plen + len(req.generated)) / page)
            elif q in self.questions or q in new_q:
                later = need = copy
            else:
                need, later = math.ceil(plen / page) + copy, copy
            # Keep a page for every running slot's next step: admitting a candidate must not
            # stall the ones already running (which would preempt it straight away).
            if need + promised + running + len(fresh) + len(resumed) > len(self.free):
                break
            promised += later
            (self.resumes if req.saved is not None else self.queue).popleft()
            slot = free_slots.pop(0)
            if req.saved is not None:
                resumed.append((slot, req))
            else:
                if q not in self.questions and q not in new_q:
                    new_q.append(q)
                    self.questions[q] = _Question(self._take_pages(math.ceil(plen / page)),
                                                  self.free_rows.pop(), pending=self.k,
                                                  expected=self.k)  # fmt: skip
                fresh.append((slot, req))
            self.slot_req[slot] = req
            self.started += 1
            self.slot_started[slot] = self.started
        if new_q:
            self._prefill_questions(new_q)
        if fresh:
            self._insert_fresh(fresh)
        for slot, req in resumed:
            self._insert_resumed(slot, req)

    def _run_prefill(self, seqs: list[list[int]], pages: list[list[int]]):
        """Prefills sequences into their pages; -> start fields [n, ...] (device)."""
        page = self.layout.page_size
        n = 1 << max(0, math.ceil(math.log2(len(seqs))))
        t = sampler.bucket_length(max(len(x) for x in seqs))
        tokens = np.full((n, t), self.opts.pad_id, np.int32)
        valid = np.zeros((n, t), bool)
        page_ids = np.full((n, t), -1, np.int32)
        offsets = np.zeros((n, t), np.int32)
        for i, (seq, pg) in enumerate(zip(seqs, pages, strict=True)):
            tokens[i, : len(seq)] = seq
            valid[i, : len(seq)] = True
            pos = np.arange(len(seq))
            page_ids[i, : len(seq)] = np.asarray(pg)[pos // page]
            offsets[i, : len(seq)] = pos % page
        valid[len(seqs) :, 0] = True  # padding rows: one token, written nowhere
        fn = _compiled(self.graphdef, "prefill", self.opts.step, impl=self.layout.impl)
        cache = self.state.cache
        k, v, starts = fn(self.model_state, self.weights, tokens, valid, page_ids, offsets,
                          cache.k, cache.v)  # fmt: skip
        self.state = self.state.replace(cache=cache.replace(k=k, v=v))
        self.stats.prefills += 1
        return starts

    def _prefill_questions(self, qs: list[int]) -> None:
        starts = self._run_prefill([self.prompts[q] for q in qs],
                                   [self.questions[q].pages for q in qs])  # fmt: skip
        qcap = 2 * self.layout.slots
        if self.table is None:
            self.table = {n: jnp.zeros((qcap,) + x.shape[1:], x.dtype) for n, x in starts.items()}
        rows = np.full(starts["prompt_len"].shape[0], qcap)
        rows[: len(qs)] = [self.questions[q].row for q in qs]
        self.table = _jit_put_starts(self.table, jnp.asarray(rows), starts)

    def _insert_fresh(self, fresh) -> None:
        lay, page = self.layout, self.layout.page_size
        s_count = lay.slots
        m = s_count
        slots = np.full(m, s_count, np.int32)
        q_rows = np.zeros(m, np.int32)
        keys = np.zeros((m, 2), np.uint32)
        limits = np.ones(m, np.int32)
        page_rows = np.zeros((m, lay.columns), np.int32)
        kv_len = np.zeros(m, np.int32)
        src = np.zeros(m, np.int32)
        dst = np.full(m, -1, np.int32)
        for i, (slot, req) in enumerate(fresh):
            qs = self.questions[req.question]
            qs.pending -= 1
            qs.running += 1
            plen = len(self.prompts[req.question])
            full = plen // page
            row = list(qs.pages[:full])
            self._share(row)
            if plen % page:  # the partial last page: a copy of its own
                own = self._take_pages(1)[0]
                src[i], dst[i] = qs.pages[full], own
                row.append(own)
            page_rows[i, : len(row)] = row
            slots[i], q_rows[i], kv_len[i] = slot, qs.row, plen
            self.slot_shared[slot] = True
            rid = req.question * self.k + req.candidate
            keys[i], limits[i] = self.keys[rid], self.limits[rid]
        fn = _compiled(self.graphdef, "insert", None)
        self.state = fn(self.state, jnp.asarray(slots), jnp.ones(m, bool), self.table,
                        jnp.asarray(q_rows), jnp.asarray(keys), jnp.asarray(limits), self.blank,
                        jnp.asarray(page_rows), jnp.asarray(kv_len), jnp.asarray(src),
                        jnp.asarray(dst))  # fmt: skip

    def _insert_resumed(self, slot: int, req: _Request) -> None:
        lay, page = self.layout, self.layout.page_size
        q = req.question
        seq = self.prompts[q] + req.generated.tolist()
        pages = self._take_pages(math.ceil(len(seq) / page))
        starts = self._run_prefill([seq], [pages])
        row = np.zeros((1, lay.columns), np.int32)
        row[0, : len(pages)] = pages
        self.questions[q].running += 1
        self.slot_shared[slot] = False
        rid = q * self.k + req.candidate
        fn = _compiled(self.graphdef, "insert", None)
        # The row's own key: the same as the seed's for a preempted candidate; a resumed one
        # goes on with the key its row had.
        self.state = fn(self.state, jnp.asarray([slot], jnp.int32), jnp.zeros(1, bool), starts,
                        jnp.zeros(1, jnp.int32), jnp.asarray(req.saved.keys),
                        jnp.asarray(self.limits[rid][None]), req.saved, jnp.asarray(row),
                        jnp.asarray([len(seq)], jnp.int32), jnp.zeros(1, jnp.int32),
                        jnp.full(1, -1, jnp.int32))  # fmt: skip
        req.saved = req.generated = None

    # -- harvesting --------------------------------------------------------------------------

    def _release(self, slot: int, kv_len: int, table_row: np.ndarray) -> None:
        page = self.layout.page_size
        self._give(table_row[: math.ceil(kv_len / page)])
        req = self.slot_req[slot]
        qs = self.questions[req.question]
        qs.running -= 1
        self.slot_req[slot] = None

    def _drop_question_if_idle(self, q: int) -> None:
        qs = self.questions[q]
        if qs.running == 0 and qs.pending == 0:
            self._give(qs.pages)
            if qs.row >= 0:
                self.free_rows.append(qs.row)
            qs.pages, qs.row = [], -1

    def _harvest(self, results, bar) -> bool:
        """Harvests finished candidates (in groups, at their barriers), preempts when out of
        pages. -> whether anything changed."""
        lay, page = self.layout, self.layout.page_size
        changed = False
        if self.policy is not None:
            finished, changed = self._barriers()
        st = self.state
        done, kv_len, table, length = jax.device_get(
            (st.done, st.cache.kv_len, st.cache.page_table, st.length)
        )
        if self.policy is None:
            finished = [s for s, r in enumerate(self.slot_req) if r is not None and done[s]]
        if finished:
            changed = True
            slots = np.full(lay.slots, lay.slots - 1, np.int32)
            slots[: len(finished)] = finished
            rows, mask = _compiled(self.graphdef, "take", None)(st, jnp.asarray(slots))
            rows, mask = jax.device_get((rows, mask))
            completed = []
            for i, s in enumerate(finished):
                req = self.slot_req[s]
                results.put(req.question, req.candidate, rows, mask, i)
                self._release(s, int(kv_len[s]), table[s])
                qs = self.questions[req.question]
                qs.finished += 1
                self._drop_question_if_idle(req.question)
                if self.keep_row is not None:
                    one = jax.tree.map(lambda x, i=i: x[i : i + 1] if x.ndim else x, rows)
                    self.stash.setdefault(req.question, {})[req.candidate] = one
                if qs.finished == qs.expected:
                    completed.append(req.question)
                    if self.keep_row is not None:
                        j = self.keep_row(req.question, results.question(req.question))
                        self.kept_rows[req.question] = (j, self.stash.pop(req.question)[j])
            bar.update_candidates(
                len(finished), completed, int(sum(rows.length[i] for i in range(len(finished))))
            )
            self._report_in_order(results, completed)
        active = ~done & np.array([r is not None for r in self.slot_req])
        need = int(np.sum(active & (kv_len % page == 0)))
        while need > len(self.free):  # out of pages: preempt the newest
            if self.policy is not None:  # plan_layout sized the pool so that it never runs out
                raise RuntimeError("engine: a group's pages ran out (an internal error)")
            changed = True
            s = max((s for s, r in enumerate(self.slot_req) if r is not None),
                    key=lambda s: self.slot_started[s])  # fmt: skip
            self._preempt(s, int(kv_len[s]), table[s])
            if active[s] and kv_len[s] % page == 0:
                need -= 1
        self._count_pages(kv_len, table)
        self.max_remaining = max(
            (self.limits[r.question * self.k + r.candidate]
             - (int(kv_len[s]) - len(self.prompts[r.question])))
            for s, r in enumerate(self.slot_req) if r is not None
        ) if any(r is not None for r in self.slot_req) else 0  # fmt: skip
        # The tokens of the candidates still decoding (in a slot, or preempted and waiting):
        # with the harvested ones, every token decoded so far (`_ProgressBar.set_postfix`).
        in_flight = sum(int(length[s]) for s, r in enumerate(self.slot_req) if r is not None)
        in_flight += sum(len(r.generated) for r in self.resumes if r.generated is not None)
        bar.set_postfix(self.stats, lay.pages - len(self.free), in_flight)
        return changed

    # -- groups (beam search, pruning) ------------------------------------------------------

    def _group_args(self):
        """The segment's group arguments: [S] int32 each slot's group (its question's first
        slot; -1 outside groups), and how many groups at their barriers end the segment: half
        of them (a segment per barrier cost more host round trips than the waiting rows)."""
        ids = np.full(len(self.slot_req), -1, np.int32)
        if self.policy is None:
            return jnp.asarray(ids), jnp.int32(len(ids) + 1)
        first: dict[int, int] = {}
        for s, req in enumerate(self.slot_req):
            if req is not None:
                ids[s] = first.setdefault(req.question, s)
        return jnp.asarray(ids), jnp.int32(max(1, len(first) // 2))

    def _blocks(self, idle: int = 0) -> tuple | None:
        """The next segment's prompt blocks (`segment_kv.plan_blocks`), as device arrays
        (None: no working set). idle: those of `idle` slots all idle instead (`_precompile`)."""
        lay = self.layout
        if not lay.working_set:
            return None
        slot_req = [None] * idle if idle else self.slot_req
        shared = [False] * idle if idle else self.slot_shared
        live = {r.question for r in slot_req if r is not None}
        arrays = segment_kv.plan_blocks(
            [None if r is None else r.question for r in slot_req], shared,
            {q: self.questions[q].pages for q in live},
            {q: len(self.prompts[q]) for q in live},
            slots=len(slot_req), rows=lay.block_rows, prompt_columns=lay.prompt_columns,
        )  # fmt: skip
        return tuple(jnp.asarray(a) for a in arrays)

    def _barriers(self) -> tuple[list[int], bool]:
        """Every group whose slots are all paused or finished passes a barrier: the policy
        decides (`GroupPolicy.at_barrier`), the rows move, finish or go on. -> (slots to
        harvest: a finished group's, and with `policy.keep_done` False any finished row; whether
        anything changed)."""
        done, paused = jax.device_get((self.state.done, self.state.paused))
        groups: dict[int, list[int]] = {}
        for s, req in enumerate(self.slot_req):
            if req is not None:
                groups.setdefault(req.question, []).append(s)
        changed, at = False, []
        for q, slots in groups.items():
            if not all(done[s] or paused[s] for s in slots):
                continue
            changed = True
            if all(done[s] for s in slots):
                continue
            slots.sort(key=lambda s: self.slot_req[s].candidate)
            self.rounds[q] += 1
            at.append((q, slots))
        if at:
            self._pass_barriers(at)
        done = jax.device_get(self.state.done)
        harvest = []
        for slots in groups.values():
            if all(done[s] for s in slots) or not self.policy.keep_done:
                harvest += [s for s in slots if done[s]]
        return harvest, changed

    def _pass_barriers(self, at: list[tuple[int, list[int]]]) -> None:
        """Applies the policy's decisions to the groups `at` ((question, slots in candidate
        order) each; their slots are disjoint): one read of their rows, one device update."""
        page = self.layout.page_size
        size = len(self.slot_req)  # the slots now (they shrink for the tail)
        st = self.state
        order = np.full(size, size - 1, np.int32)  # the groups' slots, one after another
        n_all = sum(len(slots) for _, slots in at)
        order[:n_all] = [s for _, slots in at for s in slots]
        rows, _ = _compiled(self.graphdef, "take", None)(st, jnp.asarray(order))
        # Sliced on the host: a slice of a device array compiles per length.
        views = jax.tree.map(lambda x: x[:n_all], jax.device_get(
            (rows.done, rows.finish, rows.running, rows.keys)))  # fmt: skip
        kv_len, table = jax.device_get((st.cache.kv_len, st.cache.page_table))
        dst = np.full(size, size, np.int32)  # S: padding
        src = np.zeros(size, np.int32)
        keys = np.zeros((size, 2), np.uint32)
        prune = np.zeros(size, bool)
        moved = []  # (position, child's slot, parent's slot)
        start = 0
        for q, slots in at:
            n = len(slots)
            view = GroupView(*jax.tree.map(lambda x, a=start, n=n: x[a : a + n], views))
            act = self.policy.at_barrier(q, self.rounds[q], view)
            source = np.arange(n) if act.source is None else np.asarray(act.source)
            parents = np.asarray(slots)[source]
            part = slice(start, start + n)
            dst[part], src[part] = slots, parents
            keys[part] = view.keys if act.keys is None else np.asarray(act.keys, np.uint32)
            prune[part] = False if act.prune is None else np.asarray(act.prune, bool)
            moved += [(start + i, slots[i], parents[i]) for i in range(n) if source[i] != i]
            start += n
        page_rows, new_len = table[order].copy(), kv_len[order].copy()
        copy_src = np.zeros(size, np.int32)
        copy_dst = np.full(size, -1, np.int32)
        # Children share their parent's full pages and copy its partial last one: the shares
        # first, then the replaced rows' pages go back, then the copies' pages are taken.
        for _, _, p in moved:
            self._share(table[p][: kv_len[p] // page])
        for _, c, _ in moved:
            self._give(table[c][: math.ceil(int(kv_len[c]) / page)])
        shared = list(self.slot_shared)
        for _, c, p in moved:
            self.slot_shared[c] = shared[p]
        for i, _, p in moved:
            full, row = kv_len[p] // page, table[p].copy()
            if kv_len[p] % page:
                row[full] = self._take_pages(1)[0]
                copy_src[i], copy_dst[i] = table[p][full], row[full]
            page_rows[i], new_len[i] = row, kv_len[p]
        self.state = _compiled(self.graphdef, "regroup", None)(
            self.state, jnp.asarray(dst), jnp.asarray(src), jnp.asarray(keys),
            jnp.asarray(prune), jnp.asarray(page_rows), jnp.asarray(new_len),
            jnp.asarray(copy_src), jnp.asarray(copy_dst),
        )  # fmt: skip

    def _count_pages(self, kv_len, table) -> None:
        """Pages held vs pages the live tokens fill (the distinct pages the live sequences'
        tokens are in, and the resident prompts' full pages): the pool's overhead, for
        `EngineStats`."""
        page = self.layout.page_size
        live = set()
        for q, qs in self.questions.items():
            live.update(qs.pages[: len(self.prompts[q]) // page])
        for s, req in enumerate(self.slot_req):
            if req is not None:
                live.update(table[s][: math.ceil(int(kv_len[s]) / page)].tolist())
        alive = len(live)
        held = self.layout.pages - len(self.free)
        if alive:
            self.stats.held_over_alive = max(self.stats.held_over_alive, held / alive)
            self.stats.held_sum += held
            self.stats.alive_sum += alive

    def _exit_settled(self) -> int:
        """How many settled slots end the next segment: one more than now while candidates
        wait for a slot; with the queue empty, as many as make the slots shrink (a finished
        candidate waits in its slot, frozen, until then). Groups: none (their barriers end
        segments; their slots free only there)."""
        size = len(self.slot_req)
        if self.policy is not None:
            return size + 1
        settled = sum(r is None for r in self.slot_req)
        if self.queue or self.resumes:
            # A batch of slots at a time: a segment per finished candidate cost more in host
            # round trips than the slots it refilled sooner (the demo's short candidates: a
            # segment per decode step).
            return min(settled + max(1, size // REFILL_FRACTION), size)
        paying = [n for n in slot_sizes(size) if n < size and self._shrink_pays(size, n)]
        return size - max(paying) if paying else size + 1

    def _fitting_sizes(self) -> list[int]:
        """In the tail (no candidate waits), the smaller slot counts that hold the live rows."""
        if self.queue or self.resumes:
            return []
        live = sum(r is not None for r in self.slot_req)
        return [n for n in slot_sizes(len(self.slot_req)) if live <= n < len(self.slot_req)]

    def _shrink_pays(self, size: int, to: int) -> bool:
        """Whether `to` slots instead of `size` save more (over the longest candidate's
        remaining tokens, and what the idle slots already cost earlier calls) than compiling
        the segment for `to` costs (`shrink_cost`)."""
        return self.clock.pays(size, to, self.max_remaining)

    def _maybe_shrink(self) -> bool:
        """With the queue empty, shrinks the slots to the smallest of `slot_sizes` that holds
        the live candidates and pays for its compilation (`_shrink_pays`): they move to the
        first rows of a smaller state (the pool stays), so the tail of long candidates does not
        pay for idle slots."""
        if self.queue or self.resumes:
            return False
        live = [s for s, r in enumerate(self.slot_req) if r is not None]
        now = len(self.slot_req)
        paying = [n for n in self._fitting_sizes() if self._shrink_pays(now, n)]
        if not live or not paying:
            return False
        size = min(paying)
        idle = next(s for s, r in enumerate(self.slot_req) if r is None)
        rows = live + [idle] * (size - len(live))
        pool = self.state.cache
        small = _compiled(self.graphdef, "compact", None)(
            self.state.replace(cache=pool.replace(k=(), v=())), jnp.asarray(rows)
        )
        self.state = small.replace(cache=small.cache.replace(k=pool.k, v=pool.v))
        pick = lambda xs: [xs[s] for s in live] + [xs[idle]] * (size - len(live))  # noqa: E731
        self.slot_req = pick(self.slot_req)
        self.slot_started = pick(self.slot_started)
        self.slot_shared = pick(self.slot_shared)
        self.stats.resizes += 1
        return True

    def _precompile(self, segment_fn) -> None:
        """Compiles the segment for each smaller slot count of `slot_sizes` not compiled yet
        (`EngineConfig.precompile`): a call on the idle state's first rows, which exits before
        its first step. The pool goes through the calls (donated) and back into the state."""
        size, lay = len(self.slot_req), self.layout
        todo = [n for n in slot_sizes(size) if n < size and not self.clock.compiled(n)]
        pool = self.state.cache
        k, v = pool.k, pool.v
        compact_fn = _compiled(self.graphdef, "compact", None)
        for n in tqdm(todo, desc="engine: compiling the tail's slot counts", unit="size",
                      disable=not self.progress or not todo, leave=False):  # fmt: skip
            small = compact_fn(self.state.replace(cache=pool.replace(k=(), v=())),
                               jnp.arange(n))  # fmt: skip
            out, _ = segment_fn(
                self.model_state, self.weights, small.replace(cache=small.cache.replace(k=k, v=v)),
                jnp.zeros(lay.pages, jnp.int32), jnp.int32(0), jnp.int32(0),
                jnp.full(n, -1, jnp.int32), jnp.int32(n + 1), self._blocks(idle=n),
            )  # fmt: skip
            k, v = out.cache.k, out.cache.v
            self.clock.mark_compiled(n)
        self.state = self.state.replace(cache=pool.replace(k=k, v=v))

    def _preempt(self, slot: int, kv_len: int, table_row) -> None:
        req = self.slot_req[slot]
        rows, _ = _compiled(self.graphdef, "take", None)(self.state, jnp.asarray([slot]))
        req.saved = rows
        length = int(rows.length[0])
        req.generated = np.asarray(rows.tokens[0, :length])
        self._release(slot, kv_len, table_row)
        self.state = _jit_vacate(self.state, jnp.asarray([slot], jnp.int32))
        self.resumes.appendleft(req)
        self.stats.preemptions += 1

    def _report_in_order(self, results, completed) -> None:
        """Questions go to `on_question` in prompt order (a pool file is then the same whatever
        the slots' schedule): each as soon as it and every one before it are complete."""
        self.completed |= set(completed)
        if self.on_question is None:
            return
        while self.next_done in self.completed:
            self.on_question(self.next_done, results.question(self.next_done))
            self.next_done += 1


class _Results:
    """Harvested candidates on the host, laid [B, k, ...] as `sampler.Candidates`."""

    def __init__(self, b, k, g, s_max, d, feature_dtype):
        self.tokens = np.zeros((b, k, g), np.int32)
        self.length = np.zeros((b, k), np.int32)
        self.finish = np.zeros((b, k), np.int32)
        self.logprob = np.zeros((b, k), np.float32)
        self.step_scores = np.zeros((b, k, s_max), np.float32)
        self.step_index = np.full((b, k, s_max), -1, np.int32)
        self.step_mask = np.zeros((b, k, s_max), bool)
        self.step_features = None  # [B, k, S, D] in the features' dtype, when kept
        if feature_dtype is not None:
            self.step_features = np.zeros((b, k, s_max, d), feature_dtype)

    def put(self, q, j, rows, mask, i) -> None:
        self.tokens[q, j] = rows.tokens[i]
        self.length[q, j] = rows.length[i]
        self.finish[q, j] = rows.finish[i]
        self.logprob[q, j] = rows.logprob[i]
        self.step_scores[q, j] = rows.step_scores[i]
        self.step_index[q, j] = rows.step_index[i]
        self.step_mask[q, j] = mask[i]
        if self.step_features is not None:
            self.step_features[q, j] = rows.step_features[i]

    def question(self, q) -> sampler.Candidates:
        """Question q's candidates as a B = 1 `Candidates`."""
        feats = None if self.step_features is None else self.step_features[q : q + 1]
        return sampler.Candidates(
            self.tokens[q : q + 1], self.length[q : q + 1], self.finish[q : q + 1],
            self.logprob[q : q + 1], self.step_scores[q : q + 1], self.step_index[q : q + 1],
            self.step_mask[q : q + 1], feats,
        )  # fmt: skip

    def candidates(self) -> sampler.Candidates:
        return sampler.Candidates(
            self.tokens, self.length, self.finish, self.logprob, self.step_scores,
            self.step_index, self.step_mask, self.step_features,
        )  # fmt: skip


class _ProgressBar:
    """Questions done, candidates done, tokens/s and slot occupancy (tqdm; off: no output)."""

    def __init__(self, enabled, questions, candidates):
        self.bar = None
        if enabled:
            self.bar = tqdm(total=questions, unit="question", desc="sampling")
        self.candidates, self.total, self.tokens = 0, candidates, 0
        self.t0 = time.perf_counter()

    def update_candidates(self, n, completed, tokens) -> None:
        self.candidates += n
        self.tokens += tokens
        if self.bar is not None and completed:
            self.bar.update(len(completed))

    def set_postfix(self, stats: EngineStats, pages_held: int, in_flight: int = 0) -> None:
        """in_flight: the tokens of the candidates not harvested yet. Tokens/s and occupancy
        count them: with finished candidates' tokens alone, the bar read 7-56% over the demo's
        evaluation pool's first 8 segments while its slots decoded 97.5-99.6% of their steps
        (bench/RESULTS.md); at the end both counts are `EngineStats.tokens`."""
        if self.bar is None:
            return
        secs = time.perf_counter() - self.t0
        tokens = self.tokens + in_flight
        occupancy = tokens / stats.slot_steps if stats.slot_steps else 0.0
        self.bar.set_postfix_str(
            f"candidates {self.candidates}/{self.total}, {tokens / max(secs, 1e-9):.0f} "
            f"tok/s, occupancy {occupancy:.0%}, pages {pages_held}"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def generate(
    model,
    prompts: list[list[int]],
    *,
    k: int = 1,
    params: SamplingParams,
    step: StepTokens,
    seeds: list[int] | int = 0,
    engine: EngineConfig | None = None,
    limits=None,
    pad_id: int | None = None,
    score_steps: bool = True,
    keep_features: bool = False,
    order=None,
    on_question=None,
    progress: bool = False,
    return_stats: bool = False,
    mesh=None,
    policy: GroupPolicy | None = None,
):
    """`sampler.generate` on the engine: k candidates per prompt -> `Candidates` [B, k, ...].

    engine: slots, page size, pool (`EngineConfig`). limits: [B, k] per-candidate length caps.
    order: the queue's question order (default: prompt order). on_question(q, Candidates of
    B = 1): called for each question once it and all before it (in prompt order) are done.
    policy: decode each question's k candidates as a group that pauses at every step boundary
    for the policy's decision (beam search, pruning). return_stats: also return the
    `EngineStats`. mesh: run on it (slots over its row axes, the
    pool's KV heads over 'tensor')."""
    eng = Engine(
        model, prompts, k=k, params=params, step=step, seeds=seeds,
        engine=engine or EngineConfig(), limits=limits, pad_id=pad_id, score_steps=score_steps,
        keep_features=keep_features, order=order, on_question=on_question, progress=progress,
        mesh=mesh, policy=policy,
    )  # fmt: skip
    cands, stats = eng.run()
    return (cands, stats) if return_stats else cands
