"""The paged KV pool's two attention paths against a dense reference: "xla" (attention/paged.py) and
"pallas" (attention/paged_tpu.py: jax's ragged paged attention TPU kernel, run here in Pallas' TPU
interpret mode on CPU). Both pools are filled from the same logical K/V through `write`."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import bf16_rounding_tol, fp32_reduction_tol

from metastone_jax.attention import paged, paged_tpu

K, G, HD, PAGE, P, W = 2, 2, 128, 16, 16, 4  # kv heads, q heads per kv head, head_dim, page,
# pages in the pool, page-table columns
# One partial page, exactly one full page, two full pages and one token, and a padding row
# (kv_len 0: only finite output asked).
KV_LEN = np.array([5, 16, 33, 0], np.int32)
N = len(KV_LEN)
GARBAGE = 30.0  # the pools start at +-30 so that an unmasked stale slot would dominate


def _setup(seed=0, hd=HD):
    rng = np.random.default_rng(seed)
    order = rng.permutation(P)
    table = rng.integers(0, P, (N, W)).astype(np.int32)  # columns past a row's pages: any id
    used = 0
    for n, length in enumerate(KV_LEN):
        own = -(-int(length) // PAGE)
        table[n, :own] = order[used : used + own]  # each row's pages its own
        used += own
    keys = rng.standard_normal((N, W * PAGE, K, hd)).astype(np.float32)
    vals = rng.standard_normal((N, W * PAGE, K, hd)).astype(np.float32)
    q = rng.standard_normal((N, K, G, hd)).astype(np.float32)
    return table, keys, vals, q


def _fill(impl, table, keys, vals, dtype):
    """Pools of `impl` at +-GARBAGE, then tokens [0, kv_len) written in two calls (a prompt of
    all but the last token, T = W * PAGE with padding; then the last, T = 1)."""
    k_shape, v_shape = paged.pool_shapes(impl, P, PAGE, K, keys.shape[-1])
    sign = np.where(np.arange(np.prod(k_shape)) % 2, 1.0, -1.0).reshape(k_shape)
    k_pool = jnp.asarray(GARBAGE * sign, dtype)
    v_pool = jnp.full(v_shape, -GARBAGE, dtype)
    t = np.arange(W * PAGE)
    pages = np.take_along_axis(table, np.broadcast_to(t // PAGE, (N, len(t))), axis=1)
    offsets = np.broadcast_to(t % PAGE, (N, len(t))).astype(np.int32)
    last = (KV_LEN - 1)[:, None]
    prompt = np.where(t[None] < last, pages, -1).astype(np.int32)  # -1: not written
    k_pool, v_pool = paged.write(k_pool, v_pool, keys, vals, prompt, offsets, impl)
    idx = np.maximum(last, 0)
    one = np.where(last >= 0, np.take_along_axis(pages, idx, 1), -1).astype(np.int32)
    k_pool, v_pool = paged.write(
        k_pool,
        v_pool,
        np.take_along_axis(keys, idx[:, :, None, None], 1),
        np.take_along_axis(vals, idx[:, :, None, None], 1),
        one,
        np.take_along_axis(offsets, idx, 1),
        impl,
    )
    return k_pool, v_pool


def _dense(q, keys, vals):
    """softmax(q.k * scale) v over each row's first kv_len tokens, float64. -> [N, K, G, hd]
    (the padding row: zeros)."""
    out = np.zeros(q.shape)
    for n, length in enumerate(KV_LEN[KV_LEN > 0]):
        s = np.einsum("kgd,tkd->kgt", q[n], keys[n, :length]) * q.shape[-1] ** -0.5
        p = np.exp(s - s.max(-1, keepdims=True))
        out[n] = np.einsum("kgt,tkd->kgd", p / p.sum(-1, keepdims=True), vals[n, :length])
    return out


def _tolerance(dtype, impl, vals, hd):
    """Bound on |attend - dense| over live rows (inputs already rounded to `dtype`)."""
    vmax = float(np.abs(vals).max())
    if dtype == jnp.float32:
        # fp32 sums: hd terms per score (scores ~ N(0, 1): the softmax turns a score error
        # into the same relative error of a probability), W*PAGE for the normaliser and W*PAGE
        # for the weighted sum of values, all of magnitude max|v| at the output.
        return fp32_reduction_tol(hd + 2 * W * PAGE, vmax)
    # bf16: scores and the softmax run in fp32 (errors as above, negligible). Roundings to bf16:
    # pallas: the output (the kernel returns q's dtype) and, on a TPU's bf16 matmul, the
    # probabilities; xla: the exponentials, their products with v and each page's sum of them
    # (XLA:CPU accumulates a bf16 sum in fp32 and rounds once), the running sum being fp32.
    n = 2 if impl == "pallas" else 3
    return bf16_rounding_tol(n, vmax)


@pytest.mark.parametrize(
    "dtype, hd",
    [(jnp.float32, 128), (jnp.bfloat16, 128), (jnp.float32, 64)],
    ids=["f32", "bf16", "f32-hd64"],  # hd 64: the pallas pool pads it to 128 lanes
)
def test_attend_matches_dense_for_both_impls(dtype, hd):
    table, keys, vals, q = _setup(hd=hd)
    # The reference sees the values each path stores: rounded to the pool's dtype.
    rk, rv, rq = (np.asarray(jnp.asarray(x, dtype), np.float64) for x in (keys, vals, q))
    want = _dense(rq, rk, rv)
    live = KV_LEN > 0
    errors = {}
    for impl in paged.ATTENTION_IMPLS:
        k_pool, v_pool = _fill(impl, table, keys, vals, dtype)
        with paged_tpu.interpret() if impl == "pallas" else contextlib.nullcontext():
            got = paged.attend(
                jnp.asarray(q, dtype),
                k_pool,
                v_pool,
                jnp.asarray(table),
                jnp.asarray(KV_LEN),
                hd**-0.5,
                impl,
            )
        got = np.asarray(got)
        assert got.shape == (N, K, G, hd) and got.dtype == np.float32
        assert np.isfinite(got).all(), impl  # the padding row too
        errors[impl] = float(np.abs(got[live] - want[live]).max())
        tol = _tolerance(dtype, impl, rv, hd)
        assert errors[impl] <= tol, (impl, errors[impl], tol)
    print(f"{jnp.dtype(dtype).name} hd {hd}: max |attend - dense| {errors}")


def test_write_places_tokens_where_the_page_table_says():
    """Read every slot back through the layout definitions; unwritten slots keep the garbage."""
    table, keys, vals, _ = _setup(seed=1)
    written = np.zeros((P, PAGE), bool)
    for n, length in enumerate(KV_LEN):
        for t in range(length):
            written[table[n, t // PAGE], t % PAGE] = True
    for impl in paged.ATTENTION_IMPLS:
        k_pool, v_pool = (np.asarray(x) for x in _fill(impl, table, keys, vals, jnp.float32))
        for n, length in enumerate(KV_LEN):
            for t in range(length):
                page, off = table[n, t // PAGE], t % PAGE
                if impl == "xla":  # k [P, K, hd, page], v [P, K, page, hd]
                    got_k, got_v = k_pool[page, :, :, off], v_pool[page, :, off, :]
                else:  # kv [P, page, 2K, hdp]: k at 2h, v at 2h + 1, zero lanes past HD
                    got_k, got_v = k_pool[page, off, 0::2, :HD], k_pool[page, off, 1::2, :HD]
                    assert not k_pool[page, off, :, HD:].any()
                np.testing.assert_array_equal(got_k, keys[n, t], err_msg=f"{impl} k {n} {t}")
                np.testing.assert_array_equal(got_v, vals[n, t], err_msg=f"{impl} v {n} {t}")
        slots = k_pool.transpose(0, 3, 1, 2) if impl == "xla" else k_pool  # [P, page, ...]
        assert (np.abs(slots[~written]) == GARBAGE).all(), impl  # padding tokens dropped


def test_pallas_shapes_it_cannot_serve_raise():
    k_pool = jnp.zeros(paged.pool_shapes("pallas", P, PAGE, 3, HD)[0], jnp.float32)
    q = jnp.zeros((1, 3, G, HD), jnp.float32)
    table, kv_len = jnp.zeros((1, W), jnp.int32), jnp.ones((1,), jnp.int32)
    with paged_tpu.interpret(), pytest.raises(ValueError, match="n_kv_heads=3"):
        paged.attend(q, k_pool, jnp.zeros((0,)), table, kv_len, 1.0, "pallas")
    if jax.default_backend() != "tpu":  # outside interpret(): the compiled kernel needs a TPU
        k_pool = jnp.zeros(paged.pool_shapes("pallas", P, PAGE, K, HD)[0], jnp.float32)
        with pytest.raises(RuntimeError, match="TPU kernel"):
            paged.attend(jnp.zeros((1, K, G, HD)), k_pool, None, table, kv_len, 1.0, "pallas")


def test_pallas_pool_pads_head_dim_to_lanes():
    k_shape, v_shape = paged.pool_shapes("pallas", P, PAGE, K, 64)
    assert k_shape == (P, PAGE, 2 * K, 128) and v_shape == (0,)


def test_the_engine_on_the_kernel_equals_the_engine_on_xla():
    """End to end in interpret mode: prefill into the kernel's layout, the partial prompt page
    copied per candidate, decode over pages through the kernel; greedy fp32, a few tokens."""
    from metastone_jax.config import ModelConfig
    from metastone_jax.model import create_model
    from metastone_jax.sample import engine
    from metastone_jax.sample.processors import SamplingParams
    from metastone_jax.sprm.steps import StepTokens

    cfg = ModelConfig(
        vocab_size=12, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_len=64,
        compute_dtype="float32", pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    model = create_model(cfg, seed=0)
    step = StepTokens(step_ids=(5,), think_open=6, think_close=7)
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    prompts = [[2, 3, 4, 6, 5, 8, 9, 10, 2, 5, 6, 4, 4, 2, 3, 8, 9, 6], [4, 6]]

    def run(impl):
        conf = engine.EngineConfig(slots=3, page_size=16, attention_impl=impl)
        return engine.generate(model, prompts, k=2, params=params, step=step, engine=conf)

    xla = run("xla")
    with paged_tpu.interpret():
        kernel = run("pallas")
    np.testing.assert_array_equal(kernel.tokens, xla.tokens)
    np.testing.assert_array_equal(kernel.length, xla.length)
    # The same sums in other orders (attention over <= 24 keys); 6 token log-probs add up.
    from tolerances import logit_bound, logprob_tol, transformer_terms

    tol = 6 * logprob_tol(transformer_terms(cfg, 24), cfg.vocab_size, logit_bound(model))
    np.testing.assert_allclose(kernel.logprob, xla.logprob, rtol=0, atol=tol)
