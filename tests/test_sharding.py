"""Mesh, rules table and sharded initialisation on 8 simulated CPU devices."""

import jax
import numpy as np
import pytest
from flax import nnx
from tolerances import fp32_reduction_tol, transformer_terms

from metastone_jax.model import abstract_model, create_model
from metastone_jax.presets import get_preset
from metastone_jax.sharding import (
    bytes_per_device,
    logical_to_spec,
    make_mesh,
    maybe_initialize_distributed,
    resolve_mesh_shape,
)

CFG = get_preset("tiny")
MESH = {"data": 2, "fsdp": 2, "tensor": 2}


def test_sharded_forward_equals_single_device():
    assert jax.device_count() == 8
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (4, 24))
    single = create_model(CFG, seed=3)
    ref = single(tokens)

    mesh = make_mesh(MESH)
    sharded = create_model(CFG, seed=3, mesh=mesh)
    graphdef, state = nnx.split(sharded)

    @jax.jit
    def forward(state, tokens):
        out = nnx.merge(graphdef, state)(tokens)
        return out.logits, out.features

    with jax.set_mesh(mesh):
        logits, feats = forward(state, tokens)
    # Sharded matmuls add their partial sums in another order; features: L - 1 blocks.
    n_logit = transformer_terms(CFG, tokens.shape[1])
    n_feat = transformer_terms(CFG, tokens.shape[1], n_layers=CFG.n_layers - 1, lm_head=False)
    for got, want, n in ((logits, ref.logits, n_logit), (feats, ref.features, n_feat)):
        want = np.asarray(want)
        tol = fp32_reduction_tol(n, np.abs(want).max())  # scale: max |logit| / |feature|
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=tol)
    # The batch really is split over data x fsdp.
    assert len(logits.sharding.device_set) == 8
    assert logits.addressable_shards[0].data.shape[0] == 4 // 4


def test_packed_flash_gradients_on_2x2x2_with_sequence_sharding_equal_one_device(monkeypatch):
    """Flash attention over packed rows, remat'd blocks whose saved inputs are sharded along
    the sequence over 'tensor' (the 'activation_length' rule): the same loss and gradients as
    one device, and the saved residual stream per device is [L, b/4, T/2, D]."""
    from metastone_jax.attention import flash

    monkeypatch.setattr(flash, "DEFAULT_BLOCK", 16)
    cfg = CFG.replace(attention="flash", remat="full")
    rng = np.random.default_rng(1)
    b, t = 4, 48
    tokens = rng.integers(0, cfg.vocab_size, (b, t))
    segments = np.repeat(np.array([[1] * 20 + [2] * 17 + [3] * 7 + [0] * 4]), b, axis=0)
    weights = rng.normal(size=(b, t, cfg.vocab_size)) * (segments > 0)[..., None]

    def loss(state, graphdef):
        out = nnx.merge(graphdef, state)(tokens, valid=segments > 0, segment_ids=segments)
        return (out.logits * weights).sum()

    single = create_model(cfg, seed=3)
    g1, s1 = nnx.split(single)
    ref_loss, ref_grads = jax.value_and_grad(loss)(s1, g1)
    mesh = make_mesh(MESH)
    g8, s8 = nnx.split(create_model(cfg, seed=3, mesh=mesh))
    step = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    with jax.set_mesh(mesh):
        got_loss, got_grads = step(s8, g8)
        hlo = step.lower(s8, g8).compile().as_text()
    d, layers = cfg.d_model, cfg.n_layers
    assert f"f32[{layers},1,{t // 2},{d}]" in hlo  # the scan's saved inputs, sequence-sharded
    assert f"f32[{layers},1,{t},{d}]" not in hlo
    terms = 2 * transformer_terms(cfg, t) + tokens.size
    assert abs(float(got_loss) - float(ref_loss)) <= fp32_reduction_tol(terms, abs(float(ref_loss)))
    for (path, a), g in zip(jax.tree_util.tree_leaves_with_path(ref_grads),
                            jax.tree.leaves(got_grads), strict=True):  # fmt: skip
        a = np.asarray(a)
        tol = fp32_reduction_tol(terms, max(np.abs(a).max(), 1e-30))
        np.testing.assert_allclose(np.asarray(g), a, rtol=0, atol=tol,
                                   err_msg=jax.tree_util.keystr(path))  # fmt: skip


