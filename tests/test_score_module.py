"""The released SPRM head file (score_module.pt / .safetensors) <-> our SPRM head."""

import os
import sys

import numpy as np
import pytest
import torch
from hf_reference import tiny_hf_model
from tolerances import fp32_reduction_tol, sprm_head_terms

from metastone_jax.checkpoint import load_params_checkpoint
from metastone_jax.convert.hf import hf_to_jax, jax_to_hf
from metastone_jax.sprm import score_module

D = 64  # tiny_hf_model's hidden size


def torch_head(seed: int, dtype=torch.float32) -> torch.nn.Sequential:
    """The released head's architecture, randomly initialised."""
    torch.manual_seed(seed)
    head = torch.nn.Sequential(
        torch.nn.Linear(D, 2 * D), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(2 * D, 1)
    )
    return head.to(dtype).eval()


@pytest.fixture
def hf_dir(tmp_path):
    path = str(tmp_path / "hf")
    tiny_hf_model("qwen2").save_pretrained(path)
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_score_module_pt_round_trips_bitwise(hf_dir, tmp_path, dtype):
    head = torch_head(0, dtype)
    torch.save(head.state_dict(), os.path.join(hf_dir, "score_module.pt"))
    meta = hf_to_jax(hf_dir, str(tmp_path / "ckpt"), progress=False)
    assert meta["source"]["score_module"]["file"] == "score_module.pt"
    out = str(tmp_path / "back")
    jax_to_hf(str(tmp_path / "ckpt"), out, score_format="both", progress=False)
    back = torch.load(os.path.join(out, "score_module.pt"), weights_only=True)
    as_safetensors = score_module.read_score_module(os.path.join(out, "score_module.safetensors"))
    for key, value in head.state_dict().items():
        assert back[key].dtype == dtype and torch.equal(back[key], value), key
        assert as_safetensors[key].tobytes() == back[key].view(torch.uint8).numpy().tobytes()


def test_jax_head_logits_equal_torch_sequential(hf_dir, tmp_path):
    head = torch_head(1)
    torch.save(head.state_dict(), os.path.join(hf_dir, "score_module.pt"))
    hf_to_jax(hf_dir, str(tmp_path / "ckpt"), progress=False)
    model, _ = load_params_checkpoint(str(tmp_path / "ckpt"))
    features = np.random.default_rng(0).normal(size=(3, 11, D)).astype(np.float32)
    with torch.no_grad():
        expected = head(torch.from_numpy(features))[..., 0].numpy()  # eval: dropout off
    got = np.asarray(model.sprm_logits(features))
    assert got.shape == (3, 11)
    # torch's matmuls add the head's D + 2D terms in their own order; scale: max |head logit|.
    tol = fp32_reduction_tol(sprm_head_terms(D), np.abs(expected).max())
    np.testing.assert_allclose(got, expected, rtol=0, atol=tol)


def test_score_module_safetensors_is_read_without_torch(hf_dir, tmp_path, monkeypatch):
    head = torch_head(2)
    tensors = {k: v.numpy() for k, v in head.state_dict().items()}
    score_module.write_score_module(os.path.join(hf_dir, "score_module.safetensors"), tensors)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    hf_to_jax(hf_dir, str(tmp_path / "ckpt"), progress=False)
    model, _ = load_params_checkpoint(str(tmp_path / "ckpt"))
    np.testing.assert_array_equal(np.asarray(model.sprm.fc1.kernel[...]), tensors["0.weight"].T)
    with pytest.raises(ValueError, match=r"score_module\.pt needs torch"):
        jax_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "out"), progress=False)
    assert not os.path.exists(str(tmp_path / "out"))
    jax_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "out"), score_format="safetensors",
              progress=False)  # fmt: skip
    back = score_module.read_score_module(str(tmp_path / "out" / "score_module.safetensors"))
    assert all(back[k].tobytes() == v.tobytes() for k, v in tensors.items())


def test_bad_score_module_names_file_and_tensor(hf_dir, tmp_path):
    sd = torch_head(3).state_dict()
    path = os.path.join(hf_dir, "score_module.pt")
    torch.save({k: v for k, v in sd.items() if k != "3.bias"}, path)
    with pytest.raises(
        ValueError, match=r"score_module\.pt: expected keys .* missing \['3\.bias'\]"
    ):
        hf_to_jax(hf_dir, str(tmp_path / "a"), progress=False)
    torch.save({**sd, "0.weight": torch.zeros(2 * D, D + 1)}, path)
    with pytest.raises(
        ValueError, match=r"score_module\.pt: tensor 0\.weight has shape \[128, 65\]"
    ):
        hf_to_jax(hf_dir, str(tmp_path / "b"), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["hf"]
