"""`metastone-jax sample` end to end on a converted checkpoint with a real tokenizer."""

import json
import os
import shutil

import pytest
import torch
import transformers
from test_tokenizer import bpe_dir  # noqa: F401  (fixture: BPE tokenizer.json + R1-like template)

from metastone_jax.convert.hf import hf_to_jax
from metastone_jax.data.tokenizer import load_tokenizer
from metastone_jax.main import main


@pytest.fixture(scope="module")
def ckpt(bpe_dir, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("sample-cli")
    vocab = len(transformers.PreTrainedTokenizerFast.from_pretrained(str(bpe_dir)))
    config = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(str(tmp / "hf"))
    for name in os.listdir(bpe_dir):
        shutil.copy(os.path.join(bpe_dir, name), tmp / "hf")
    hf_to_jax(str(tmp / "hf"), str(tmp / "ckpt"), progress=False)
    return str(tmp / "ckpt")


def sample(capsys, ckpt, *extra):
    tok = load_tokenizer(os.path.join(ckpt, "hf"))
    step = tok.encode(" the")[0]  # a frequent token stands in for ".\n\n" in this vocabulary
    main(["metastone-jax", "sample", f"--ckpt={ckpt}", "--max_new_tokens=16",
          f"--step_ids={step}", "--temperature=1.0", *extra])  # fmt: skip
    return capsys.readouterr().out


def test_sample_json_reports_every_candidate(capsys, ckpt):
    out = json.loads(sample(capsys, ckpt, "--prompt=What is 12 + 30?", "--prompt=2 * 3?",
                            "--mode=low", "--json"))  # fmt: skip
    assert len(out["prompts"]) == 2
    for item in out["prompts"]:
        assert len(item["candidates"]) == 2  # low = k 2
        assert 0 <= item["selected"] < 2
        for c in item["candidates"]:
            assert set(c) >= {"text", "answer", "score", "n_steps", "finish", "length"}
            assert 0.0 <= c["score"] <= 1.0
        best = max(range(2), key=lambda j: item["candidates"][j]["score"])
        assert item["selected"] == best
    assert out["stats"]["generated_tokens"] > 0


def test_sample_text_output_with_steps_and_beam(capsys, ckpt):
    text = sample(capsys, ckpt, "--prompt=What is 12 + 30?", "--strategy=beam",
                  "--beam_width=2", "--expansions=2", "--show_steps")  # fmt: skip
    assert "=== prompt 0: selected candidate" in text and "--- candidates" in text
    assert "stats:" in text and "beam_rounds" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt=  "], "--prompt 0: empty prompt"),
        (["--prompt=x", "--strategy=mcts"], "strategy: expected one of"),
        (["--prompt=x", "--aggregation=median"], "aggregation: expected one of"),
        (["--prompt=x", "--k=0"], "k: expected >= 1"),
        (["--prompt=" + "word " * 600], "exceeds the model's max_len=512"),
    ],
)
def test_sample_bad_input(capsys, ckpt, args, message):
    with pytest.raises(SystemExit, match=message):
        sample(capsys, ckpt, *args)


def test_sample_with_early_pruning_reports_it(capsys, ckpt):
    out = json.loads(sample(capsys, ckpt, "--prompt=What is 12 + 30?", "--k=4", "--prune_keep=1",
                            "--json"))  # fmt: skip
    assert "pruned" in out["stats"] and "tokens_saved_estimate" in out["stats"]
