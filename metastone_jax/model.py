"""The MetaStone backbone (Qwen2/Llama) with an LM head and the SPRM head (sprm/head.py).

One forward returns logits [B,T,V] and the penultimate-layer features [B,T,D] (the raw output of
block L-1, i.e. the input of the last block), which the SPRM head scores. Block parameters are
stacked over a leading 'layers' axis in both execution modes, so checkpoints and conversion see
one layout: `scan_layers=True` runs them with `lax.scan` (compile time independent of depth),
`False` unrolls a Python loop over slices.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx, struct

from metastone_jax.attention.kv_cache import KVCache
from metastone_jax.config import ModelConfig
from metastone_jax.layers import (
    MLP,
    Attention,
    Linear,
    PagedLayer,
    RMSNorm,
    SegmentMask,
    attention_impl,
    normal_init,
    rope_cos_sin,
)
from metastone_jax.sharding import constrain, state_shardings
from metastone_jax.sprm.head import SPRMHead

REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@struct.dataclass
class ModelOutput:
    """logits [B,T,V] fp32 (None when the head was skipped); features [B,T,D] penultimate-layer
    output; cache or None; hidden [B,T,D] the final-normed last layer (the LM head's input)."""

    logits: jax.Array | None
    features: jax.Array
    cache: KVCache | None
    hidden: jax.Array | None = None


@struct.dataclass
class DecodeWeights:
    """The weights a CPU decode step reads, apart from the stacked ones (`Transformer.
    decode_weights`): layers, L per-layer block states whose Linear kernels are laid out-major
    in the compute dtype (`Linear.to_out_major`; graphdef, their module structure); head: the LM
    head out-major [V, D] (None: the tied embedding, already so); embed_bits: a 16-bit
    embedding as same-width integers (None: another width), because XLA:CPU gathers bf16 rows
    through an f32 copy of the whole table, which a decode loop holds (0.9 GiB at V=151,936)."""

    layers: tuple
    head: jax.Array | None
    embed_bits: jax.Array | None
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)


