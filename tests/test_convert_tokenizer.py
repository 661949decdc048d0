"""A converted checkpoint keeps working end to end: tokenizer + chat template + generation."""

import os
import shutil

import numpy as np
import torch
import transformers
from test_convert import greedy_generate
from test_tokenizer import bpe_dir  # noqa: F401  (fixture: BPE tokenizer.json + R1-like template)

from metastone_jax.checkpoint import HF_FILES_DIR, load_params_checkpoint
from metastone_jax.convert.hf import hf_to_jax, jax_to_hf
from metastone_jax.data.tokenizer import HFTokenizer, load_tokenizer

MESSAGES = [{"role": "user", "content": "What is 12 + 30? Think step by step."}]


def test_tokenizer_and_chat_template_survive_both_conversions(bpe_dir, tmp_path):  # noqa: F811
    hf_dir = str(tmp_path / "hf")
    reference_tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(bpe_dir))
    config = transformers.Qwen2Config(
        vocab_size=len(reference_tok), hidden_size=64, intermediate_size=112,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
    )  # fmt: skip
    torch.manual_seed(0)
    hf_model = transformers.Qwen2ForCausalLM(config).eval()
    hf_model.save_pretrained(hf_dir)
    for name in os.listdir(bpe_dir):
        shutil.copy(os.path.join(bpe_dir, name), hf_dir)

    hf_to_jax(hf_dir, str(tmp_path / "ckpt"), progress=False)
    tok = load_tokenizer(str(tmp_path / "ckpt" / HF_FILES_DIR))
    assert isinstance(tok, HFTokenizer)
    prompt = tok.apply_chat_template(MESSAGES)
    assert prompt == reference_tok.apply_chat_template(MESSAGES, tokenize=False,
                                                       add_generation_prompt=True)  # fmt: skip
    ids = np.array([tok.encode_chat(MESSAGES)])

    model, _ = load_params_checkpoint(str(tmp_path / "ckpt"), compute_dtype="float32")
    with torch.no_grad():
        prompt_ids = torch.from_numpy(ids)  # starts with BOS id 0: pass the mask explicitly
        out = hf_model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                                max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_id,
                                )[0, ids.shape[1] :]  # fmt: skip
    # transformers stops at an EOS id from generation_config.json; compare what it produced.
    ours = greedy_generate(model, ids, 12)[0, : len(out)]
    assert tok.decode(ours) == reference_tok.decode(out) and len(out) > 1

    jax_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "back"), progress=False)
    back_tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "back"))
    assert (
        back_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == prompt
    )
    assert load_tokenizer(str(tmp_path / "back")).encode_chat(MESSAGES) == ids[0].tolist()
