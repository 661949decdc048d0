"""A model trained from scratch goes back to Hugging Face: `train` (tiny-sft, two steps, with its
SentencePiece tokenizer) -> `metastone-jax convert jax-to-hf` -> transformers' AutoTokenizer and
AutoModelForCausalLM load the directory as it is, with the same token ids (plain text and chat
template) and the same fp32 logits as our tokenizer and model; and the directory converts back."""

import json
import os
import shutil
from collections.abc import Mapping

import numpy as np
import pytest
import torch
import transformers
from config_files import train_config
from hf_reference import tiny_hf_model
from safetensors.numpy import load_file, save_file
from test_spm_to_hf import raw_spm_model
from tolerances import EPS32, transformer_terms

from metastone_jax.checkpoint import HF_FILES_DIR, load_params_checkpoint
from metastone_jax.convert.hf import hf_to_jax, jax_to_hf
from metastone_jax.data.synthetic import make_examples
from metastone_jax.data.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer
from metastone_jax.main import main
from metastone_jax.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDS = list(make_examples("test", 6, seed=1, reflect=0.5))  # reflective traces ("wait, ...")
TEXTS = [
    *(r["prompt"] for r in RECORDS),
    *(r["solution"] for r in RECORDS),
    "<think>1+2=3.\n\n3-4=-1.\n\n</think>The answer is \\boxed{-1}.",
    ".\n\n.\n\n\n<think></think></think><think>",  # step and think symbols back to back
    "Ünïcödé: 中文, 🙂, ∑_{k=1}^n k, e\u0301, \x00\x7f",  # outside the vocabulary: byte fallback
    "  two leading spaces,\ttab,\r\nCRLF, no-break\u00a0space, trailing \n",
    "0123456789 -42 +7 =35",
    "<s>bos</s><pad> and <unk>, <0x41>, ▁marker",  # control pieces written as text
    "",
    " ",
]
CONVERSATIONS = [
    [{"role": "user", "content": RECORDS[0]["prompt"]}],
    [
        {"role": "user", "content": RECORDS[1]["prompt"]},
        {"role": "assistant", "content": RECORDS[1]["solution"]},
        {"role": "user", "content": "And 中文 🙂?"},
    ],
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(our export, the HF directory `convert jax-to-hf` made from it)."""
    workdir = str(tmp_path_factory.mktemp("run"))
    train(train_config("tiny-sft", train={"steps": 2, "save_every": 2}), workdir)
    export = os.path.join(workdir, "export")
    out = str(tmp_path_factory.mktemp("hf") / "hf")
    main(["metastone-jax", "convert", "jax-to-hf", f"--ckpt={export}", f"--out={out}"])
    return export, out


@pytest.fixture(scope="module")
def hf_tokenizer(exported):
    return transformers.AutoTokenizer.from_pretrained(exported[1], local_files_only=True)


@pytest.fixture(scope="module")
def our_tokenizer(exported):
    tok = load_tokenizer(os.path.join(exported[0], HF_FILES_DIR))
    assert isinstance(tok, SentencePieceTokenizer)  # the case under test: trained from scratch
    return tok


def _ids(encoded) -> list[int]:
    """apply_chat_template's ids: a list (transformers 4) or a BatchEncoding (5)."""
    return list(encoded["input_ids"] if isinstance(encoded, Mapping) else encoded)


def test_token_ids_equal(hf_tokenizer, our_tokenizer):
    for text in TEXTS:
        for special in (True, False):  # with special tokens: BOS first, as ours adds it
            want = our_tokenizer.encode(text, add_special_tokens=special)
            got = hf_tokenizer(text, add_special_tokens=special)["input_ids"]
            assert got == want, (text, special)
        ids = our_tokenizer.encode(text)
        assert hf_tokenizer.decode(ids) == our_tokenizer.decode(ids)


def test_chat_template_ids_equal(hf_tokenizer, our_tokenizer):
    for messages in CONVERSATIONS:
        text = hf_tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        assert text == our_tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        assert _ids(ids) == our_tokenizer.encode_chat(messages, add_generation_prompt=True)


def test_special_token_ids_agree_across_files(exported, hf_tokenizer, our_tokenizer):
    config = transformers.AutoConfig.from_pretrained(exported[1], local_files_only=True)
    generation = transformers.GenerationConfig.from_pretrained(exported[1])
    want = (our_tokenizer.bos_id, our_tokenizer.eos_id, our_tokenizer.pad_id)
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == want
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == want
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == want


def _sft_rows(tokenizer) -> np.ndarray:
    """Two training-format rows (chat prompt + solution + EOS), cut to a common length [2, T]."""
    rows = [
        tokenizer.encode_chat([{"role": "user", "content": r["prompt"]}])
        + tokenizer.encode(r["solution"])
        + [tokenizer.eos_id]
        for r in RECORDS[:2]
    ]
    length = min(map(len, rows))
    return np.array([row[:length] for row in rows])


def test_logits_equal_in_fp32(exported, our_tokenizer):
    export, out = exported
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert hf_model.dtype == torch.float32  # as config.json says: the weights are fp32
    model, _ = load_params_checkpoint(export, compute_dtype="float32")
    tokens = _sft_rows(our_tokenizer)
    with torch.no_grad():
        theirs = hf_model(torch.from_numpy(tokens)).logits.numpy()
        hidden = hf_model.model(torch.from_numpy(tokens)).last_hidden_state  # after final norm
        head = hf_model.lm_head.weight
        scale = float(hidden.norm(dim=-1).max() * head.norm(dim=-1).max())
    ours = np.asarray(model(tokens).logits)
    # Same fp32 weights, different summation orders (XLA vs torch). A logit is h . w_j, so the
    # terms it sums are bounded by `scale` >= |h| |w_j|, and each fp32 reduction on its path
    # (transformer_terms: ~1800 terms here) errs relative to its terms' size. Independent
    # roundings add like a random walk: sqrt(n) eps scale, ~8e-6 here, under the 1e-5;
    # the worst case, n eps scale (tolerances.fp32_reduction_tol, ~3e-4), would be 40x looser.
    estimate = EPS32 * np.sqrt(transformer_terms(model.cfg, tokens.shape[1])) * scale
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= min(estimate, 1e-5)


def test_hf_directory_converts_back(exported, our_tokenizer, tmp_path):
    export, out = exported
    back = str(tmp_path / "back")
    hf_to_jax(out, back, progress=False)
    model, _ = load_params_checkpoint(export, compute_dtype="float32")
    again, _ = load_params_checkpoint(back, compute_dtype="float32")
    tokens = _sft_rows(our_tokenizer)
    assert np.array_equal(np.asarray(again(tokens).logits), np.asarray(model(tokens).logits))
    tok = load_tokenizer(os.path.join(back, HF_FILES_DIR))
    assert isinstance(tok, HFTokenizer)  # tokenizer.json now wins over tokenizer.model
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens=True) == our_tokenizer.encode(
            text, add_special_tokens=True
        )


