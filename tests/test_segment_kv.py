"""The XLA path's segment working set (attention/segment_kv.py): its attention against a dense
softmax over each row's keys, and its block layout."""

import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import fp32_reduction_tol

from metastone_jax.attention import segment_kv

K, G, HD, PAGE, N_PAGES, COLS = 2, 3, 8, 4, 40, 8
SCALE = HD**-0.5


def _pool(rng):
    k = rng.standard_normal((N_PAGES, K, HD, PAGE)).astype(np.float32)
    v = rng.standard_normal((N_PAGES, K, PAGE, HD)).astype(np.float32)
    return k, v


def _key(k_pool, v_pool, page, offset):
    """One token's (key [K, hd], value [K, hd]) in the XLA layout."""
    return k_pool[page, :, :, offset], v_pool[page, :, offset, :]


@pytest.mark.parametrize("rows_per_block", [1, 2, 4])
def test_attention_equals_a_dense_softmax_over_each_rows_keys(monkeypatch, rows_per_block):
    """Six rows of two questions (prompt 6 and 4 tokens), one row whose prompt is in pages of
    its own (a resumed candidate); each row's tokens before the segment in pages, then three
    chunks of the segment's tokens, the last one part full. Blocks of 1 (none), 2 and 4 rows."""
    monkeypatch.setattr(segment_kv, "TAIL_CHUNK", 4)
    rng = np.random.default_rng(0)
    k_pool, v_pool = _pool(rng)
    prompt_pages = {0: [0, 1], 1: [2]}  # question 0: 6 tokens (1 full page + 2), question 1: 4
    prompt_len = {0: 6, 1: 4}
    question = [0, 0, 1, 0, 1, 0]
    shared = [True, True, True, True, True, False]
    hist_len = np.array([6, 9, 13, 11, 4, 7], np.int32)
    table = np.zeros((6, COLS), np.int32)
    next_page = 3
    for s in range(6):
        q = question[s]
        full = prompt_len[q] // PAGE if shared[s] else 0
        table[s, :full] = prompt_pages[q][:full]
        own = -(-hist_len[s] // PAGE) - full
        table[s, full : full + own] = range(next_page, next_page + own)
        next_page += own
        rest = prompt_len[q] % PAGE
        if shared[s] and rest:  # the prompt's partial page, copied into the row's own
            k_pool[table[s, full], :, :, :rest] = k_pool[prompt_pages[q][full], :, :, :rest]
            v_pool[table[s, full], :, :rest] = v_pool[prompt_pages[q][full], :, :rest]
    steps, step, phase = 12, 9, 2  # chunks 0 and 1 full, chunk 2 holds steps 8 and 9
    blocks = segment_kv.plan_blocks(question, shared, prompt_pages, prompt_len, slots=6,
                                    rows=rows_per_block, prompt_columns=2)  # fmt: skip
    seg = segment_kv.build((jnp.asarray(k_pool),), (jnp.asarray(v_pool),),
                           jnp.asarray(hist_len), tuple(map(jnp.asarray, blocks)),
                           steps=steps)  # fmt: skip
    tail_k = rng.standard_normal((3, 6, K, HD, 4)).astype(np.float32)
    tail_v = rng.standard_normal((3, 6, K, 4, HD)).astype(np.float32)
    seg = seg.replace(tail_k=(tuple(map(jnp.asarray, tail_k)),),
                      tail_v=(tuple(map(jnp.asarray, tail_v)),), step=jnp.int32(step),
                      phase=phase)  # fmt: skip
    q = rng.standard_normal((6, K, G, HD)).astype(np.float32)
    got = np.asarray(segment_kv.attend(jnp.asarray(q), jnp.asarray(k_pool),
                                       jnp.asarray(v_pool), jnp.asarray(table), seg.layer(0),
                                       SCALE))  # fmt: skip
    if rows_per_block > 1:  # the shared rows read their prompt through blocks
        assert (blocks[4][:5] == [6, 6, 4, 6, 4]).all() and blocks[4][5] == 0
    for s in range(6):
        keys = []
        for pos in range(hist_len[s]):
            if shared[s] and pos < prompt_len[question[s]]:  # the question's prompt pages
                page = prompt_pages[question[s]][pos // PAGE]
            else:
                page = table[s, pos // PAGE]
            keys.append(_key(k_pool, v_pool, page, pos % PAGE))
        for t in range(step + 1):
            keys.append((tail_k[t // 4, s, :, :, t % 4], tail_v[t // 4, s, :, t % 4, :]))
        kk = np.stack([x[0] for x in keys], 1).astype(np.float64)  # [K, T, hd]
        vv = np.stack([x[1] for x in keys], 1).astype(np.float64)
        scores = np.einsum("kgh,kth->kgt", q[s].astype(np.float64), kk) * SCALE
        p = np.exp(scores - scores.max(-1, keepdims=True))
        want = np.einsum("kgt,kth->kgh", p / p.sum(-1, keepdims=True), vv)
        # fp32 sums of hd products per score, then of up to 23 weighted values per output
        tol = fp32_reduction_tol(HD + len(keys), np.abs(vv).max() * 4)
        np.testing.assert_allclose(got[s], want, rtol=0, atol=tol, err_msg=f"row {s}")


def test_blocks_hold_each_shared_row_once_and_overflow_to_the_pages():
    """Rows group by question in slot order, R per block; past the last block a row reads its
    prompt from its pages (page_from 0); idle and unshared rows are in no block."""
    question = [0, 1, 0, None, 2, 0, 1, 0, 0, 2]
    shared = [True, True, True, False, True, False, True, True, True, True]
    pages = {0: [5, 6], 1: [7], 2: [8, 9]}
    lens = {0: 7, 1: 3, 2: 8}
    rows = 2
    block_rows, block_pages, prefix_len, row_index, page_from = segment_kv.plan_blocks(
        question, shared, pages, lens, slots=10, rows=rows, prompt_columns=2
    )
    n_blocks = segment_kv.block_count(10, rows)
    assert block_rows.shape == (n_blocks, rows)
    seen = []
    for b in range(n_blocks):
        members = [int(s) for s in block_rows[b] if s < 10]
        if not members:
            assert prefix_len[b] == 0
            continue
        qs = {question[s] for s in members}
        assert len(qs) == 1  # one question per block
        (q,) = qs
        assert prefix_len[b] == lens[q] and list(block_pages[b, : len(pages[q])]) == pages[q]
        for i, s in enumerate(block_rows[b]):
            if s < 10:
                assert row_index[s] == b * rows + i and page_from[s] == lens[q]
        seen += members
    in_blocks = {s for s in range(10) if row_index[s] < n_blocks * rows}
    assert set(seen) == in_blocks and len(seen) == len(set(seen))
    assert in_blocks == {s for s in range(10) if shared[s] and question[s] is not None}
    for s in set(range(10)) - in_blocks:
        assert page_from[s] == 0

    # Too few blocks for one row per question: the rows past them read their pages.
    b_rows, _, _, r_index, p_from = segment_kv.plan_blocks(
        list(range(6)), [True] * 6, {q: [q] for q in range(6)}, {q: 3 for q in range(6)},
        slots=6, rows=4, prompt_columns=1,
    )  # fmt: skip
    assert b_rows.shape[0] == 3
    assert list(r_index < 12) == [True, True, True, False, False, False]
    assert list(p_from) == [3, 3, 3, 0, 0, 0]
