"""Logits match transformers' Qwen2ForCausalLM and LlamaForCausalLM (random tiny weights)."""

import numpy as np
import pytest
from hf_reference import copy_hf_weights, hf_logits, tiny_hf_model
from tolerances import fp32_reduction_tol, transformer_terms

from metastone_jax.config import ModelConfig
from metastone_jax.model import create_model

LLAMA3_ROPE = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
)

CASES = {
    "qwen2": dict(arch="qwen2"),
    "qwen2-tied": dict(arch="qwen2", tie=True),
    "llama": dict(arch="llama"),
    "llama3-rope-scaling": dict(arch="llama", rope_scaling=LLAMA3_ROPE),
}


def _ours(hf_model, **overrides):
    cfg = ModelConfig.from_hf_config(
        hf_model.config.to_dict(), param_dtype="float32", compute_dtype="float32", **overrides
    )
    model = create_model(cfg)
    copy_hf_weights(model, hf_model, cfg)
    return cfg, model


def logits_tol(cfg, seq_len: int, expected: np.ndarray) -> float:
    """XLA and torch add the same fp32 terms in their own orders; scale: max |logit|."""
    return fp32_reduction_tol(transformer_terms(cfg, seq_len), np.abs(expected).max())


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case):
    hf_model = tiny_hf_model(**CASES[case])
    cfg, model = _ours(hf_model)
    assert cfg.arch == CASES[case]["arch"]
    assert cfg.qkv_bias == (cfg.arch == "qwen2")
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 40))
    expected = hf_logits(hf_model, tokens)
    got = np.asarray(model(tokens).logits)
    tol = logits_tol(cfg, tokens.shape[1], expected)
    np.testing.assert_allclose(got, expected, rtol=0, atol=tol)


def test_scan_and_unrolled_layers_agree_with_transformers():
    hf_model = tiny_hf_model("qwen2", seed=1)
    tokens = np.random.default_rng(1).integers(0, 96, (2, 24))
    expected = hf_logits(hf_model, tokens)
    for scan in (True, False):
        for remat in ("none", "full"):
            cfg, model = _ours(hf_model, scan_layers=scan, remat=remat)
            got = np.asarray(model(tokens).logits)
            tol = logits_tol(cfg, tokens.shape[1], expected)
            np.testing.assert_allclose(got, expected, rtol=0, atol=tol)


def test_left_padded_batch_matches_transformers():
    hf_model = tiny_hf_model("qwen2", seed=2)
    cfg, model = _ours(hf_model)
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, cfg.vocab_size, (3, 20))
    mask = np.ones((3, 20), bool)
    mask[1, :5] = False
    mask[2, :11] = False
    # transformers derives positions from the attention mask the same way we do (cumsum - 1).
    expected = hf_logits(hf_model, tokens, mask)
    got = np.asarray(model(tokens, valid=mask).logits)
    tol = logits_tol(cfg, tokens.shape[1], expected[mask])
    np.testing.assert_allclose(got[mask], expected[mask], rtol=0, atol=tol)


def test_penultimate_features_are_input_of_last_block():
    """Our features equal HF's hidden_states[L-1]: the output of block L-1, before the last."""
    import torch

    hf_model = tiny_hf_model("llama", seed=3)
    cfg, model = _ours(hf_model)
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        hidden = hf_model(torch.from_numpy(tokens), output_hidden_states=True).hidden_states
    # hidden_states[0] is the embedding output, hidden_states[i] the output of block i.
    expected = hidden[cfg.n_layers - 1].numpy()
    # The residual stream after L - 1 blocks; scale: max |feature|.
    n_terms = transformer_terms(cfg, tokens.shape[1], n_layers=cfg.n_layers - 1, lm_head=False)
    tol = fp32_reduction_tol(n_terms, np.abs(expected).max())
    np.testing.assert_allclose(np.asarray(model(tokens).features), expected, rtol=0, atol=tol)
