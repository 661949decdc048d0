"""The XLA path's dense working set for one decode segment (sample/engine.py `segment`).

On XLA:CPU a row's pages, gathered from the pool, are copied before the attention reads them:
the gather does not fuse into a reduction that reads each key once per query head
(bench/RESULTS.md, "The fixed-length gap"). So a segment keeps two dense copies beside the
pool, which it reads in place:

  - **the prompts, once per block of rows** (cascade attention): a question's rows are grouped
    into blocks of R, and each block's queries attend to their shared prompt in one matmul, as
    the static sampler's `KVCache.with_prefix` does. The prompts are gathered from their pages
    once, when the segment starts (they do not change in it).
  - **the tokens this segment decodes**, in chunks of TAIL_CHUNK columns: separate arrays (a
    slice of one wide array is copied too), and the segment is one decode loop per chunk
    (`phase`), each reading the chunks filled so far and no more (a `cond` that skips a chunk
    costs more than reading it: XLA:CPU runs a branch without its multi-threaded reductions).
    A step writes its token there and into its page (a scatter at the segment's end instead
    costs the segment's whole width however few steps it ran), and the chunks are dropped
    when the segment ends.

A row's pages are then read only for its tokens between the prompt and the segment's start. The
three parts are merged by their softmax statistics (max, sum, weighted values). The engine uses
this only when every candidate has a slot from the start (`engine.Layout.working_set`): with
a queue, segments end every few steps to refill slots, and the working set's fixed width then
costs more than the page copies it saves (bench/RESULTS.md).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from metastone_jax.attention import MASK_VALUE, paged
from metastone_jax.sharding import constrain

TAIL_CHUNK = 64  # tokens per dense chunk of the segment's own tokens
BLOCK_ROWS = 8  # most rows whose queries share one matmul over their prompt
BLOCK_SLACK = 2.0  # blocks per S / R (`block_count`)


@struct.dataclass
class SegmentKV:
    """One segment's dense copies (all layers, or one: `layer`). S rows, B blocks of R rows,
    C chunks of W = `chunk_width` tokens, Lp prompt slots.

    tail_k, tail_v: per layer a tuple of C arrays [S, K, hd, W] / [S, K, W, hd]; step: [] int32
    tokens decoded so far in the segment (phase, static: the chunk it writes, step // W);
    hist_len [S]: each row's tokens before it (in pages); page_from [S]: the first position a
    row reads from its pages (its prompt's length when a block reads the prompt, else 0).
    prefix_k, prefix_v: per layer [B, K, hd, Lp] / [B, K, Lp, hd] (None: no blocks);
    prefix_len [B]; block_rows [B, R] the blocks' rows (S: padding); row_index [S]: a row's place
    in the blocks flattened [B * R] (B * R: in none)."""

    tail_k: tuple
    tail_v: tuple
    step: jax.Array
    hist_len: jax.Array
    page_from: jax.Array
    prefix_k: tuple | None
    prefix_v: tuple | None
    prefix_len: jax.Array
    block_rows: jax.Array
    row_index: jax.Array
    phase: int = struct.field(pytree_node=False, default=0)

    def layer(self, i: int) -> SegmentKV:
        """Layer i's arrays (tail_k a tuple of chunks, prefix_k one array)."""
        return self.replace(
            tail_k=self.tail_k[i], tail_v=self.tail_v[i],
            prefix_k=None if self.prefix_k is None else self.prefix_k[i],
            prefix_v=None if self.prefix_v is None else self.prefix_v[i],
        )  # fmt: skip


def rows_per_block(k: int) -> int:
    """R for questions of k candidates: the largest power of two up to min(k, BLOCK_ROWS)
    (1: no blocks, every row reads its prompt from its pages)."""
    return 1 << int(math.log2(max(1, min(k, BLOCK_ROWS))))


def block_count(slots: int, rows: int) -> int:
    """B: a question with n rows takes ceil(n / R) blocks, so S / R blocks for full ones and up
    to one more per question; BLOCK_SLACK x S / R blocks, and rows past the last block read
    their prompt from their pages. Every block is computed, used or not."""
    return 0 if rows <= 1 else math.ceil(BLOCK_SLACK * slots / rows)


def chunk_width(steps: int) -> int:
    """W: TAIL_CHUNK tokens, or the whole segment when it is shorter."""
    return min(TAIL_CHUNK, steps)


def chunks(steps: int) -> int:
    """C: chunks of a segment of at most `steps` tokens."""
    return -(-steps // chunk_width(steps))


def plan_blocks(slot_question, slot_shared, prompt_pages, prompt_len, *, slots: int,
                rows: int, prompt_columns: int):  # fmt: skip
    """The host's block layout for a segment: each question's rows that list its prompt pages
    (`slot_shared`) in blocks of `rows`, in slot order, up to `block_count` blocks.

    slot_question [S] (None: idle); prompt_pages / prompt_len: per question, its prompt's pages
    (the partial last one included) and length. -> numpy (block_rows [B, R], block_pages
    [B, prompt_columns], prefix_len [B], row_index [S], page_from [S])."""
    n_blocks = block_count(slots, rows)
    block_rows = np.full((n_blocks, rows), slots, np.int32)
    block_pages = np.zeros((n_blocks, prompt_columns), np.int32)
    prefix_len = np.zeros(n_blocks, np.int32)
    row_index = np.full(slots, n_blocks * rows, np.int32)
    page_from = np.zeros(slots, np.int32)
    if not n_blocks:
        return block_rows, block_pages, prefix_len, row_index, page_from
    by_question: dict = {}
    for s, q in enumerate(slot_question):
        if q is not None and slot_shared[s]:
            by_question.setdefault(q, []).append(s)
    b = 0
    for q, members in by_question.items():
        pages = prompt_pages[q]
        for start in range(0, len(members), rows):
            if b == n_blocks:
                break
            part = members[start : start + rows]
            block_rows[b, : len(part)] = part
            block_pages[b, : len(pages)] = pages
            prefix_len[b] = prompt_len[q]
            row_index[part] = b * rows + np.arange(len(part))
            page_from[part] = prompt_len[q]
            b += 1
    return block_rows, block_pages, prefix_len, row_index, page_from


def build(k_pool, v_pool, kv_len, blocks, *, steps: int) -> SegmentKV:
    """The working set at a segment's start (inside its jit). k_pool, v_pool: L pool arrays
    (XLA layout); kv_len [S]; blocks: `plan_blocks`' arrays."""
    block_rows, block_pages, prefix_len, row_index, page_from = blocks
    s = kv_len.shape[0]
    _, kh, hd, page = k_pool[0].shape
    w, c = chunk_width(steps), chunks(steps)
    dtype = k_pool[0].dtype

    def rows(x):
        return constrain(x, ("batch", "kv_heads", None, None))

    tail_k = tuple(tuple(rows(jnp.zeros((s, kh, hd, w), dtype)) for _ in range(c))
                   for _ in k_pool)  # fmt: skip
    tail_v = tuple(tuple(rows(jnp.zeros((s, kh, w, hd), dtype)) for _ in range(c))
                   for _ in k_pool)  # fmt: skip
    prefix_k = prefix_v = None
    if block_rows.shape[0] and block_pages.shape[1]:
        n_blocks, cols = block_pages.shape

        def whole(x):
            return constrain(x, (None, "kv_heads", None, None))

        # [B, Wp, K, hd, page] -> [B, K, hd, Wp * page]; v [B, Wp, K, page, hd] -> [B, K, Lp, hd]
        prefix_k = tuple(
            whole(jnp.take(x, block_pages, axis=0).transpose(0, 2, 3, 1, 4)
                  .reshape(n_blocks, kh, hd, cols * page))
            for x in k_pool
        )  # fmt: skip
        prefix_v = tuple(
            whole(jnp.take(x, block_pages, axis=0).transpose(0, 2, 1, 3, 4)
                  .reshape(n_blocks, kh, cols * page, hd))
            for x in v_pool
        )  # fmt: skip
    return SegmentKV(
        tail_k=tail_k, tail_v=tail_v, step=jnp.zeros((), jnp.int32), hist_len=kv_len,
        page_from=page_from,
        prefix_k=prefix_k, prefix_v=prefix_v, prefix_len=prefix_len, block_rows=block_rows,
        row_index=row_index,
    )  # fmt: skip


def write(seg: SegmentKV, k_new, v_new) -> tuple[tuple, tuple]:
    """One layer's token [S, K, hd] (k, v) into its phase's chunk at column step % W (seg: a
    `layer` view). -> (tail_k, tail_v) chunks."""
    c, col = seg.phase, seg.step % seg.tail_k[0].shape[3]
    kc, vc = seg.tail_k[c], seg.tail_v[c]
    kc = jax.lax.dynamic_update_slice(kc, k_new[..., None].astype(kc.dtype), (0, 0, 0, col))
    vc = jax.lax.dynamic_update_slice(vc, v_new[:, :, None].astype(vc.dtype), (0, 0, col, 0))
    replace = lambda xs, x: xs[:c] + (x,) + xs[c + 1 :]  # noqa: E731
    return replace(seg.tail_k, kc), replace(seg.tail_v, vc)


def _merge(a, b):
    """Two partial softmaxes (max [..], sum [..], weighted values [.., hd]) as one."""
    top = jnp.maximum(a[0], b[0])
    da, db = jnp.exp(a[0] - top), jnp.exp(b[0] - top)
    return top, a[1] * da + b[1] * db, a[2] * da[..., None] + b[2] * db[..., None]


def _part(scores, values, dtype):
    """scores [N, K, G, T] (scaled, masked); values [N, K, T, hd] -> partial softmax."""
    top = jnp.max(scores, axis=-1)
    e = jnp.exp(scores - top[..., None])
    # Reductions over non-minor axes, as attention/kv_cache.py's dense decode.
    acc = jnp.sum(e.astype(dtype)[..., None] * values[:, :, None].astype(dtype), axis=3)
    return top, jnp.sum(e, axis=-1), acc.astype(jnp.float32)


def attend(q, k_pool, v_pool, page_table, seg: SegmentKV, scale: float):
    """Single-token attention over a row's prompt (its block's, or its pages), its pages from
    there to the segment's start, and the segment's chunks (seg: a `layer` view, written this
    step). q: [S, K, G, hd] (rotary applied); page_table [S, W]. -> [S, K, G, hd] f32."""
    n, kh, g, hd = q.shape
    qf = q.astype(jnp.float32)
    carry = (
        jnp.full((n, kh, g), MASK_VALUE, jnp.float32),
        jnp.zeros((n, kh, g), jnp.float32),
        jnp.zeros((n, kh, g, hd), jnp.float32),
    )
    if seg.prefix_k is not None:
        carry = _merge(carry, _prefix_part(qf, seg, scale, q.dtype))

    # The chunks of the segment so far: the earlier ones full, this phase's up to this step.
    for c in range(seg.phase + 1):
        # A barrier per chunk: XLA would otherwise share one broadcast of q between the chunks'
        # reductions, and write it out whole ([S, K, G, hd, W]) instead of fusing it into each.
        qc, kc = jax.lax.optimization_barrier((qf, seg.tail_k[c]))
        vc = seg.tail_v[c]
        scores = jnp.sum(qc[..., None] * kc.astype(jnp.float32)[:, :, None], axis=3) * scale
        if c == seg.phase:
            w = kc.shape[3]
            seen = jnp.arange(w) <= seg.step % w
            scores = jnp.where(seen, scores, MASK_VALUE)
        carry = _merge(carry, _part(scores, vc, q.dtype))

    # The pages between the prompt (or position 0) and the segment's start.
    _, total, acc = paged.attend_columns(q, k_pool, v_pool, page_table, seg.page_from,
                                         seg.hist_len, scale, carry)  # fmt: skip
    return acc / jnp.maximum(total, 1e-30)[..., None]


def _prefix_part(qf, seg: SegmentKV, scale: float, dtype):
    """Each block's queries against its prompt, one matmul per (block, KV head); -> the rows'
    partial softmaxes (rows in no block: empty)."""
    n, kh, g, hd = qf.shape
    n_blocks, r = seg.block_rows.shape
    qb = jnp.take(qf, seg.block_rows, axis=0, mode="clip")  # [B, R, K, G, hd]
    qb = qb.transpose(0, 2, 1, 3, 4).reshape(n_blocks, kh, r * g, hd)
    pk = seg.prefix_k.astype(jnp.float32)
    scores = jnp.einsum("bkqh,bkhs->bkqs", qb, pk) * scale  # [B, K, R*G, Lp]
    seen = jnp.arange(pk.shape[3])[None, :] < seg.prefix_len[:, None]
    scores = jnp.where(seen[:, None, None], scores, MASK_VALUE)
    top = jnp.max(scores, axis=-1)
    e = jnp.exp(scores - top[..., None])
    total = jnp.sum(e, axis=-1)
    acc = jnp.einsum("bkqs,bksh->bkqh", e.astype(dtype), seg.prefix_v.astype(dtype),
                     preferred_element_type=jnp.float32)  # fmt: skip

    def per_row(x):  # [B, K, R*G, ...] -> [S, K, G, ...]; a row in no block: `fill`
        tail = x.shape[3:]
        x = x.reshape((n_blocks, kh, r, g) + tail).transpose((0, 2, 1, 3) + tuple(
            range(4, 4 + len(tail))))  # fmt: skip
        x = x.reshape((n_blocks * r, kh, g) + tail)
        return jnp.take(x, seg.row_index, axis=0, mode="fill", fill_value=0)

    in_block = (seg.row_index < n_blocks * r)[:, None, None]
    return (
        jnp.where(in_block, per_row(top), MASK_VALUE),
        per_row(total),
        per_row(acc),
    )
