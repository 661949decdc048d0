"""Bad HF input fails with the file and tensor named, and never leaves a partial output."""

import json
import os
import shutil

import numpy as np
import pytest
from hf_reference import tiny_hf_model
from safetensors.numpy import load_file, save_file

from metastone_jax.convert.hf import hf_to_jax, jax_to_hf


@pytest.fixture
def hf_dir(tmp_path):
    path = str(tmp_path / "hf")
    tiny_hf_model("qwen2").save_pretrained(path)
    return path


def rewrite_config(hf_dir, **changes):
    path = os.path.join(hf_dir, "config.json")
    config = json.load(open(path))
    config.update(changes)
    json.dump(config, open(path, "w"))


def rewrite_weights(hf_dir, edit):
    path = os.path.join(hf_dir, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def assert_fails(hf_dir, tmp_path, match):
    out = str(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=match):
        hf_to_jax(hf_dir, out, progress=False)
    leftovers = [n for n in os.listdir(tmp_path) if n != "hf"]
    assert leftovers == [], f"partial output left behind: {leftovers}"


def test_missing_directory_and_files(tmp_path):
    assert_fails(str(tmp_path / "nope"), tmp_path, r"nope: no such directory")
    os.makedirs(tmp_path / "hf")
    assert_fails(str(tmp_path / "hf"), tmp_path, r"hf: missing config\.json")
    json.dump(tiny_hf_model("llama").config.to_dict(), open(tmp_path / "hf" / "config.json", "w"))
    assert_fails(str(tmp_path / "hf"), tmp_path, r"hf: no weights found \(expected model")


def test_malformed_config_json(hf_dir, tmp_path):
    open(os.path.join(hf_dir, "config.json"), "w").write("{not json")
    assert_fails(hf_dir, tmp_path, r"config\.json: not valid JSON")


def test_unsupported_architecture(hf_dir, tmp_path):
    rewrite_config(hf_dir, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    assert_fails(hf_dir, tmp_path, r"config\.json: .*gpt2")


def test_wrong_shape_names_file_and_tensor(hf_dir, tmp_path):
    def widen(t):
        t["model.layers.1.mlp.up_proj.weight"] = np.zeros((113, 64), np.float32)

    rewrite_weights(hf_dir, widen)
    assert_fails(
        hf_dir,
        tmp_path,
        r"model\.safetensors: tensor model\.layers\.1\.mlp\.up_proj\.weight has shape \[113, 64\], "
        r"expected \[112, 64\] from .*config\.json",
    )


def test_missing_tensor(hf_dir, tmp_path):
    rewrite_weights(hf_dir, lambda t: t.pop("model.layers.2.self_attn.k_proj.bias"))
    assert_fails(
        hf_dir, tmp_path, r"missing tensor\(s\) \['model\.layers\.2\.self_attn\.k_proj\.bias'\]"
    )


def test_config_that_disagrees_with_the_weights(hf_dir, tmp_path):
    rewrite_config(hf_dir, num_hidden_layers=2)  # the weights have 3 layers
    assert_fails(
        hf_dir, tmp_path, r"model\.safetensors: unexpected tensor\(s\) \['model\.layers\.2\."
    )
    rewrite_config(hf_dir, num_hidden_layers=3, intermediate_size=64)
    assert_fails(hf_dir, tmp_path, r"gate_proj\.weight has shape \[112, 64\], expected \[64, 64\]")


def test_sharded_index_naming_a_missing_file(hf_dir, tmp_path):
    index = {
        "metadata": {},
        "weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"},
    }
    json.dump(index, open(os.path.join(hf_dir, "model.safetensors.index.json"), "w"))
    assert_fails(
        hf_dir, tmp_path, r"index\.json: names model-00002-of-00002\.safetensors, which is missing"
    )


def test_existing_output_is_kept(hf_dir, tmp_path):
    out = tmp_path / "ckpt"
    os.makedirs(out)
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"ckpt: already exists \(pass --overwrite"):
        hf_to_jax(hf_dir, str(out), progress=False)
    assert (out / "keep.txt").read_text() == "mine"


def test_failed_export_leaves_no_partial_directory(hf_dir, tmp_path):
    hf_to_jax(hf_dir, str(tmp_path / "ckpt"), progress=False)
    with pytest.raises(ValueError, match=r"--max_shard_size: expected e\.g\. 5GB"):
        jax_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "out"), max_shard_size="lots")
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "hf"]
    with pytest.raises(ValueError, match=r"nope: no such checkpoint directory"):
        jax_to_hf(str(tmp_path / "nope"), str(tmp_path / "out"))
    shutil.rmtree(tmp_path / "ckpt" / "params")
    with pytest.raises(ValueError, match=r"ckpt: parameters do not match model_config\.json"):
        jax_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "hf"]