def test_parameters_are_created_sharded():
    mesh = make_mesh(MESH)
    model = create_model(CFG, mesh=mesh)
    q = model.blocks.attn.q_proj.kernel[...]  # [L, D, H, hd]: embed->fsdp, heads->tensor
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (
        CFG.n_layers,
        CFG.d_model // 2,
        CFG.n_heads // 2,
        CFG.head_dim,
    )
    emb = model.embed[...]
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert emb.addressable_shards[0].data.shape == (CFG.vocab_size // 2, CFG.d_model // 2)
    norm = model.final_norm.scale[...]
    assert norm.sharding.is_fully_replicated


def test_rules_map_each_mesh_axis_once():
    assert logical_to_spec(("batch", "length", "embed")) == jax.sharding.PartitionSpec(
        ("data", "fsdp"), None, None
    )
    assert logical_to_spec(("embed", "vocab")) == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_unknown_logical_axis_fails_loudly():
    with pytest.raises(ValueError, match="'nonsense' is not in the rules table"):
        logical_to_spec(("embed", "nonsense"), name="w")


def test_indivisible_parameter_dimension_names_parameter():
    with pytest.raises(
        ValueError, match=r"w: dimension 1 \(kv_heads, size 2\).*'tensor' \(size 4\)"
    ):
        logical_to_spec(
            ("embed", "kv_heads"), (64, 2), {"data": 1, "fsdp": 2, "tensor": 4}, name="w"
        )


@pytest.mark.parametrize(
    "shape, match",
    [
        (
            {"data": 3, "fsdp": 2, "tensor": 1},
            r"data\*fsdp\*tensor = 6 .* must equal the device count 8",
        ),
        ({"data": 3, "fsdp": -1, "tensor": 1}, r"mesh.fsdp: the other axes use 3 devices"),
        ({"data": 0, "fsdp": 8}, r"mesh.data: expected a positive size or -1, got 0"),
        ({"data": 2, "model": 4}, r"unknown axis \['model'\]"),
    ],
)
def test_bad_mesh_raises(shape, match):
    with pytest.raises(ValueError, match=match):
        make_mesh(shape)


def test_mesh_minus_one_takes_the_rest():
    assert resolve_mesh_shape({"data": 2, "fsdp": -1}, 8) == {"data": 2, "fsdp": 4, "tensor": 1}


def test_bytes_per_device_matches_hand_count():
    cfg = CFG.replace(sprm_head=False)
    state = nnx.state(abstract_model(cfg))
    d, f, v, h, k, hd, L = (
        cfg.d_model,
        cfg.d_ff,
        cfg.vocab_size,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.head_dim,
        cfg.n_layers,
    )
    total = (
        v * d * 2
        + d
        + L * (2 * d + d * h * hd * 2 + 2 * d * k * hd + h * hd + 2 * k * hd + 3 * d * f)
    )
    assert bytes_per_device(state, {"data": 1, "fsdp": 1, "tensor": 1}) == 4 * total
    # fsdp=2, tensor=2: matrices split 4 ways; biases (heads/kv_heads) 2 ways; norms replicated.
    sharded = (
        v * d * 2 // 4
        + d
        + L
        * (2 * d + (d * h * hd * 2 + 2 * d * k * hd + 3 * d * f) // 4 + (h * hd + 2 * k * hd) // 2)
    )
    assert bytes_per_device(state, {"data": 2, "fsdp": 2, "tensor": 2}) == 4 * sharded


def test_distributed_initialize_is_noop_on_one_process(monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
    assert maybe_initialize_distributed() is False
    assert jax.process_count() == 1


def test_hybrid_mesh_puts_only_the_data_axis_across_slices():
    from dataclasses import dataclass

    from metastone_jax.sharding import hybrid_device_grid

    @dataclass(frozen=True)
    class FakeDevice:  # what a multislice TPU device exposes: an id and its slice
        id: int
        slice_index: int

    # 2 slices x 8 devices, listed interleaved as a runtime might return them.
    devices = [FakeDevice(i, i % 2) for i in range(16)]
    grid = hybrid_device_grid(devices, (4, 2, 2))
    assert grid.shape == (4, 2, 2)
    slice_of = np.vectorize(lambda d: d.slice_index)(grid)
    # Rows 0-1 of the data axis live on slice 0, rows 2-3 on slice 1: fsdp/tensor groups never
    # cross a slice, the data axis does.
    assert (slice_of[:2] == 0).all() and (slice_of[2:] == 1).all()
    assert sorted(d.id for d in grid.ravel()) == list(range(16))
    assert hybrid_device_grid(devices[::2], (4, 2, 1)) is None  # one slice: the plain mesh
    with pytest.raises(ValueError, match="multiple of 2"):
        hybrid_device_grid(devices, (1, 8, 2))