def test_nonzero_o_proj_bias_is_refused(exported, tmp_path):
    """The export is a Llama with attention_bias (transformers would keep a Qwen2 checkpoint to
    its byte-level tokenizer); its o_proj biases are zeros, which ours lacks: others are refused."""
    src = str(tmp_path / "hf")
    shutil.copytree(exported[1], src)
    config = json.load(open(os.path.join(src, "config.json")))
    assert config["architectures"] == ["LlamaForCausalLM"] and config["attention_bias"]
    path = os.path.join(src, "model.safetensors")
    tensors = load_file(path)
    name = "model.layers.1.self_attn.o_proj.bias"
    assert not tensors[name].any()
    tensors[name] = tensors[name] + np.float32(1e-3)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"^{path}: tensor {name} must be zeros of shape \[64\]"):
        hf_to_jax(src, str(tmp_path / "ckpt"), progress=False)


def test_unconvertible_sentencepiece_model_is_carried_with_a_warning(tmp_path, capsys):
    """A SentencePiece model tokenizer.json cannot reproduce (here sentencepiece's default
    dummy prefix) is copied as before, without a tokenizer.json, and the export stays Qwen2."""
    hf_dir = str(tmp_path / "hf")
    tiny_hf_model("qwen2").save_pretrained(hf_dir)
    shutil.copy(raw_spm_model(tmp_path, model_type="bpe", byte_fallback=True), hf_dir)
    os.rename(os.path.join(hf_dir, "raw.model"), os.path.join(hf_dir, "tokenizer.model"))
    hf_to_jax(hf_dir, str(tmp_path / "ckpt"), progress=False)
    jax_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "out"), progress=False)
    warning = capsys.readouterr().err
    assert "warning: " in warning and "add_dummy_prefix is True" in warning
    out = sorted(os.listdir(tmp_path / "out"))
    assert "tokenizer.model" in out and "tokenizer.json" not in out
    config = json.load(open(tmp_path / "out" / "config.json"))
    assert config["architectures"] == ["Qwen2ForCausalLM"]