class Block(nnx.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dt = dict(param_dtype=cfg.param_jnp_dtype, compute_dtype=cfg.compute_jnp_dtype)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_eps, **dt)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.rms_eps, **dt)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(
        self, x, cos, sin, mask, k_cache=None, v_cache=None, write_index=None, prefix=None,
        paged=None,
    ):  # fmt: skip
        # The norms run on the sequence-sharded stream (the saved layer inputs); their outputs
        # are gathered along the sequence before the projections, whose weights are split over
        # 'tensor' by heads and MLP columns (Megatron-LM's sequence parallelism).
        h = constrain(self.attn_norm(x), ("batch", "length", "embed"))
        y, kv = self.attn(h, cos, sin, mask, k_cache, v_cache, write_index, prefix, paged)
        x = x + y
        x = x + self.mlp(constrain(self.mlp_norm(x), ("batch", "length", "embed")))
        return constrain(x, ("batch", "activation_length", "embed")), kv


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """One Block whose parameters carry a leading [L] axis (logical axis 'layers')."""
    blocks = [Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)]
    graphdef, _ = nnx.split(blocks[0])
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(b) for b in blocks])
    stacked = jax.tree.map(
        lambda v: v.replace(v.get_value(), axes=("layers", *v.axes)),
        stacked,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return nnx.merge(graphdef, stacked)


class Transformer(nnx.Module):
    """Embedding -> L blocks -> final norm -> LM head; the SPRM head reads penultimate features."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Param(
            normal_init(0.02)(rngs.params(), (cfg.vocab_size, cfg.d_model), cfg.param_jnp_dtype),
            axes=("vocab", "embed"),
        )
        self.blocks = _stacked_blocks(cfg, rngs)
        self.final_norm = RMSNorm(
            cfg.d_model,
            cfg.rms_eps,
            param_dtype=cfg.param_jnp_dtype,
            compute_dtype=cfg.compute_jnp_dtype,
        )
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else Linear(
                (cfg.d_model,), (cfg.vocab_size,), ("embed",), ("vocab",), rngs=rngs,
                param_dtype=cfg.param_jnp_dtype, compute_dtype=cfg.compute_jnp_dtype,
            )
        )  # fmt: skip
        self.sprm = SPRMHead(cfg.d_model, rngs=rngs) if cfg.sprm_head else None

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        *,
        valid: jax.Array | None = None,
        cache: KVCache | None = None,
        with_logits: bool = True,
        layers: tuple | None = None,
        segment_ids: jax.Array | None = None,
    ) -> ModelOutput:
        """tokens [B,T] int; valid [B,T] bool (False = padding); positions [B,T] (default: the
        count of valid tokens before each one, so left padding is handled). segment_ids [B,T]
        int (no cache): packed rows, several sequences per row (data/packing.py); a token
        attends to earlier tokens of its own segment only, 0 is padding, and positions default
        to each token's index within its segment. with_logits=False
        skips the LM head (losses that apply it in chunks read `hidden` and `head_kernel()`).
        layers: the blocks' parameters already split per layer (`layer_params()`), used with a
        cache instead of slicing the stacked ones here.

        With `cache`, the T tokens are written at slots [cache.index, cache.index + T) and attend
        to every valid earlier slot; the caller keeps cache.index + T <= cache.max_len.
        """
        cfg = self.cfg
        b, t = tokens.shape
        valid = jnp.ones((b, t), bool) if valid is None else valid.astype(bool)
        if segment_ids is not None and cache is not None:
            raise ValueError("Transformer: segment_ids (packed rows) are for cacheless forwards")
        if cache is None:
            slot_valid, q_slots, write_index, offset = valid, jnp.arange(t), None, 0
        else:
            slot_valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, cache.index))
            q_slots = cache.index + jnp.arange(t)
            write_index = cache.index
            offset = jnp.sum(cache.valid, axis=1, keepdims=True) + cache.prefix_lengths()
        if positions is None and segment_ids is not None:
            positions = segment_positions(segment_ids)
        elif positions is None:
            positions = offset + jnp.cumsum(valid, axis=1) - 1
            positions = jnp.maximum(positions, 0)
        if cache is None:
            mask = cacheless_mask(cfg, valid, segment_ids)
        else:
            k_slots = jnp.arange(slot_valid.shape[1])
            mask = (k_slots[None, None, :] <= q_slots[None, :, None]) & slot_valid[:, None, :]
        cos, sin = rope_cos_sin(positions, cfg)

        # FSDP gathers the table's embed axis before the lookup; vocab stays tensor-sharded.
        table = constrain(self.embed[...], ("vocab", None))
        x = jnp.take(table, tokens, axis=0).astype(cfg.compute_jnp_dtype)
        x = constrain(x, ("batch", "activation_length", "embed"))
        x, features, kv = self._run_blocks(x, cos, sin, mask, cache, write_index, layers)

        h = self.final_norm(x)
        logits = self.lm_logits(h) if with_logits else None
        new_cache = None
        if cache is not None:
            new_cache = cache.replace(
                k=tuple(kv[0]), v=tuple(kv[1]), valid=slot_valid, index=cache.index + t
            )
        return ModelOutput(logits=logits, features=features, cache=new_cache, hidden=h)

    def lm_logits(self, h: jax.Array) -> jax.Array:
        """The LM head on final-normed hidden states [B,T,D] -> fp32 logits [B,T,V]."""
        if self.lm_head is None:
            logits = jnp.einsum("btd,vd->btv", h, self.embed[...].astype(h.dtype))
        else:
            logits = self.lm_head(h)
        return constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))

    def head_kernel(self) -> jax.Array:
        """The LM head as a [D, V] kernel in the compute dtype (the tied embedding, transposed)."""
        dtype = self.cfg.compute_jnp_dtype
        if self.lm_head is None:
            return self.embed[...].astype(dtype).T
        return self.lm_head.kernel[...].astype(dtype)

    def layer_params(self) -> tuple:
        """The stacked blocks' parameters split into L per-layer states (copies).

        A decode loop that slices layer i out of the stacked [L, ...] weights in its body pays
        a copy of every weight matrix per step on XLA:CPU (the slice is not fused into the
        matmul, nor hoisted out of the loop: 13 ms of a 98 ms step in bench/sampler_bench.py);
        slicing once before the loop and passing these as `layers=` avoids it.
        """
        params = nnx.state(self.blocks)
        return tuple(jax.tree.map(lambda a, i=i: a[i], params) for i in range(self.cfg.n_layers))

    def decode_weights(self) -> DecodeWeights:
        """A per-layer, out-major copy of the blocks and the LM head for decoding on XLA:CPU
        (the engine's segment takes it as an argument, so the compiled decode holds no copy of
        the weights among its temporaries). One layer is converted at a time."""
        graphdef, params = nnx.split(self.blocks)
        block_graph, layers = None, []
        for i in range(self.cfg.n_layers):
            block = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], params))
            for _, module in nnx.iter_modules(block):
                if isinstance(module, Linear):
                    module.to_out_major()
            block_graph, state = nnx.split(block)
            layers.append(state)
        head = None
        if self.lm_head is not None:
            head = self.lm_head.kernel[...].astype(self.cfg.compute_jnp_dtype).T
        table, bits = self.embed[...], None
        if table.dtype.itemsize == 2 and jnp.issubdtype(table.dtype, jnp.floating):
            bits = jax.lax.bitcast_convert_type(table, jnp.uint16)
        return DecodeWeights(tuple(layers), head, bits, block_graph)

    def _run_blocks(self, x, cos, sin, mask, cache, write_index, layers=None):
        """Applies the L stacked blocks; returns (x, penultimate features, (k, v)): the updated
        per-layer caches (lists) with a cache, else the chunk's stacked [L,B,K,T,hd]."""
        cfg = self.cfg
        graphdef, params = nnx.split(self.blocks)
        last = cfg.n_layers - 1

        def layer(carry, xs, prefix=None):
            h, feat = carry
            p, k_c, v_c, i = xs
            feat = jnp.where(i == last, h, feat)
            h, kv = nnx.merge(graphdef, p)(h, cos, sin, mask, k_c, v_c, write_index, prefix)
            return (h, feat), kv

        if cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT[cfg.remat], prevent_cse=not cfg.scan_layers)
        if cache is not None:
            # Decode/prefill with a cache: layers unrolled so that each updates and reads its own
            # cache buffer in place (see attention/kv_cache.py).
            carry, ks, vs = (x, jnp.zeros_like(x)), [], []
            for i in range(cfg.n_layers):
                p = layers[i] if layers is not None else jax.tree.map(lambda a, i=i: a[i], params)
                prefix = None
                if cache.prefix_k is not None:
                    prefix = (cache.prefix_k[i], cache.prefix_v[i], cache.prefix_valid)
                carry, (k, v) = layer(carry, (p, cache.k[i], cache.v[i], i), prefix)
                ks.append(k)
                vs.append(v)
            return carry[0], carry[1], (ks, vs)
        xs = (params, None, None, jnp.arange(cfg.n_layers))
        carry = (x, jnp.zeros_like(x))
        if cfg.scan_layers:
            (x, feat), kv = jax.lax.scan(layer, carry, xs)
            return x, feat, kv
        kvs = []
        for i in range(cfg.n_layers):
            carry, kv = layer(carry, jax.tree.map(lambda a, i=i: a[i], xs))
            kvs.append(kv)
        kv = jax.tree.map(lambda *a: jnp.stack(a), *kvs)
        return carry[0], carry[1], kv

    def prefill_kv(self, tokens: jax.Array, valid: jax.Array,
                   weights: DecodeWeights | None = None):  # fmt: skip
        """A cacheless forward that also returns every layer's keys and values (for a paged
        cache). tokens, valid [B,T] (right-padded: position t of a row is its token t).
        weights: `decode_weights()`, read instead of the stacked ones (CPU).
        -> (hidden [B,T,D] final-normed, features [B,T,D], (k, v) each [L,B,K,T,hd])."""
        cfg = self.cfg
        valid = valid.astype(bool)
        positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
        mask = cacheless_mask(cfg, valid, None)
        cos, sin = rope_cos_sin(positions, cfg)
        x = constrain(self._embed_tokens(tokens, weights), ("batch", "length", "embed"))
        if weights is None:
            x, features, kv = self._run_blocks(x, cos, sin, mask, None, None)
            return self.final_norm(x), features, kv
        features, kvs = x, []
        for i in range(cfg.n_layers):
            if i == cfg.n_layers - 1:
                features = x
            x, kv = nnx.merge(weights.graphdef, weights.layers[i])(x, cos, sin, mask)
            kvs.append(kv)
        kv = jax.tree.map(lambda *a: jnp.stack(a), *kvs)
        return self.final_norm(x), features, kv

    def _embed_tokens(self, tokens: jax.Array, weights: DecodeWeights | None) -> jax.Array:
        """The embedding rows of tokens [B,T] in the compute dtype (with `weights`, gathered
        from its integer view of a 16-bit table: no f32 copy of the table on XLA:CPU)."""
        if weights is not None and weights.embed_bits is not None:
            x = jax.lax.bitcast_convert_type(jnp.take(weights.embed_bits, tokens, axis=0),
                                             self.embed.dtype)  # fmt: skip
        else:
            x = jnp.take(constrain(self.embed[...], ("vocab", None)), tokens, axis=0)
        return x.astype(self.cfg.compute_jnp_dtype)

    def decode_logits(self, h: jax.Array, weights: DecodeWeights | None = None) -> jax.Array:
        """`lm_logits` of final-normed h [B,D] -> [B,V] f32; with `weights`, from its
        out-major head (no f32 copy of a bf16 head on XLA:CPU), rounded to the compute dtype as
        `lm_logits` rounds them."""
        if weights is None or weights.head is None:
            return self.lm_logits(h[:, None])[:, 0]
        logits = jax.lax.dot_general(
            h.astype(weights.head.dtype), weights.head, (((1,), (1,)), ((), ())),
            preferred_element_type=jnp.float32,
        )  # fmt: skip
        return constrain(logits.astype(h.dtype).astype(jnp.float32), ("batch", "vocab"))

    def decode_paged(self, token: jax.Array, kv, active: jax.Array,
                     weights: DecodeWeights | None = None):  # fmt: skip
        """One decode step over a paged cache (attention/paged.py `PagedKV`, S rows).

        token [S] int; active [S] bool (inactive rows write nothing and keep their length).
        Each active row's token goes to position kv.kv_len (its rotary position), in the page
        the row's page table lists there, which the caller has assigned.
        -> (logits [S,V] f32, features [S,D], the updated kv)."""
        cfg = self.cfg
        page = kv.page_size
        pos = kv.kv_len
        col = jnp.minimum(pos // page, kv.page_table.shape[1] - 1)
        write_page = jnp.where(active, jnp.take_along_axis(kv.page_table, col[:, None], 1)[:, 0],
                               -1)  # fmt: skip
        cos, sin = rope_cos_sin(pos[:, None], cfg)
        x = constrain(self._embed_tokens(token[:, None], weights), ("batch", "length", "embed"))
        graphdef, params = nnx.split(self.blocks)
        if weights is not None:
            graphdef = weights.graphdef
        feat = jnp.zeros_like(x)
        ks, vs, tails_k, tails_v = [], [], [], []
        seg = kv.segment
        for i in range(cfg.n_layers):
            if i == cfg.n_layers - 1:
                feat = x
            if weights is not None:
                p = weights.layers[i]
            else:  # accelerators: the slice is read in place
                p = jax.tree.map(lambda a, i=i: a[i], params)
            layer = PagedLayer(kv.k[i], kv.v[i], kv.page_table, pos + 1, write_page, pos % page,
                               kv.impl, None if seg is None else seg.layer(i))  # fmt: skip
            x, written = nnx.merge(graphdef, p)(x, cos, sin, None, paged=layer)
            ks.append(written[0])
            vs.append(written[1])
            if seg is not None:
                tails_k.append(written[2])
                tails_v.append(written[3])
        h = self.final_norm(x)
        if seg is not None:
            seg = seg.replace(tail_k=tuple(tails_k), tail_v=tuple(tails_v), step=seg.step + 1)
        kv = kv.replace(k=tuple(ks), v=tuple(vs), kv_len=pos + active.astype(pos.dtype),
                        segment=seg)  # fmt: skip
        return self.decode_logits(h[:, 0], weights), feat[:, 0], kv

    def sprm_logits(
        self, features: jax.Array, *, dropout_rng: jax.Array | None = None
    ) -> jax.Array:
        """SPRM logits for penultimate features [..., D] -> [...]; score = sigmoid(logit)."""
        if self.sprm is None:
            raise ValueError("this model has no SPRM head (ModelConfig.sprm_head=False)")
        return self.sprm(features, dropout_rng=dropout_rng)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Each token's index within its segment (a run of equal ids along the row): [B,T] int."""
    t = segment_ids.shape[1]
    index = jnp.arange(t)
    change = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1
    )
    return index - jax.lax.cummax(jnp.where(change, index, 0), axis=1)


