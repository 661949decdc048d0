"""The real checkpoint in ../shared/fixtures/tiny-llama-bf16 (transformers 4.43, bf16, untied)."""

import os

import numpy as np
import pytest
import torch
import transformers
from test_convert import greedy_generate
from tolerances import fp32_reduction_tol, transformer_terms

from metastone_jax.checkpoint import load_params_checkpoint
from metastone_jax.convert.hf import hf_to_jax, jax_to_hf

# Char-level vocabulary (fixtures/README.md): 0 sep, 1 eos, 2 pad, 3 unk, 4-13 digits,
# 14 ',', 15 ':'.
PROMPTS = ["3,5:40,6", "12,7:99,5", "1,1:60,8"]


def encode(text: str) -> list[int]:
    return [{",": 14, ":": 15}[c] if c in ",:" else 4 + int(c) for c in text] + [0]


@pytest.fixture(scope="module")
def converted(shared_dir, tmp_path_factory):
    hf_dir = os.path.join(shared_dir, "fixtures", "tiny-llama-bf16")
    ckpt = str(tmp_path_factory.mktemp("fixture") / "ckpt")
    meta = hf_to_jax(hf_dir, ckpt, progress=False)
    return hf_dir, ckpt, meta


def reference(hf_dir, dtype):
    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.float().numpy()


def test_fixture_converts_with_bf16_params(converted):
    _, ckpt, meta = converted
    model, _ = load_params_checkpoint(ckpt)
    assert meta["source"]["dtype"] == "bfloat16"
    assert model.cfg.param_dtype == "bfloat16" and model.cfg.arch == "llama"
    assert model.embed[...].dtype == np.dtype("bfloat16")


def test_fixture_logits_match_transformers(converted):
    hf_dir, ckpt, _ = converted
    ref32, ref16 = reference(hf_dir, torch.float32), reference(hf_dir, torch.bfloat16)
    ours32, _ = load_params_checkpoint(ckpt, compute_dtype="float32")
    ours16, _ = load_params_checkpoint(ckpt, compute_dtype="bfloat16")
    for prompt in PROMPTS:
        ids = np.array([encode(prompt)])
        exact = logits(ref32, ids)  # bf16 weights upcast exactly: the fp32 ground truth
        # fp32 compute on the same (bf16-valued) weights: only summation order differs.
        tol = fp32_reduction_tol(transformer_terms(ours32.cfg, ids.shape[1]), np.abs(exact).max())
        np.testing.assert_allclose(np.asarray(ours32(ids).logits), exact, rtol=0, atol=tol)
        # bf16 compute rounds every matmul input and activation to 8 mantissa bits, so neither
        # side can match the ground truth better than bf16 allows. Bound: our bf16 error is no
        # worse than twice transformers' own bf16 error on the same input.
        ours_err = np.abs(np.asarray(ours16(ids).logits) - exact).max()
        theirs_err = np.abs(logits(ref16, ids) - exact).max()
        assert ours_err <= 2 * theirs_err, (ours_err, theirs_err)


def test_fixture_greedy_completion_matches_transformers(converted):
    hf_dir, ckpt, _ = converted
    ref = reference(hf_dir, torch.float32)
    ours, _ = load_params_checkpoint(ckpt, compute_dtype="float32")
    for prompt in PROMPTS:
        ids = np.array([encode(prompt)])
        with torch.no_grad():
            theirs = ref.generate(
                torch.from_numpy(ids), max_new_tokens=16, do_sample=False, pad_token_id=2
            )[0, ids.shape[1] :].tolist()
        # transformers stops after eos (id 1); compare the tokens it produced.
        assert greedy_generate(ours, ids, 16)[0, : len(theirs)].tolist() == theirs


def test_fixture_exports_back_bitwise(converted, tmp_path):
    from safetensors.numpy import load_file

    hf_dir, ckpt, _ = converted
    out = str(tmp_path / "back")
    jax_to_hf(ckpt, out, progress=False)
    before = load_file(os.path.join(hf_dir, "model.safetensors"))
    after = load_file(os.path.join(out, "model.safetensors"))
    assert sorted(before) == sorted(after)
    assert all(after[k].tobytes() == v.tobytes() for k, v in before.items())
    # The carried files come back: the custom tokenizer config and generation defaults.
    for name in ("tokenizer_config.json", "generation_config.json"):
        assert open(os.path.join(out, name)).read() == open(os.path.join(hf_dir, name)).read()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = np.array([encode(PROMPTS[0])])
    assert np.array_equal(logits(reloaded, ids), logits(reference(hf_dir, torch.float32), ids))
