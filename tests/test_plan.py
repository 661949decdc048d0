"""Memory planner: hand-computed state and KV bytes for the released sizes' mesh presets, TPU
type parsing, refusal of a plan that cannot fit (by `plan` and by `train`), and the CLI."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import optax
import pytest
from config_files import config_module

from metastone_jax.main import main
from metastone_jax.planning.from_config import check_train_config, plan_config
from metastone_jax.planning.tpu import GIB, parse_tpu

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")

# Shapes from the HF config.json files (DeepSeek-R1-Distill-Qwen-1.5B/7B, QwQ-32B): vocab, d_model,
# layers, heads, kv heads, d_ff; all Qwen2 (q/k/v bias, untied LM head, head_dim 128).
ARCH = {
    "metastone-s1-1.5b": (151936, 1536, 28, 12, 2, 8960),
    "metastone-s1-7b": (152064, 3584, 28, 28, 4, 18944),
    "metastone-s1-32b": (152064, 5120, 64, 40, 8, 27648),
}
RELEASED = {  # mesh preset -> model
    "grpo-1.5b-v5e-8": "metastone-s1-1.5b",
    "grpo-7b-v5p-16": "metastone-s1-7b",
    "grpo-32b-v5p-64": "metastone-s1-32b",
}


MESHES = config_module("meshes")


@functools.cache
def _plan(preset: str):
    return plan_config(MESHES.get_config(preset))


def _hand(preset: str) -> dict[str, float]:
    """Per-device bytes by hand: the architecture's parameter count, fp32 master weights for the
    policy and the SPRM head (configs/train.py) spread over all fsdp*tensor devices (norms,
    replicated, are noise)."""
    v, d, n_layers, h, k, f = ARCH[RELEASED[preset]]
    hd = d // h
    attn = d * h * hd + h * hd + 2 * (d * k * hd + k * hd) + h * hd * d  # q,k,v (+bias), o
    layer = attn + 3 * d * f + 2 * d  # + SwiGLU (gate, up, down) + 2 RMSNorms
    policy = v * d + n_layers * layer + d + d * v  # embed, blocks, final norm, LM head
    sprm = 2 * d * d + 4 * d + 1  # Linear(D, 2D) + Linear(2D, 1)
    config = MESHES.get_config(preset)
    mesh = config.mesh
    shards = mesh.fsdp * mesh.tensor
    params = 4 * (policy + sprm) / shards
    # KV cache: k and v, L layers, kv heads over tensor, bf16: each candidate's own cache of
    # max_new_tokens slots and each prompt's once, shared by its k candidates; both over
    # data*fsdp (the presets' prompt counts divide it); prompt widths are powers of 2.
    dp = mesh.data * mesh.fsdp
    rows = config.data.batch_size * config.rl.k / dp
    own = rows * config.rl.max_new_tokens
    prefix = config.data.batch_size / dp * config.data.max_prompt_len
    kv = 2 * n_layers * (k / mesh.tensor) * hd * 2 * (own + prefix)
    return {
        "params": params,
        "reference params": params,  # GRPO's frozen copy for the KL
        "optimizer state": 2 * params,  # AdamW mu + nu, each in the parameter's dtype
        "gradients": 2 * params,  # grad_accum > 1: accumulator + one micro-batch's gradients
        "KV cache": kv,
    }


def test_adamw_moments_take_the_parameter_dtype():
    """The hand rule above (mu, nu in the param dtype: bf16 policy, fp32 SPRM head)."""
    state = jax.eval_shape(optax.adamw(1e-3).init, {"w": jax.ShapeDtypeStruct((4,), jnp.bfloat16)})
    assert state[0].mu["w"].dtype == jnp.bfloat16 and state[0].nu["w"].dtype == jnp.bfloat16


@pytest.mark.parametrize("preset", sorted(RELEASED))
def test_released_presets_match_a_hand_computation(preset):
    plan = _plan(preset)
    for name, expected in _hand(preset).items():
        got = plan.component(name).bytes
        assert abs(got - expected) <= 0.10 * expected, (preset, name, got / GIB, expected / GIB)


@pytest.mark.parametrize("preset", sorted(MESHES.PRESETS))
def test_every_mesh_preset_fits_its_slice(preset):
    plan = _plan(preset)
    assert plan.fits, (preset, plan.total / GIB, plan.hbm / GIB)
    assert plan.tpu.name == MESHES.PRESETS[preset]["tpu"]
    assert plan.remat == "full" and plan.rows_per_device == 1


def test_peak_is_resident_plus_the_larger_phase():
    plan = _plan("grpo-1.5b-v5e-8")
    parts = {c.name: c.bytes for c in plan.components}
    resident = parts["params"] + parts["reference params"] + parts["optimizer state"]
    step = parts["gradients"] + parts["activations"] + max(parts["layer work"], parts["logits"])
    rollout = parts["KV cache"] + parts["sampler work"] + parts["decode weights"]
    assert plan.total == resident + max(step, rollout)
    acts = plan.activations_by_remat
    assert acts["full"] < acts["dots_no_batch"] < acts["dots"] < acts["none"]


@pytest.mark.parametrize(
    "name, chips, hbm",
    [("v5e-8", 8, 16), ("v5litepod-16", 16, 16), ("v5p-16", 8, 95), ("v5p-64", 32, 95),
     ("v4-32", 16, 32), ("v6e-8", 8, 32)],
)  # fmt: skip
def test_tpu_types_count_chips(name, chips, hbm):
    tpu = parse_tpu(name)
    assert (tpu.chips, tpu.hbm_bytes) == (chips, hbm * GIB)


@pytest.mark.parametrize(
    "name, message",
    [("v5x-8", "expected GENERATION-COUNT"), ("v5e", "expected GENERATION-COUNT"),
     ("v5p-7", "TensorCores (2 per chip)"), ("v4-0", "TensorCores")],
)  # fmt: skip
def test_bad_tpu_types_are_named(name, message):
    with pytest.raises(ValueError, match=f"tpu {name!r}") as e:
        parse_tpu(name)
    assert message in str(e.value)


def test_a_plan_that_cannot_fit_is_refused_naming_the_shortfall():
    config = MESHES.get_config("grpo-32b-v5p-64")
    config.train.tpu = "v5e-8"
    config.mesh.update(fsdp=8, tensor=1)
    plan = plan_config(config)
    assert not plan.fits and plan.shortfall > 100 * GIB
    with pytest.raises(ValueError) as e:
        check_train_config(config)
    msg = str(e.value)
    assert f"short by {plan.shortfall / GIB:.2f} GiB" in msg
    assert "16.00 GiB" in msg and "Largest: KV cache" in msg and "Try" in msg


def test_train_refuses_before_building_or_allocating(tmp_path, monkeypatch):
    import metastone_jax.train.loop as loop

    def boom(*args, **kwargs):
        raise AssertionError("train went past the memory check")

    monkeypatch.setattr(loop, "make_mesh", boom)
    monkeypatch.setattr(loop.setup, "prepare", boom)
    config = MESHES.get_config("grpo-7b-v5p-16")
    config.train.tpu = "v5e-8"
    with pytest.raises(ValueError, match=r"does not fit: .* short by \d+\.\d\d GiB"):
        loop.train(config, str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_no_tpu_type_means_no_check():
    config = MESHES.get_config("grpo-7b-v5p-16")
    config.train.tpu = ""
    assert check_train_config(config) is None


def test_cli_prints_the_table(capsys):
    main(["metastone-jax", "plan", "--preset=grpo-1.5b-v5e-8"])
    out = capsys.readouterr().out
    for row in ("params", "optimizer state", "gradients", "activations", "logits", "KV cache"):
        assert f"\n  {row} " in out
    assert "mesh data:1,fsdp:4,tensor:2" in out and "FITS:" in out
    assert "activations + layer work by remat policy" in out and "none " in out


def test_cli_config_mesh_tpu_json_and_exit_status(capsys):
    args = ["metastone-jax", "plan", "--config=configs/train.py:grpo-1.5b", "--tpu=v5e-8",
            "--mesh=data:1,fsdp:8,tensor:1", "--config.data.grad_accum=8", "--json"]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 1  # the released recipe as is does not fit a v5e-8
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] is False and plan["shortfall_gib"] > 0
    assert plan["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and plan["chips"] == 8
    assert plan["total_bytes"] == plan["hbm_bytes"] + plan["shortfall_bytes"]


@pytest.mark.parametrize(
    "extra, message",
    [(["--tpu=v9-8"], "tpu 'v9-8': expected GENERATION-COUNT"),
     (["--tpu=v5p-64"], "on v5p-64 (32 chips)"),  # the preset's 8-chip mesh
     (["--mesh=data:1,fsdp:16,tensor:1"], "must equal the device count 8"),
     (["--mesh=fsdp=8"], "expected AXIS:SIZE pairs"),
     (["--sample_batch=3"], "3 rollout candidates cannot be laid over data*fsdp = 4")],
)  # fmt: skip
def test_cli_errors_are_one_line(extra, message):
    with pytest.raises(SystemExit) as e:
        main(["metastone-jax", "plan", "--preset=grpo-1.5b-v5e-8", *extra])
    text = str(e.value.code)
    assert message in text and "\n" not in text, text


def test_sample_overrides_size_the_kv_cache():
    config = MESHES.get_config("grpo-1.5b-v5e-8")
    plan = plan_config(config, sample_rows=64, sample_len=3072)  # prompt 1024 + 2048 new
    v, d, n_layers, h, k, f = ARCH["metastone-s1-1.5b"]
    own, prefix = (64 // 4) * 2048, (64 // config.rl.k // 4) * 1024  # 8 prompts; fsdp 4
    expected = 2 * n_layers * (k // 2) * (d // h) * 2 * (own + prefix)
    assert plan.component("KV cache").bytes == expected


@pytest.mark.parametrize("n_prompts", [4, 2, 3])  # prefix over data*fsdp, over data, replicated
def test_rollout_kv_cache_is_the_samplers_on_a_mesh(n_prompts, monkeypatch):
    """The planner's rollout KV cache against the per-device bytes of the sampler's own arrays
    on a data 2 x fsdp 2 x tensor 2 mesh, grown to the budget the way `run_decode` grows it."""
    from metastone_jax.config import ModelConfig
    from metastone_jax.model import create_model
    from metastone_jax.planning.memory import Workload, cache_sizes, own_slots, rollout_kv_bytes
    from metastone_jax.sample import sampler
    from metastone_jax.sample.processors import SamplingParams
    from metastone_jax.sharding import make_mesh
    from metastone_jax.sprm import StepTokens

    monkeypatch.setattr(sampler, "GROW_SLOTS", 4)
    sampler._jitted.cache_clear()
    cfg = ModelConfig(
        vocab_size=12, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_len=160,
        compute_dtype="float32", pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    prompts = [[2, 3, 4, 6], [3, 8, 9, 10, 2, 5, 6], [4, 6], [2, 6]][:n_prompts]
    k = 4 if n_prompts < 4 else 2  # candidates: a multiple of data*fsdp
    state, opts, _, _ = sampler.start(
        create_model(cfg, seed=0, mesh=mesh), prompts, k=k, mesh=mesh,
        params=SamplingParams(temperature=1.0, max_new_tokens=20),
        step=StepTokens(step_ids=(5,), think_open=6, think_close=7),
    )  # fmt: skip
    width = state.cache.prefix_valid.shape[1]  # the padded prompt width P
    w = Workload(kind="grpo", train_rows=8, seq_len=width + 20, prompts=n_prompts,
                 candidates=n_prompts * k, k=k, prompt_len=width, max_new=20)  # fmt: skip
    sizes = [state.cache.max_len]
    while sizes[-1] < opts.cache_len:
        sizes.append(sampler._next_cache_len(sizes[-1], opts.cache_len))
    assert sizes == cache_sizes(own_slots(cfg, w)) == [4, 8, 16, 20]
    with sampler._mesh_context(mesh):
        for size in sizes[1:]:
            state = sampler._grow(state, size)
    c = state.cache
    per_device = sum(
        x.addressable_shards[0].data.nbytes for x in c.k + c.v + c.prefix_k + c.prefix_v
    )
    assert per_device == rollout_kv_bytes(cfg, w, {"data": 2, "fsdp": 2, "tensor": 2})


@pytest.mark.parametrize(
    "kind, remat, mesh", [("grpo", "full", (1, 8, 1)), ("sft", "none", (1, 4, 2))]
)
def test_step_estimate_tracks_xla_memory_analysis(kind, remat, mesh):
    """The estimated step memory (gradients + activations + max(layer work, logits)) against
    XLA's own buffer assignment of the compiled step (CPU, fp32 compute, nothing allocated). A
    guard against the formulas drifting from the model code: within -25% / +40%."""
    from functools import partial

    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from metastone_jax.config import ModelConfig
    from metastone_jax.model import abstract_model
    from metastone_jax.planning.memory import Workload, build_plan
    from metastone_jax.planning.state_bytes import state_bytes
    from metastone_jax.planning.tpu import TpuType
    from metastone_jax.sharding import make_mesh, placement, sharded_abstract
    from metastone_jax.sprm import StepTokens
    from metastone_jax.train.state import (
        OptimConfig,
        init_train_state,
        make_optimizer,
        pure_params,
        state_shardings,
    )
    from metastone_jax.train.step import StepConfig, batch_sharding, train_step

    cfg = ModelConfig(
        vocab_size=4096, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=512,
        qkv_bias=True, param_dtype="float32", compute_dtype="float32", remat=remat,
    )  # fmt: skip
    shape = dict(zip(("data", "fsdp", "tensor"), mesh, strict=True))
    mesh = make_mesh(shape)
    rows, t = shape["data"] * shape["fsdp"], 256
    optim = OptimConfig(train_sprm=kind == "grpo")
    tx = make_optimizer(optim)
    model = abstract_model(cfg)
    init = partial(init_train_state, tx=tx, seed=0, with_ref=kind == "grpo")
    abstract = jax.eval_shape(init, pure_params(model))
    shardings = state_shardings(abstract, placement(nnx.state(model), mesh), mesh)

    def arr(*shape, dtype=jnp.int32):
        sharding = batch_sharding(mesh, 2 + len(shape))
        return jax.ShapeDtypeStruct((1, rows, *shape), dtype, sharding=sharding)

    batch = {"tokens": arr(t), "valid": arr(t, dtype=bool)}
    if kind == "sft":
        batch["loss_mask"] = arr(t, dtype=bool)
    else:
        f32 = jnp.float32
        batch.update(
            response_mask=arr(t, dtype=bool), response_start=arr(), advantages=arr(dtype=f32),
            labels=arr(dtype=f32), include=arr(dtype=bool), old_logp=arr(t - 1, dtype=f32),
            ref_logp=arr(t - 1, dtype=f32),
        )  # fmt: skip
    step_cfg = StepConfig(kind=kind, step=StepTokens((5,), 6, 7) if kind == "grpo" else None)
    fn = partial(train_step, graphdef=nnx.graphdef(model), cfg=step_cfg, tx=tx)
    out = (shardings, NamedSharding(mesh, PartitionSpec()))
    with jax.set_mesh(mesh):
        lowered = jax.jit(fn, donate_argnums=0, out_shardings=out).lower(
            sharded_abstract(abstract, shardings), batch
        )
    xla_temp = lowered.compile().memory_analysis().temp_size_in_bytes
    state = state_bytes(cfg, shape, optim, with_ref=kind == "grpo")
    work = Workload(kind=kind, train_rows=rows, seq_len=t)
    tpu = TpuType("cpu", "cpu", 8, 1 << 40)
    plan = build_plan(cfg, name="x", tpu=tpu, mesh_shape=shape, workload=work, state=state)
    estimate = plan.step_peak - plan.resident
    assert 0.75 * xla_temp <= estimate <= 1.4 * xla_temp, (estimate / xla_temp, plan.components)


def test_full_logits_that_cannot_fit_point_to_logits_chunk():
    """1.5B SFT rows of 9216 tokens on a v5e-8: the full [T, V] logits of one row (fp32 loss
    pieces) do not fit; the refusal names train.logits_chunk, and with chunks the plan fits."""
    config = config_module("train").get_config("sft-1.5b")
    config.train.tpu = "v5e-8"
    config.mesh.update(data=1, fsdp=8, tensor=1)
    config.model.remat = "full"
    config.data.update(batch_size=8, grad_accum=1)
    config.train.logits_chunk = 0
    full = plan_config(config)
    assert not full.fits and full.biggest.name == "logits"
    with pytest.raises(ValueError, match=r"Largest: logits .* Try train\.logits_chunk=1024"):
        check_train_config(config)
    config.train.logits_chunk = 1024
    chunked = plan_config(config)
    assert chunked.fits
    # One row per device, T 9216, V 151936 (vocab unsharded): full = T * V * (2 + 4 * 3) bytes;
    # chunks = 1024 * V * 4 * 3 + the fp32 head gradient (D / fsdp) * V * 4.
    v, d = 151936, 1536
    assert chunked.component("logits").bytes == 1024 * v * 12 + (d // 8) * v * 4
    assert full.component("logits").bytes == 9216 * v * 14


@pytest.mark.parametrize("mesh", [(2, 2, 2), (1, 8, 1)])
def test_rollout_estimate_tracks_xla_memory_analysis(mesh, monkeypatch):
    """The decode loop compiled on a mesh (CPU, fp32 compute): its temporaries are the weights
    gathered over fsdp (`decode weights`, within 10%), and the whole rollout estimate (KV cache
    + sampler work + decode weights) tracks the loop's state + temporaries within -25% / +40%."""
    import numpy as np

    from metastone_jax.config import ModelConfig
    from metastone_jax.model import create_model
    from metastone_jax.planning.memory import (
        Workload,
        decode_weights_bytes,
        rollout_kv_bytes,
        sampler_work_bytes,
    )
    from metastone_jax.planning.state_bytes import state_bytes
    from metastone_jax.sample import sampler
    from metastone_jax.sample.processors import SamplingParams
    from metastone_jax.sharding import make_mesh
    from metastone_jax.sprm import StepTokens
    from metastone_jax.train.state import OptimConfig

    sampler._jitted.cache_clear()
    cfg = ModelConfig(
        vocab_size=4096, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=512,
        max_len=512, compute_dtype="float32", pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    shape = dict(zip(("data", "fsdp", "tensor"), mesh, strict=True))
    mesh = make_mesh(shape)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, 4096, size=int(rng.integers(50, 120))).tolist() for _ in range(8)]
    g, k = 200, 8
    model = create_model(cfg, seed=0, mesh=mesh)
    state, opts, graphdef, params = sampler.start(
        model, prompts, k=k, mesh=mesh, params=SamplingParams(temperature=1.0, max_new_tokens=g),
        step=StepTokens((5,), 6, 7),
    )  # fmt: skip
    width = state.cache.prefix_valid.shape[1]
    with sampler._mesh_context(mesh):
        while state.cache.max_len < opts.cache_len:
            state = sampler._grow(state, sampler._next_cache_len(state.cache.max_len, g))
        analysis = (sampler._jitted(graphdef, "decode", opts).lower(params, state).compile()
                    .memory_analysis())  # fmt: skip
    state_device = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state))
    w = Workload(kind="grpo", train_rows=8, seq_len=width + g, prompts=8, candidates=8 * k, k=k,
                 prompt_len=width, max_new=g)  # fmt: skip
    weights = decode_weights_bytes(cfg, state_bytes(cfg, shape, OptimConfig(), with_ref=False),
                                   shape)  # fmt: skip
    temp = analysis.temp_size_in_bytes
    assert 0.9 * temp <= weights <= 1.1 * temp, (weights, temp)
    estimate = rollout_kv_bytes(cfg, w, shape) + sampler_work_bytes(cfg, w, shape) + weights
    xla = state_device + temp
    assert 0.75 * xla <= estimate <= 1.4 * xla, estimate / xla
