"""Transformer building blocks (Flax NNX): Linear, RMSNorm, rotary, GQA attention, SwiGLU.

Parameters carry their logical axes as `axes` metadata (see sharding.py). Weights are stored in
fp32 (or `param_dtype`) and cast to `compute_dtype` at use; norms, rotary and softmax run in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from metastone_jax.attention import MASK_VALUE, flash, segment_kv, splash
from metastone_jax.attention import paged as pg
from metastone_jax.config import ModelConfig, RopeScaling
from metastone_jax.sharding import constrain, sequence_sharded


def normal_init(std: float):
    return lambda key, shape, dtype: std * jax.random.normal(key, shape, dtype)


def uniform_init(bound: float):
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


class Linear(nnx.Module):
    """y = x . kernel (+ bias), contracting the trailing `len(in_shape)` dims of x.

    kernel: [*in_shape, *out_shape] with logical axes in_axes + out_axes; bias: [*out_shape].
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        in_axes: Sequence[str | None],
        out_axes: Sequence[str | None],
        *,
        rngs: nnx.Rngs,
        use_bias: bool = False,
        param_dtype=jnp.float32,
        compute_dtype=jnp.float32,
        kernel_init=None,  # default: normal(0.02), as HF initialises Qwen2/Llama
        bias_init=None,
    ):
        self.n_in = len(in_shape)
        self.compute_dtype = compute_dtype
        self.out_major = False  # kernel laid [*in, *out]; `to_out_major` flips it
        shape = (*in_shape, *out_shape)
        kernel_init = kernel_init or normal_init(0.02)
        self.kernel = nnx.Param(
            kernel_init(rngs.params(), shape, param_dtype), axes=(*in_axes, *out_axes)
        )
        if use_bias:
            value = (
                bias_init(rngs.params(), tuple(out_shape), param_dtype)
                if bias_init is not None
                else jnp.zeros(out_shape, param_dtype)
            )
            self.bias = nnx.Param(value, axes=tuple(out_axes))
        else:
            self.bias = None

    def to_out_major(self) -> None:
        """Lays the kernel [*out_shape, *in_shape] in the compute dtype, in place (a decode
        copy of the weights: `Transformer.decode_weights`). A decode step multiplies a few
        rows by every weight; on XLA:CPU that contracts 2x faster in bf16 against the weight's
        minor axis, with f32 accumulation and no f32 copy of the weight (bench/RESULTS.md)."""
        kernel = self.kernel[...].astype(self.compute_dtype)
        n_out = kernel.ndim - self.n_in
        order = (*range(self.n_in, kernel.ndim), *range(self.n_in))
        axes = getattr(self.kernel, "axes", None)
        axes = tuple(axes[i] for i in order) if axes else None
        self.kernel = nnx.Param(kernel.transpose(order), axes=axes)
        self.n_in, self.out_major = n_out, True  # n_in now counts the kernel's leading dims

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.out_major:
            return self._call_out_major(x)
        kernel = self.kernel[...].astype(self.compute_dtype)
        in_shape, out_shape = kernel.shape[: self.n_in], kernel.shape[self.n_in :]
        lead = x.shape[: x.ndim - self.n_in]
        if len(lead) > 1 and sequence_sharded():
            # Rows merged from a batch and a sequence sharded over different axes: GSPMD
            # cannot split such a reshape and gathers every row onto every device; a
            # dot_general keeps the lead dims apart.
            dims = (tuple(range(len(lead), x.ndim)), tuple(range(self.n_in)))
            y = jax.lax.dot_general(x.astype(self.compute_dtype), kernel, (dims, ((), ())))
            if self.bias is not None:
                y = y + self.bias[...].astype(self.compute_dtype)
            return y
        # One 2-D matmul [rows, in] x [in, out]: XLA:CPU's backward of a 3-D dot_general writes
        # transposed copies of the gradients (~20% of a train step, bench/RESULTS.md); the
        # reshapes merge dims whose sharding sits on the major one, so they move no data.
        rows = x.astype(self.compute_dtype).reshape(math.prod(lead), math.prod(in_shape))
        y = jnp.dot(rows, kernel.reshape(math.prod(in_shape), math.prod(out_shape)))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.compute_dtype).reshape(-1)
        return y.reshape(*lead, *out_shape)

    def _call_out_major(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]  # [*out, *in]
        out_shape, in_shape = kernel.shape[: self.n_in], kernel.shape[self.n_in :]
        lead = x.shape[: x.ndim - len(in_shape)]
        rows = x.astype(kernel.dtype).reshape(math.prod(lead), math.prod(in_shape))
        y = jax.lax.dot_general(
            rows, kernel.reshape(math.prod(out_shape), math.prod(in_shape)),
            (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
        ).astype(self.compute_dtype)  # fmt: skip
        if self.bias is not None:
            y = y + self.bias[...].astype(self.compute_dtype).reshape(-1)
        return y.reshape(*lead, *out_shape)


class RMSNorm(nnx.Module):
    """HF-style RMSNorm: normalise in fp32, scale, cast back to the compute dtype."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32, compute_dtype=jnp.float32):
        self.eps = eps
        self.compute_dtype = compute_dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), axes=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.scale[...].astype(jnp.float32) * x32).astype(self.compute_dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> jax.Array:
    """Inverse frequencies [hd/2], with Llama-3 frequency-dependent scaling when configured."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def rope_cos_sin(positions: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """positions [B, T] -> cos, sin [B, T, hd] (fp32), HF rotate-half layout."""
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, N, hd]: x * cos + rotate_half(x) * sin, computed in fp32."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


@struct.dataclass
class PagedLayer:
    """One layer's page pool and what a paged decode step reads and writes (attention/paged.py):
    k_pool, v_pool (layout by `impl`); page_table [B, W]; kv_len [B] tokens to attend (the new
    one included); write_page, write_offset [B] where the new token goes (page < 0: nowhere);
    segment: the XLA path's dense working set of the decode segment, this layer's view
    (attention/segment_kv.py `SegmentKV`; None: attend over the pages alone)."""

    k_pool: jax.Array
    v_pool: jax.Array
    page_table: jax.Array
    kv_len: jax.Array
    write_page: jax.Array
    write_offset: jax.Array
    impl: str = struct.field(pytree_node=False, default="xla")
    segment: Any = None


# Query block of the causal-blocked attention used without a cache (training, full forwards).
CAUSAL_BLOCK = 64
# "auto" attention off TPU: the flash path from this many tokens per row, the dense one below
# (bench/RESULTS.md "Long-sequence training": on CPU the dense path is faster for short rows,
# and its [B,H,T,T] work is small there).
FLASH_MIN_LENGTH = 2048


def attention_impl(setting: str, length: int) -> str:
    """The attention a cacheless forward of `length` tokens per row runs (ModelConfig.attention):
    "dense", "flash" or "splash". "splash" needs a TPU backend."""
    backend = jax.default_backend()
    if setting == "auto":
        if backend == "tpu":
            return "splash"
        return "flash" if length >= FLASH_MIN_LENGTH else "dense"
    if setting == "splash" and backend != "tpu":
        raise ValueError(
            f"ModelConfig.attention='splash' needs a TPU (the backend is {backend!r}); "
            "use 'flash' (the same memory in XLA) or 'auto'"
        )
    return setting


@struct.dataclass
class SegmentMask:
    """A cacheless forward's mask as segment ids, not a [B,T,S] array (flash and splash
    attention derive each block's mask): a query sees keys at earlier or equal slots of its
    own segment; segment 0 is padding. q [B,T], k [B,S] int32; queries are the last T slots."""

    q: jax.Array
    k: jax.Array
    impl: str = struct.field(pytree_node=False, default="flash")

    def dense(self) -> jax.Array:
        """The [B,T,S] bool mask it stands for."""
        t, s = self.q.shape[1], self.k.shape[1]
        causal = jnp.arange(s)[None, :] <= jnp.arange(t)[:, None] + (s - t)
        same = (self.q[:, :, None] == self.k[:, None, :]) & (self.k[:, None, :] != 0)
        return causal[None] & same


class Attention(nnx.Module):
    """Grouped-query attention with optional q/k/v bias and an optional KV cache."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, k, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        dt = dict(param_dtype=cfg.param_jnp_dtype, compute_dtype=cfg.compute_jnp_dtype)
        bias = cfg.qkv_bias
        self.q_proj = Linear(
            (d,), (h, hd), ("embed",), ("heads", "head_dim"), use_bias=bias, rngs=rngs, **dt
        )
        self.k_proj = Linear(
            (d,), (k, hd), ("embed",), ("kv_heads", "head_dim"), use_bias=bias, rngs=rngs, **dt
        )
        self.v_proj = Linear(
            (d,), (k, hd), ("embed",), ("kv_heads", "head_dim"), use_bias=bias, rngs=rngs, **dt
        )
        self.o_proj = Linear((h, hd), (d,), ("heads", "head_dim"), ("embed",), rngs=rngs, **dt)
        self.n_kv_heads = k
        self.scale = hd**-0.5

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array,
        k_cache: jax.Array | None = None,
        v_cache: jax.Array | None = None,
        write_index: jax.Array | None = None,
        prefix: tuple[jax.Array, jax.Array, jax.Array] | None = None,
        paged: PagedLayer | None = None,
    ):
        """x [B,T,D]; cos/sin [B,T,hd]; mask [B,T,S] bool (True = may attend), or without a
        cache a `SegmentMask` (flash or splash attention, no [B,T,S] array).

        With a cache (this layer's k_cache [B,K,hd,S], v_cache [B,K,S,hd]) the chunk's keys and
        values are written at slots [write_index, write_index+T) in place and attention runs
        over all S slots; without one S = T. Returns (y [B,T,D], the updated (k_cache,
        v_cache), or this chunk's (k, v) [B,K,T,hd] without a cache).

        prefix (decode only): (k [P,K,hd,Sp], v [P,K,Sp,hd], valid [P,Sp]) of P prompts, each
        shared by B/P consecutive rows, attended to before the cache (`KVCache.with_prefix`).

        paged (decode only, T = 1): this layer's page pool and the rows' pages
        (`PagedLayer`); the token is written into its page and attends over the row's pages
        (attention/paged.py). Returns (y, the updated (k_pool, v_pool), and with `paged.segment`
        its updated chunks (tail_k, tail_v)).
        """
        q = apply_rope(self.q_proj(x), cos, sin)  # [B,T,H,hd]
        k = apply_rope(self.k_proj(x), cos, sin)  # [B,T,K,hd]
        v = self.v_proj(x)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        b, t, h, hd = q.shape
        kh = self.n_kv_heads
        # KV-head-major layouts keep (b, k) as the leading batch dims of every contraction.
        q = q.reshape(b, t, kh, h // kh, hd).transpose(0, 2, 3, 1, 4)  # [B,K,G,T,hd]
        if paged is not None:
            return self._decode_paged(q, k, v, paged)
        k = k.transpose(0, 2, 1, 3)  # [B,K,T,hd]
        v = v.transpose(0, 2, 1, 3)
        if k_cache is not None:
            # Keys are cached transposed, [B,K,hd,S] (see attention/kv_cache.py), values [B,K,S,hd].
            k_t = k.transpose(0, 1, 3, 2).astype(k_cache.dtype)
            k = jax.lax.dynamic_update_slice(k_cache, k_t, (0, 0, 0, write_index))
            v = jax.lax.dynamic_update_slice(
                v_cache, v.astype(v_cache.dtype), (0, 0, write_index, 0)
            )
        if t == 1:  # decode: multiply-reduce over the cache (one pass over it, no transposes)
            qf, kf, vf = q[:, :, :, 0].astype(jnp.float32), k.astype(jnp.float32), v
            # Both reductions run over a non-minor axis (hd, then S): vectorised along the
            # minor one, 1.5-2x faster on CPU than reducing over a minor hd of 64.
            scores = jnp.sum(qf[:, :, :, :, None] * kf[:, :, None], axis=3)
            scores = jnp.where(mask[:, None], scores * self.scale, MASK_VALUE)  # [B,K,G,S]
            if prefix is None:
                probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
                out = jnp.sum(probs[..., None] * vf[:, :, None].astype(q.dtype), axis=3)
            else:
                out = self._decode_with_prefix(qf, scores, vf, prefix).astype(q.dtype)
            out = out[:, None].reshape(b, 1, h, hd)  # [B,K,G,hd] -> [B,1,H,hd]
        elif prefix is not None:
            raise ValueError("Attention: a shared prefix is read by single-token decode only")
        elif k_cache is not None:
            out = self._attend(q, k.transpose(0, 1, 3, 2), v, mask)
        elif isinstance(mask, SegmentMask):
            out = self._attend_segments(q, k, v, mask)
        elif k_cache is None and t > CAUSAL_BLOCK and t % CAUSAL_BLOCK == 0:
            out = self._attend_causal_blocks(q, k, v, mask)
        else:
            out = self._attend(q, k, v, mask)
        return self.o_proj(out), (k, v)

    def _decode_paged(self, q, k, v, paged: PagedLayer):
        """q [B,K,G,1,hd]; k, v [B,1,K,hd]: write the token, attend over the row's pages."""
        b, kh, g, _, hd = q.shape
        k_pool, v_pool = pg.write(paged.k_pool, paged.v_pool, k, v, paged.write_page[:, None],
                                  paged.write_offset[:, None], paged.impl)  # fmt: skip
        if paged.segment is None:
            out = pg.attend(q[:, :, :, 0], k_pool, v_pool, paged.page_table, paged.kv_len,
                            self.scale, paged.impl)  # fmt: skip
            written = (k_pool, v_pool)
        else:  # the token goes to its page and to the segment's chunk, read from there
            tail_k, tail_v = segment_kv.write(paged.segment, k[:, 0], v[:, 0])
            seg = paged.segment.replace(tail_k=tail_k, tail_v=tail_v)
            out = segment_kv.attend(q[:, :, :, 0], k_pool, v_pool, paged.page_table, seg,
                                    self.scale)  # fmt: skip
            written = (k_pool, v_pool, tail_k, tail_v)
        out = out.astype(q.dtype).reshape(b, 1, kh * g, hd)
        return self.o_proj(out), written

    def _decode_with_prefix(self, q, scores, v, prefix):
        """One softmax over a shared prefix and each row's own slots.

        q [B,K,G,hd] f32; scores [B,K,G,S] (own slots, scaled and masked); v [B,K,S,hd].
        The prefix part is one matmul per prompt over its rows' queries, [B/P*G, hd] x
        [hd, Sp], not B/P separate passes over copies of the prompt's keys."""
        pk, pv, pvalid = prefix
        b, kh, g, hd = q.shape
        n_prompts, j = pk.shape[0], b // pk.shape[0]

        def per_prompt(x):  # [B,K,G,d] -> [P,K,j*G,d]: one matmul per (prompt, KV head)
            return (
                x.reshape(n_prompts, j, kh, g, -1)
                .transpose(0, 2, 1, 3, 4)
                .reshape(n_prompts, kh, j * g, -1)
            )

        def per_row(x):  # the inverse
            return x.reshape(n_prompts, kh, j, g, -1).transpose(0, 2, 1, 3, 4).reshape(b, kh, g, -1)

        ps = per_row(jnp.einsum("pkqh,pkhs->pkqs", per_prompt(q), pk.astype(q.dtype)))
        pmask = jnp.repeat(pvalid, j, axis=0)[:, None, None, :]
        ps = jnp.where(pmask, ps * self.scale, MASK_VALUE)
        # softmax over [prefix ++ own] without concatenating them
        top = jnp.maximum(ps.max(-1, keepdims=True), scores.max(-1, keepdims=True))
        e_pre, e_own = jnp.exp(ps - top), jnp.exp(scores - top)
        total = e_pre.sum(-1, keepdims=True) + e_own.sum(-1, keepdims=True)
        own = jnp.sum((e_own / total)[..., None] * v[:, :, None].astype(q.dtype), axis=3)
        pre = jnp.einsum("pkqs,pksh->pkqh", per_prompt(e_pre / total), pv.astype(q.dtype))
        return own + per_row(pre)

    def _attend_segments(self, q, k, v, mask: SegmentMask):
        """Flash or splash attention, q [B,K,G,T,hd], k/v [B,K,S,hd] -> [B,T,H,hd]."""
        if mask.impl == "splash":
            out = splash.sharded_splash_attention(q, k, v, mask.q, mask.k, scale=self.scale)
        else:
            block = flash.DEFAULT_BLOCK  # read here, so tests can shrink it
            out = flash.flash_attention(q, k, v, mask.q, mask.k, scale=self.scale,
                                        block_q=block, block_k=block)  # fmt: skip
        b, kh, g, t, hd = out.shape  # [B,K,G,T,hd]
        return out.transpose(0, 3, 1, 2, 4).reshape(b, t, kh * g, hd)

    def _attend_causal_blocks(self, q, k, v, mask):
        """`_attend` without a cache, where the mask is causal: query block i never sees keys
        past its end, so each block attends to keys [0, end) only (~(n+1)/2n of the full T x T
        work). T a multiple of CAUSAL_BLOCK."""
        t = q.shape[3]
        return jnp.concatenate(
            [self._attend(q[:, :, :, s : s + CAUSAL_BLOCK], k[:, :, : s + CAUSAL_BLOCK],
                          v[:, :, : s + CAUSAL_BLOCK], mask[:, s : s + CAUSAL_BLOCK,
                          : s + CAUSAL_BLOCK])
             for s in range(0, t, CAUSAL_BLOCK)],
            axis=1,
        )  # fmt: skip

    def _attend(self, q, k, v, mask):
        """q [B,K,G,T,hd], k/v [B,K,S,hd], mask [B,T,S] -> [B,T,H,hd]."""
        b, _, _, t, hd = q.shape
        scores = jnp.einsum(
            "bkgth,bksh->bkgts", q, k.astype(q.dtype), preferred_element_type=jnp.float32
        )
        scores = jnp.where(mask[:, None, None], scores * self.scale, MASK_VALUE)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        out = jnp.einsum("bkgts,bksh->btkgh", probs, v.astype(q.dtype))
        return out.reshape(b, t, -1, hd)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.d_ff
        dt = dict(param_dtype=cfg.param_jnp_dtype, compute_dtype=cfg.compute_jnp_dtype)
        self.gate_proj = Linear((d,), (f,), ("embed",), ("mlp",), rngs=rngs, **dt)
        self.up_proj = Linear((d,), (f,), ("embed",), ("mlp",), rngs=rngs, **dt)
        self.down_proj = Linear((f,), (d,), ("mlp",), ("embed",), rngs=rngs, **dt)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(constrain(hidden, ("batch", "length", "mlp")))
