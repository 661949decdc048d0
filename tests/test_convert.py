"""HF <-> JAX conversion against transformers: logits, bitwise round trips, generation, sharding."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hf_reference import hf_logits, tiny_hf_model
from safetensors.numpy import load_file
from test_hf_parity import CASES
from tolerances import (
    bf16_rounding_tol,
    fp32_reduction_tol,
    transformer_bf16_roundings,
    transformer_terms,
)

from metastone_jax.attention.kv_cache import KVCache
from metastone_jax.checkpoint import load_params_checkpoint
from metastone_jax.convert.hf import hf_to_jax, jax_to_hf, load_hf_model
from metastone_jax.sharding import make_mesh


def save_hf(tmp_path, case, **kwargs):
    hf_model = tiny_hf_model(**CASES[case], **kwargs)
    path = str(tmp_path / f"hf-{case}")
    hf_model.save_pretrained(path)
    return hf_model, path


def all_tensors(hf_dir):
    out = {}
    for name in os.listdir(hf_dir):
        if name.endswith(".safetensors") and not name.startswith("score_module"):
            out.update(load_file(os.path.join(hf_dir, name)))
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_to_jax_logits_match_transformers(tmp_path, case):
    hf_model, hf_dir = save_hf(tmp_path, case)
    hf_to_jax(hf_dir, str(tmp_path / "ckpt"), progress=False)
    model, meta = load_params_checkpoint(str(tmp_path / "ckpt"), compute_dtype="float32")
    assert meta["source"]["dtype"] == "float32"
    tokens = np.random.default_rng(0).integers(0, 96, (2, 33))
    want = hf_logits(hf_model, tokens)
    # XLA and torch add the same fp32 terms in their own orders; scale: max |logit|.
    tol = fp32_reduction_tol(transformer_terms(model.cfg, tokens.shape[1]), np.abs(want).max())
    np.testing.assert_allclose(np.asarray(model(tokens).logits), want, rtol=0, atol=tol)


@pytest.mark.parametrize("case", ["qwen2", "llama3-rope-scaling", "qwen2-tied"])
def test_hf_to_jax_to_hf_is_bitwise_and_loads_in_transformers(tmp_path, case):
    hf_model, hf_dir = save_hf(tmp_path, case)
    hf_to_jax(hf_dir, str(tmp_path / "ckpt"), progress=False)
    out = str(tmp_path / "back")
    files = jax_to_hf(str(tmp_path / "ckpt"), out, max_shard_size="40KB", progress=False)
    assert files[0] == "model-00001-of-" + files[0].split("-of-")[1] and "score_module.pt" in files
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert set(index["weight_map"].values()) == {f for f in files if f.startswith("model-")}

    before, after = all_tensors(hf_dir), all_tensors(out)
    assert sorted(before) == sorted(after)
    for name, value in before.items():
        assert after[name].dtype == value.dtype and after[name].shape == value.shape, name
        assert after[name].tobytes() == value.tobytes(), name

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(hf_model)
    assert reloaded.config.tie_word_embeddings == hf_model.config.tie_word_embeddings
    tokens = np.random.default_rng(1).integers(0, 96, (1, 17))
    assert np.array_equal(hf_logits(reloaded, tokens), hf_logits(hf_model, tokens))


def test_bf16_checkpoint_restores_exactly_into_fp32_master_weights(tmp_path):
    """Training the released recipe restores the bf16 conversion with param_dtype=float32
    (configs/train.py, train/setup.py RUNTIME_FIELDS): every value is the bf16 value, exactly."""
    hf_model = tiny_hf_model("qwen2").to(torch.bfloat16)
    hf_dir = str(tmp_path / "hf")
    hf_model.save_pretrained(hf_dir)
    hf_to_jax(hf_dir, str(tmp_path / "ckpt"), progress=False)
    bf16, _ = load_params_checkpoint(str(tmp_path / "ckpt"))
    fp32, _ = load_params_checkpoint(str(tmp_path / "ckpt"), param_dtype="float32")
    assert bf16.embed[...].dtype == jnp.bfloat16 and fp32.cfg.param_dtype == "float32"
    emb = hf_model.model.embed_tokens.weight.detach().float().numpy()
    assert np.array_equal(np.asarray(fp32.embed[...]), emb)
    for a, b in zip(jax.tree.leaves(nnx.state(bf16)), jax.tree.leaves(nnx.state(fp32)),
                    strict=True):  # fmt: skip
        assert b.dtype == jnp.float32 and np.array_equal(np.asarray(a, np.float32), np.asarray(b))


def test_default_export_is_one_file_and_dtype_follows_the_source(tmp_path):
    hf_model = tiny_hf_model("llama").to(torch.bfloat16)
    hf_dir = str(tmp_path / "hf")
    hf_model.save_pretrained(hf_dir)
    hf_to_jax(hf_dir, str(tmp_path / "ckpt"), dtype="fp32", progress=False)
    model, meta = load_params_checkpoint(str(tmp_path / "ckpt"))
    assert model.embed[...].dtype == np.float32 and meta["source"]["dtype"] == "bfloat16"
    files = jax_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "back"), progress=False)
    assert files[0] == "model.safetensors"
    assert not os.path.exists(str(tmp_path / "back" / "model.safetensors.index.json"))
    before, after = all_tensors(hf_dir), all_tensors(str(tmp_path / "back"))
    # bf16 -> fp32 -> bf16 is exact, so the export is bitwise the original.
    assert all(
        after[k].tobytes() == v.tobytes() and after[k].dtype == v.dtype for k, v in before.items()
    )
    config = json.load(open(str(tmp_path / "back" / "config.json")))
    assert config["torch_dtype"] == "bfloat16"


def greedy_generate(model, prompt: np.ndarray, n: int) -> np.ndarray:
    """Greedy decoding with our KV cache: prefill the prompt, then one token per step."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, tokens, cache):
        out = nnx.merge(graphdef, state)(tokens, cache=cache)
        return out.logits[:, -1].argmax(-1), out.cache

    cache = KVCache.init(model.cfg, prompt.shape[0], prompt.shape[1] + n)
    token, cache = step(state, prompt, cache)
    generated = [token]
    for _ in range(n - 1):
        token, cache = step(state, token[:, None], cache)
        generated.append(token)
    return np.stack([np.asarray(t) for t in generated], axis=1)