def cacheless_mask(cfg: ModelConfig, valid: jax.Array, segment_ids: jax.Array | None):
    """The mask of a forward without a cache: a `SegmentMask` for flash or splash attention
    (ModelConfig.attention), else the [B,T,T] bool array of the dense path. valid [B,T] bool;
    segment_ids [B,T] or None (one sequence per row)."""
    t = valid.shape[1]
    impl = attention_impl(cfg.attention, t)
    segments = valid.astype(jnp.int32)
    if segment_ids is not None:
        segments = jnp.where(valid, segment_ids.astype(jnp.int32), 0)
    if impl != "dense" and t > 1:
        return SegmentMask(segments, segments, impl)
    if segment_ids is not None:
        return SegmentMask(segments, segments, impl).dense()
    # One sequence per row: padding queries may see earlier valid keys (as HF's mask does).
    causal = jnp.arange(t)[None, None, :] <= jnp.arange(t)[None, :, None]
    return causal & valid[:, None, :]


def abstract_model(cfg: ModelConfig) -> Transformer:
    """The model with ShapeDtypeStructs in place of arrays (no allocation)."""
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def param_counts(model: Transformer) -> dict[str, int]:
    """Parameter counts by part of a (possibly abstract) model: total, backbone (embedding, blocks,
    final norm), lm_head (0 when tied) and sprm_head. Nothing is allocated."""

    def count(node):
        if node is None:
            return 0
        return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(node, nnx.Param)))

    lm_head, sprm, total = count(model.lm_head), count(model.sprm), count(model)
    return {"total": total, "backbone": total - lm_head - sprm, "lm_head": lm_head,
            "sprm_head": sprm}  # fmt: skip


def create_model(
    cfg: ModelConfig, *, seed: int = 0, mesh: jax.sharding.Mesh | None = None
) -> Transformer:
    """Initialises the model; with a mesh, every parameter is created directly in its sharding
    (a jitted init with out_shardings), never materialised whole on one device first."""
    if mesh is None:
        return Transformer(cfg, rngs=nnx.Rngs(seed))
    graphdef, abstract_state = nnx.split(abstract_model(cfg))
    shardings = state_shardings(abstract_state, mesh)

    @partial(jax.jit, out_shardings=shardings)
    def init():
        return nnx.state(Transformer(cfg, rngs=nnx.Rngs(seed)))

    return nnx.merge(graphdef, init())