@pytest.mark.parametrize("case", ["qwen2", "llama"])
def test_greedy_generation_matches_transformers_generate(tmp_path, case):
    hf_model, hf_dir = save_hf(tmp_path, case, seed=5)
    hf_to_jax(hf_dir, str(tmp_path / "ckpt"), progress=False)
    model, _ = load_params_checkpoint(str(tmp_path / "ckpt"), compute_dtype="float32")
    prompt = np.random.default_rng(5).integers(3, 96, (2, 7))
    ours = greedy_generate(model, prompt, 32)
    with torch.no_grad():
        theirs = hf_model.generate(
            torch.from_numpy(prompt),
            attention_mask=torch.ones_like(torch.from_numpy(prompt)),
            max_new_tokens=32,
            min_new_tokens=32,
            do_sample=False,
            pad_token_id=0,
        )[:, prompt.shape[1] :].numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_conversion_places_parameters_in_their_shardings(tmp_path):
    hf_model, hf_dir = save_hf(tmp_path, "qwen2")
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model, _ = load_hf_model(hf_dir, mesh=mesh, progress=False)
    q = model.blocks.attn.q_proj.kernel[...]  # [L, D, H, hd]: embed -> fsdp, heads -> tensor
    assert q.sharding.spec[1:3] == ("fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (3, 32, 2, 16)
    graphdef, state = nnx.split(model)
    tokens = np.random.default_rng(2).integers(0, 96, (4, 12))

    @jax.jit
    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens).logits

    with jax.set_mesh(mesh):
        logits = forward(state, tokens)
    # bf16 compute (the default) against fp32 transformers: the point is placement. Every
    # rounding to bf16 on the way to a logit adds <= 2^-8 relative; scale: max |logit|.
    want = hf_logits(hf_model, tokens)
    tol = bf16_rounding_tol(transformer_bf16_roundings(model.cfg), np.abs(want).max())
    np.testing.assert_allclose(np.asarray(logits), want, rtol=0, atol=tol)


def test_cli_round_trip(tmp_path, capsys):
    from metastone_jax.main import main

    _, hf_dir = save_hf(tmp_path, "llama")
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    main(["metastone-jax", "convert", "hf-to-jax", f"--hf_dir={hf_dir}", f"--out={ckpt}",
          "--mesh=data:1,fsdp:-1,tensor:2"])  # fmt: skip
    assert "SPRM head: initialised from seed 0" in capsys.readouterr().out
    main(["metastone-jax", "convert", "jax-to-hf", f"--ckpt={ckpt}", f"--out={out}",
          "--score_module=safetensors"])  # fmt: skip
    assert "score_module.safetensors" in capsys.readouterr().out
    assert transformers.AutoConfig.from_pretrained(out).num_hidden_layers == 3
    with pytest.raises(SystemExit, match="already exists"):
        main(["metastone-jax", "convert", "jax-to-hf", f"--ckpt={ckpt}", f"--out={out}"])


def test_sharded_and_fp16_checkpoints_read_back(tmp_path):
    hf_model = tiny_hf_model("qwen2", seed=7).to(torch.float16)
    hf_dir = str(tmp_path / "hf")
    hf_model.save_pretrained(hf_dir)
    hf_to_jax(hf_dir, str(tmp_path / "ckpt"), progress=False)
    model, meta = load_params_checkpoint(str(tmp_path / "ckpt"))
    assert meta["source"]["dtype"] == "float16" and model.cfg.param_dtype == "float32"
    sharded = str(tmp_path / "sharded")
    files = jax_to_hf(str(tmp_path / "ckpt"), sharded, max_shard_size="30KB", progress=False)
    assert len([f for f in files if f.startswith("model-")]) > 2
    # The sharded fp16 export reads back through the index to the same parameters.
    again, _ = load_hf_model(sharded, progress=False)
    for a, b in zip(
        jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(again)), strict=True
    ):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    before, after = all_tensors(hf_dir), all_tensors(sharded)
    assert all(
        after[k].dtype == np.float16 and after[k].tobytes() == v.tobytes()
        for k, v in before.items()
    )
